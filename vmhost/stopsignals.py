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
from collections.abc import Callable
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
        self.asked = False
        """A stop signal was caught: set by the signal handler itself, before the loop runs
        the stop, so a reload about to exec sees it (see :func:`install`)."""
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
    """The stop signals get Python handlers, not the loop's: CPython runs the handler of a
    signal caught just before a reload blocks them inside that ``pthread_sigmask`` call, so
    :attr:`Stopper.asked` is set before the reload looks; the loop's handlers would run a
    loop iteration later, after the exec, and the stop would be lost."""
    loop = asyncio.get_running_loop()

    def soon(callback: Callable[..., object], *args: object) -> None:
        if not loop.is_closed():  # else vmhost is on its way out: nothing is left to run it
            loop.call_soon_threadsafe(callback, *args)

    def caught(signum: int, _frame: object) -> None:
        stop.asked = True
        soon(stop, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, machined.POWEROFF):
        signal.signal(signum, caught)
    # SIGCHLD: QEMU stopped or went on (uvloop refuses it to add_signal_handler).
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: soon(stop.controller.probe_now))
    reload.install_signals(reloader, fault.set)


def extend_stop_timeout(controller: QemuController, notifier: notify.Notifier) -> None:
    """Ask systemd for what the running stop chain may still take, whoever started it."""
    notifier.extend_timeout(controller.stop_left() + EXTEND_MARGIN)
