"""While the VM runs: systemd kept told (STATUS=, STOPPING=1, WATCHDOG=1) and one journal
record per state change, with nothing that wakes an idle vmhost but the watchdog."""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from . import journal, notify, reload, stopsignals
from .errors import PlantedFault
from .vm.controller import QemuController
from .vm.state import VMState

log = logging.getLogger(__name__)

STOP_STATUS_EVERY: Final = 1.0
"""Seconds between STATUS= refreshes while a stop runs (its clocks move on)."""

_EVENTS: Final = {
    VMState.STOPPING: journal.Event.STOPPING,
    VMState.STOPPED: journal.Event.STOPPED,
    VMState.MIGRATED: journal.Event.MIGRATED,
    VMState.CRASHED: journal.Event.CRASHED,
}


async def supervise(
    controller: QemuController,
    notifier: notify.Notifier,
    fault: asyncio.Event,
    stopping: asyncio.Event,
) -> None:
    """Until the VM ends; the planted test fault ends it too, as a bug would.  Nothing here
    wakes an idle vmhost but the watchdog, at half WatchdogSec=."""
    tasks = [
        asyncio.create_task(controller.wait()),
        asyncio.create_task(_planted(fault)),
        asyncio.create_task(_status_while_stopping(controller, notifier, stopping)),
    ]
    if (interval := notify.watchdog_interval()) is not None:
        tasks.append(asyncio.create_task(_watchdog(notifier, interval)))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()


def on_state(
    controller: QemuController,
    notifier: notify.Notifier,
    stopping: asyncio.Event,
    state: VMState,
    message: str,
    qmp_event: str,
) -> None:
    """Every state change: STATUS= for systemctl status, one journal record."""
    text = controller.status_text()
    if state is VMState.STOPPING:
        notifier.stopping(text)  # systemd starts counting TimeoutStopSec= here
        stopping.set()
        stopsignals.extend_stop_timeout(controller, notifier)
    else:
        notifier.status(text)
    fields = {"VMHOST_STATE": state.value}
    if qmp_event:
        fields["QMP_EVENT"] = qmp_event
    event = _EVENTS.get(state)
    if event is not None:
        journal.log_event(event, f"VM {controller.name} {state.value}: {message}", **fields)
    else:
        log.info("VM %s %s: %s", controller.name, state.value, message, extra=fields)


async def _planted(fault: asyncio.Event) -> None:
    await fault.wait()
    raise PlantedFault(f"planted by ${reload.FAULT_ENV} (SIGUSR2)")


async def _watchdog(notifier: notify.Notifier, interval: float) -> None:
    """WATCHDOG=1 from the event loop, so a stuck loop is caught.  The first at once: a reload
    does not reset systemd's watchdog clock, and the process before the exec may have last
    pinged almost ``interval`` ago."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def _status_while_stopping(
    controller: QemuController, notifier: notify.Notifier, stopping: asyncio.Event
) -> None:
    """While a stop runs, STATUS= follows its steps and their clocks, which move on
    without a state change; before that, nothing to refresh."""
    await stopping.wait()
    last = ""
    while True:
        if (text := controller.status_text()) != last:
            notifier.status(text)
            last = text
        await asyncio.sleep(STOP_STATUS_EVERY)
