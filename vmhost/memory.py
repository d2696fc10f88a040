"""Start-up's memory, settled once the VM runs: a host runs one vmhost per VM, so every
page a vmhost keeps for nothing is kept a hundred times."""

from __future__ import annotations

import contextlib
import ctypes
import gc


def settle() -> None:
    """What start-up built lives forever: out of the collector's sight (``gc.freeze``).  The
    heap pages its garbage (config parsing, imports) left free go back to the kernel, which
    glibc would otherwise keep: ``malloc_trim``."""
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to give back
        ctypes.CDLL(None).malloc_trim(0)
