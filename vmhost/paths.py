"""Where a VM's files live: its config, its control socket and PID file, its state.

Each root has the override systemd (or a test, or a VM started by hand) gives it,
so ``vmhost serve``, ``vmhostctl`` and ``vmhostctl list`` always look in the same
place.  A VM's name is checked before it becomes a path component.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from .config import check_name

CONFIG_DIR: Final = Path("/etc/vmhost")
RUN_DIR: Final = Path("/run/vmhost")
STATE_ROOT: Final = Path("/var/lib/vmhost")
SOCKET_NAME: Final = "vmhost.sock"
PID_FILE_NAME: Final = "vmhost.pid"


def config_dir() -> Path:
    """``$CONFIGURATION_DIRECTORY`` (set by the unit's ConfigurationDirectory=, or by tests), else
    /etc/vmhost."""
    directory = os.environ.get("CONFIGURATION_DIRECTORY", "").split(":")[0]
    return Path(directory) if directory else CONFIG_DIR


def config_path(name: str, directory: Path | None = None) -> Path:
    """VM ``name``'s config file, in ``directory`` or :func:`config_dir`."""
    return (directory or config_dir()) / f"{check_name(name)}.toml"


def run_dir() -> Path:
    """Where control sockets live: ``$VMHOST_RUN_DIR`` (tests, VMs started by hand), else
    /run/vmhost, where the socket unit puts them."""
    return Path(os.environ.get("VMHOST_RUN_DIR") or RUN_DIR)


def socket_path(name: str, directory: Path | None = None) -> Path:
    """VM ``name``'s control socket, under ``directory`` or :func:`run_dir`."""
    return (directory or run_dir()) / check_name(name) / SOCKET_NAME


def pid_file_beside(socket: Path) -> Path:
    """The PID file of a vmhost serving ``socket`` it bound itself."""
    return socket.with_name(PID_FILE_NAME)


def state_dir(name: str) -> Path:
    """``$STATE_DIRECTORY`` (the unit's StateDirectory=), else /var/lib/vmhost/NAME."""
    directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(directory) if directory else STATE_ROOT / check_name(name)
