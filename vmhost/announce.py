"""READY=1 for systemd when the guest is ready (``[boot] ready``), and what systemd needs
around it while the guest boots: its STATUS= at once, the start timeout extended."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from . import memory, notify, stopsignals
from .vm.controller import QemuController
from .vm.state import VMState


@contextlib.asynccontextmanager
async def when_ready(
    controller: QemuController, notifier: notify.Notifier, announce: Callable[[], None]
) -> AsyncIterator[None]:
    """Around the supervision of a started (or adopted) VM: ``announce`` (READY=1, or the
    reload's) once the guest is first ready, never again (a reboot's readiness is not told).

    A VM that ends normally (a stop, a power-off) before that still gets READY=1 just
    before vmhost exits: systemd fails a ``Type=notify`` service that exits before
    READY=1 (result ``protocol``) and restarts it, though it did what was asked.
    """
    readiness = controller.readiness
    readiness.on_status = lambda: notifier.status(controller.status_text())
    if controller.state is VMState.BOOTING:  # systemd waits for the guest too
        notifier.extend_timeout(readiness.start_left() + stopsignals.EXTEND_MARGIN)
    elif controller.state is VMState.INCOMING:  # ... or for it to arrive
        wait = controller.migration.config.timeout_seconds
        notifier.extend_timeout(wait + stopsignals.EXTEND_MARGIN)

    async def ready() -> None:
        await readiness.first_ready.wait()
        if not controller.state.ended:
            memory.settle()
            announce()

    waiting = asyncio.create_task(ready())
    try:
        yield
    finally:
        waiting.cancel()
    if not readiness.first_ready.is_set():
        notifier.ready(controller.status_text())
