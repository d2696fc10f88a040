"""What the signals a supervisor gets mean: SIGTERM and machined's SIGRTMIN+4 stop the VM
gracefully, SIGINT too (or reboots it when vmhost is a machine), SIGHUP reloads, SIGCHLD
(QEMU stopped or continued) probes QMP at once.

The stop chain may outlast the unit's TimeoutStopSec=, so every stop asks systemd for
the time it still needs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Final

from . import machined, notify, reload
from .vm.controller import QemuController
from .vm.state import VMState

log = logging.getLogger(__name__)

EXTEND_MARGIN: Final = 5.0
"""Seconds asked of systemd beyond what vmhost itself expects to need."""
HANG_PROBE_EVERY: Final = 10.0
"""Seconds between QMP hang probes of a quiet VM.  The kernel tells a SIGSTOP or SIGCONT of
QEMU at once (SIGCHLD to its parent), and the probe then runs at once too; only a QEMU stuck
without a signal waits for the next probe.  Each probe wakes an idle vmhost: 0.2-0.7 ms."""


class Stopper:
    """SIGTERM/SIGINT (and machined's SIGRTMIN+4) run the graceful stop chain (the config's
    timeout); a second SIGINT forces it.  As a machine (``reboots``), SIGINT is ``machinectl
    reboot``: the same chain, then EXIT_REBOOT; a stop asked meanwhile wins, and no SIGINT
    forces anything."""

    def __init__(self, controller: QemuController, notifier: notify.Notifier) -> None:
        self.controller = controller
        self.notifier = notifier
        self.task: asyncio.Task[None] | None = None
        self.reboots = False
        self.rebooting = False

    def __call__(self, signum: int) -> None:
        reboot = self.reboots and signum == machined.REBOOT
        log.info("%s received%s", signal_name(signum), ": reboot" if reboot else "")
        if self.task is None:
            self.rebooting = reboot and self.controller.state is not VMState.STOPPING
            self.task = asyncio.ensure_future(self.controller.stop())
            extend_stop_timeout(self.controller, self.notifier)  # the running chain's, if joined
        elif not reboot:
            self.rebooting = False
            if signum == signal.SIGINT:
                asyncio.ensure_future(self.controller.force_stop())  # noqa: RUF006 - ends the loop


def signal_name(signum: int) -> str:
    return "SIGRTMIN+4" if signum == machined.POWEROFF else signal.Signals(signum).name


def install(stop: Stopper, reloader: reload.Reloader, fault: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, machined.POWEROFF):
        loop.add_signal_handler(signum, stop, signum)

    def child_changed(_signum: int, _frame: object) -> None:
        loop.call_soon_threadsafe(stop.controller.probe_now)

    signal.signal(signal.SIGCHLD, child_changed)  # uvloop refuses it to add_signal_handler
    reload.install_signals(reloader, fault.set)


def extend_stop_timeout(controller: QemuController, notifier: notify.Notifier) -> None:
    """Ask systemd for what the running stop chain may still take, whoever started it."""
    notifier.extend_timeout(controller.stop_left() + EXTEND_MARGIN)
