"""vmhost: one QEMU virtual machine supervised as one systemd service."""

from .client import AsyncClient, Client
from .errors import (
    AlreadyRunningError,
    ClientError,
    ConfigError,
    ControllerError,
    ProtocolError,
    ServerError,
    VMCrashedError,
    VmhostError,
)
from .protocol import Request, Response
from .vm.state import VMState

__version__ = "0.2.0"

__all__ = [
    "AlreadyRunningError",
    "AsyncClient",
    "Client",
    "ClientError",
    "ConfigError",
    "ControllerError",
    "ProtocolError",
    "Request",
    "Response",
    "ServerError",
    "VMCrashedError",
    "VMState",
    "VmhostError",
    "__version__",
]
