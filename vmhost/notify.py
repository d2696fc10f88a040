"""sd_notify: READY/RELOADING/STOPPING/STATUS, the watchdog, more time for a stop.

Silent when ``NOTIFY_SOCKET`` is unset, so ``vmhost serve`` behaves the same from a
shell, a test or a unit.
"""

from __future__ import annotations

import logging
import os
import time

from systemd import daemon

_log = logging.getLogger(__name__)


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
        """Ask for ``seconds`` more from now: a slow start, a stop longer than the unit allows."""
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
