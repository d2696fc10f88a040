"""vmhost: one QEMU virtual machine supervised as one systemd service."""

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
