"""The only module that talks to systemd (through systemd-python).

Each entry point checks for itself whether systemd is there (``LISTEN_FDS``,
``NOTIFY_SOCKET``, ``JOURNAL_STREAM``) and does nothing when it is not, so
``vmhost serve`` behaves the same from a shell, a test or a unit.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import subprocess
import time
from collections.abc import Collection
from typing import Final
from uuid import UUID

from systemd import daemon, journal

from .errors import ActivationError

CONTROL_FD_NAME: Final = "control"
IDENTIFIER: Final = "vmhost"
CONSOLE_IDENTIFIER: Final = "vmhost-console"
FIELD_VM: Final = "VMHOST_VM"

_log = logging.getLogger(__name__)


def listen_socket() -> socket.socket | None:
    """The control socket systemd activated us with, or None when started by hand.

    The LISTEN_* variables are unset so QEMU never believes it was activated,
    and the descriptor is made non-inheritable so QEMU never holds the socket
    (a restart must find it free of stray listeners).
    """
    fds = daemon.listen_fds_with_names(unset_environment=False)
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        # Through os.environ: libsystemd's unsetenv() would leave Python's copy stale.
        os.environ.pop(key, None)
    if not fds:
        return None
    named = [fd for fd, name in fds.items() if name == CONTROL_FD_NAME]
    if len(named) == 1:
        fd = named[0]
    elif not named and len(fds) == 1:
        (fd,) = fds
    else:
        names = ", ".join(sorted(fds.values()))
        raise ActivationError(f"expected one socket named {CONTROL_FD_NAME!r}, got: {names}")
    if not daemon.is_socket_unix(fd, socket.SOCK_STREAM, listening=1):
        raise ActivationError(
            f"activated fd {fd} ({fds[fd]}) is not a listening AF_UNIX stream socket"
        )
    os.set_inheritable(fd, False)
    return socket.socket(fileno=fd)


def waiting_for_a_connect(names: Collection[str]) -> dict[str, str]:
    """VMs whose socket unit listens while their service is not active, with the service's
    ActiveState (inactive, failed, activating, deactivating).

    A connect to such a socket starts the VM (socket activation), so whoever
    only looks must not connect.  Empty when systemd does not run this host.
    """
    if not names or not daemon.booted():
        return {}
    units = [f"vmhost@{name}.{kind}" for name in names for kind in ("socket", "service")]
    try:
        shown = subprocess.run(
            ["systemctl", "show", "--property=Id,ActiveState", "--", *units],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        _log.warning("cannot ask systemd about the vmhost units: %s", exc)
        return {}
    state = {}
    for block in shown.split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        state[fields.get("Id", "")] = fields.get("ActiveState", "")
    return {
        name: state.get(f"vmhost@{name}.service", "")
        for name in names
        if state.get(f"vmhost@{name}.socket") == "active"
        and state.get(f"vmhost@{name}.service") != "active"
    }


def _status(text: str) -> str:
    # A newline would end the assignment and smuggle in another one.
    return "STATUS=" + " ".join(text.splitlines())


class Notifier:
    """sd_notify for the service manager; silent when ``NOTIFY_SOCKET`` is unset.

    A failed notification is logged, not raised: telling systemd about the VM
    must never be what takes the VM down.
    """

    def __init__(self) -> None:
        self._enabled = "NOTIFY_SOCKET" in os.environ

    def _send(self, *assignments: str) -> None:
        if not self._enabled:
            return
        try:
            daemon.notify("\n".join(assignments))
        except OSError as exc:
            _log.warning("sd_notify %s failed: %s", assignments[0].split("=")[0], exc)

    def ready(self, status: str) -> None:
        self._send("READY=1", _status(status))

    def status(self, text: str) -> None:
        self._send(_status(text))

    def reloading(self, status: str) -> None:
        """RELOADING=1 with the CLOCK_MONOTONIC timestamp systemd 253+ matches it by."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={usec}", _status(status))

    def stopping(self, status: str) -> None:
        self._send("STOPPING=1", _status(status))

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more from now, for a stop chain longer than TimeoutStopSec."""
        self._send(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    def mainpid(self, pid: int) -> None:
        self._send(f"MAINPID={pid}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half the timeout, as sd_watchdog_enabled(3) advises."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


def journal_connected() -> bool:
    """True when our stderr is systemd's journal stream: structured records will be kept."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup_logging(vm: str, *, verbose: bool = False) -> None:
    """Route stdlib logging to the journal (with ``VMHOST_VM`` on every record) or to stderr.

    UPPERCASE keys of a record's ``extra`` become journal fields; plain
    stderr shows only the message, since a terminal has no use for them.
    """
    handler: logging.Handler
    if journal_connected():
        handler = journal.JournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER, **{FIELD_VM: vm})
        handler.setFormatter(logging.Formatter("%(message)s"))  # PRIORITY, LOGGER are fields
    else:
        handler = logging.StreamHandler()
        name = vm.replace("%", "%%")
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {IDENTIFIER}[{name}] %(levelname)s %(message)s")
        )
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True
    )


class Event(enum.Enum):
    """Lifecycle milestones; each MESSAGE_ID is stable forever and explained in vmhost.catalog."""

    STARTED = UUID("c77f83d174654e369c2e9c9bbc544fa4")
    READY = UUID("d4620c77114c42878a274b246acd8679")
    STOPPING = UUID("5ea2ab4299c342268596f2477f20f744")
    STOPPED = UUID("4c6c9d30aaca4352ac575b71538a6bec")
    CRASHED = UUID("9c198aa67b8549218780195849241649")
    FAILED = UUID("6bfc1a302fd04df0824f5a49c15d5ef4")
    RELOADED = UUID("18b5b2c0dc2f4c81a1d5a170be84f393")

    @property
    def message_id(self) -> str:
        return self.value.hex


_ERROR_EVENTS: Final = frozenset({Event.CRASHED, Event.FAILED})


def log_event(event: Event, message: str, **fields: str) -> None:
    """Log a lifecycle milestone so ``journalctl MESSAGE_ID=...`` finds it across versions."""
    level = logging.ERROR if event in _ERROR_EVENTS else logging.INFO
    _log.log(
        level,
        message,
        extra={"MESSAGE_ID": event.message_id, "VMHOST_EVENT": event.name.lower(), **fields},
    )
