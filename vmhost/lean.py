"""Importing the service's libraries without what it never uses: OpenSSL, bz2, lzma.

asyncio, uvloop and qemu.qmp import :mod:`ssl` at start-up, though vmhost never
speaks TLS: that maps libssl and libcrypto and builds the ssl module's enums,
about 2 MiB and 7 ms in every one of a host's hundred vmhosts.  asyncio
supports a Python without ssl (it sees ``None``); uvloop and qemu.qmp only
need a few names from it at import time, which a stand-in provides.  The
stand-in leaves ``sys.modules`` once they are imported, so a later ``import
ssl`` still gets the real one; TLS through those three is refused meanwhile
(their ``isinstance`` checks see the stand-in's classes).

:mod:`hashlib` is imported here too, without OpenSSL's ``_hashlib``: the VM's
SMBIOS UUID (``uuid5``) needs SHA-1 once, which Python's own ``_sha1`` computes
alike, without mapping libcrypto for it.  And :mod:`shutil` (``which``, for the
config's QEMU binary) without bz2 and lzma, which only its archive functions use.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

_BLOCKS = (("ssl", "asyncio"), ("_hashlib", "hashlib"), ("bz2", "shutil"), ("lzma", "shutil"))
"""What is kept out, and the module that would import it."""


class SSLError(OSError):
    """The stand-in's: nothing raises it, nothing here speaks TLS."""


def _stand_in() -> types.ModuleType:
    module = types.ModuleType("ssl", "vmhost.lean's stand-in: this process speaks no TLS")
    for name in ("SSLContext", "SSLObject", "SSLSocket", "MemoryBIO"):
        setattr(module, name, type(name, (), {"__module__": __name__}))
    names: dict[str, object] = {
        "SSLError": SSLError,
        "CertificateError": type("CertificateError", (SSLError, ValueError), {}),
        "SSL_ERROR_WANT_READ": 2,
        "SSL_ERROR_WANT_WRITE": 3,
        "SSL_ERROR_SYSCALL": 5,
        "create_default_context": _no_tls,
    }
    for name in ("SSLWantReadError", "SSLWantWriteError", "SSLSyscallError", "SSLZeroReturnError"):
        names[name] = type(name, (SSLError,), {"__module__": __name__})
    module.__dict__.update(names)
    return module


def _no_tls(*_args: object, **_kwargs: object) -> None:
    raise SSLError("vmhost serve speaks no TLS")


@contextlib.contextmanager
def without_unused() -> Iterator[None]:
    """Imports made inside see no OpenSSL, bz2 or lzma; each is left alone where it, or the
    module that would have imported it, is loaded already."""
    blocked = [name for name, user in _BLOCKS if not {name, user} & sys.modules.keys()]
    for name in blocked:  # asyncio: "built without ssl"; hashlib: its own digests
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import asyncio  # noqa: F401
        import hashlib  # noqa: F401
        import shutil  # noqa: F401

        if "ssl" in blocked:
            sys.modules["ssl"] = _stand_in()
        yield
    finally:
        for name in blocked:
            del sys.modules[name]
