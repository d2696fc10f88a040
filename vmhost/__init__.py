"""vmhost: one QEMU virtual machine supervised as one systemd service.

The public names load on first use (PEP 562), so ``vmhost serve`` never pays for
the client, nor a client for the service: one vmhost runs per VM, and every
module it imports costs memory a hundred times over.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import AsyncClient, Client
    from .control.wire import Request, Response
    from .errors import (
        AlreadyRunningError,
        ClientError,
        ConfigError,
        ControllerError,
        ServerError,
        VMCrashedError,
        VmhostError,
    )
    from .vm.state import VMState

__version__ = "0.2.0"

_WHERE = {
    "AsyncClient": ".client",
    "Client": ".client",
    "Request": ".control.wire",
    "Response": ".control.wire",
    "AlreadyRunningError": ".errors",
    "ClientError": ".errors",
    "ConfigError": ".errors",
    "ControllerError": ".errors",
    "ServerError": ".errors",
    "VMCrashedError": ".errors",
    "VmhostError": ".errors",
    "VMState": ".vm.state",
}

__all__ = [
    "AlreadyRunningError",
    "AsyncClient",
    "Client",
    "ClientError",
    "ConfigError",
    "ControllerError",
    "Request",
    "Response",
    "ServerError",
    "VMCrashedError",
    "VMState",
    "VmhostError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value
