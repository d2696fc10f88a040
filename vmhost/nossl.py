"""Importing the service's libraries without OpenSSL.

asyncio, uvloop and qemu.qmp import :mod:`ssl` at start-up, though vmhost never
speaks TLS: that maps libssl and libcrypto and builds the ssl module's enums,
about 2 MiB and 7 ms in every one of a host's hundred vmhosts.  asyncio
supports a Python without ssl (it sees ``None``); uvloop and qemu.qmp only
need a few names from it at import time, which a stand-in provides.  The
stand-in leaves ``sys.modules`` once they are imported, so a later ``import
ssl`` still gets the real one; TLS through those three is refused meanwhile
(their ``isinstance`` checks see the stand-in's classes).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator


class SSLError(OSError):
    """The stand-in's: nothing raises it, nothing here speaks TLS."""


def _stand_in() -> types.ModuleType:
    module = types.ModuleType("ssl", "vmhost.nossl's stand-in: this process speaks no TLS")
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
def without_ssl() -> Iterator[None]:
    """Imports made inside see no OpenSSL; a no-op where ssl or asyncio is loaded already."""
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        yield
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # asyncio: "built without ssl"
    try:
        import asyncio  # noqa: F401

        sys.modules["ssl"] = _stand_in()
        yield
    finally:
        del sys.modules["ssl"]
