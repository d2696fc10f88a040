"""The stop chain: ONE deadline, and the steps that try ever harder to end QEMU within it
(guest agent, ACPI, QMP quit, SIGTERM, SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from qemu.qmp import QMPError

from ..config import StopConfig
from ..errors import ControllerError
from .process import QemuProcess
from .qmp import QmpSession

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)

ACPI_REPEAT: Final = 3.0
LAST_STEPS: Final = 1.0  # each of quit / SIGTERM after the deadline
_SIGKILL_WAIT: Final = 60.0

Step = Callable[[], Coroutine[Any, Any, None]]


class StopChain:
    """One stop: its deadline, the step running now, and the task that runs the steps.

    ``gone`` waits until QEMU has ended; ``announce(step, message)`` tells watchers.
    """

    def __init__(
        self,
        timeout: float,
        *,
        qmp: QmpSession,
        process: QemuProcess,
        agent: Callable[[], Agent | None],
        gone: Callable[[], Awaitable[None]],
        announce: Callable[[str, str], None],
    ) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.step = ""
        self.step_since = 0.0
        self._qmp, self._process, self._agent = qmp, process, agent
        self._gone, self._announce = gone, announce

    def left(self) -> float:
        """Seconds the chain may still take, its last steps included."""
        return max(self.deadline - time.monotonic(), 0.0) + 2 * LAST_STEPS

    def status_text(self) -> str:
        ago = time.monotonic() - self.step_since
        left = max(self.deadline - time.monotonic(), 0.0)
        return f"stopping: {self.step} {ago:.0f} s ago, {left:.0f} s left"

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.step = ""

    async def _run(self) -> None:
        qmp = self._qmp.connected
        quit_step = "QMP quit"
        if qmp and self._qmp.vcpus_stopped and await self._paused_on_io_error():
            quit_step += " (paused on a disk I/O error: the guest cannot shut down)"
        else:
            agent = self._agent()
            if agent is not None:
                await self._run_step("guest agent shutdown", _agent_shutdown(agent), share=0.5)
            if qmp:
                await self._run_step("ACPI power-down", self._powerdown)
        if qmp:
            await self._run_step(quit_step, self._quit, after_deadline=LAST_STEPS)
        await self._run_step("SIGTERM", self._signal(signal.SIGTERM), after_deadline=LAST_STEPS)
        await self._run_step("SIGKILL", self._signal(signal.SIGKILL), after_deadline=_SIGKILL_WAIT)

    async def _run_step(
        self, step: str, action: Step, *, share: float = 1.0, after_deadline: float = 0.0
    ) -> None:
        """Run one step, then give QEMU ``share`` of the time left, plus ``after_deadline``
        (the last steps run past the deadline), to be gone."""
        if self._process.reaped:
            return
        now = time.monotonic()
        budget = max(self.deadline - now, 0.0) * share + after_deadline
        self.step, self.step_since = step, now
        self._announce(step, f"stop: {step} ({budget:.1f} s for it)")
        try:
            async with asyncio.timeout(budget):
                await action()
                await self._gone()
        except TimeoutError:
            pass
        except (QMPError, OSError, ControllerError) as e:
            log.warning("stop: %s failed, next step: %s", step, e)

    async def _paused_on_io_error(self) -> bool:
        """Stopped vCPUs see neither agent nor power button: resume a paused VM first,
        unless a disk error paused it (a full host disk): it would only pause again."""
        try:
            status = await self._qmp.execute("query-status")
            assert isinstance(status, dict)
            if status.get("running", True):
                return False
            if status.get("status") == "io-error":
                log.warning("stop: the VM is paused on a disk I/O error; telling QEMU to quit")
                return True
            log.info("stop: resuming the VM (%s) so the guest can shut down", status["status"])
            await self._qmp.execute("cont")
        except (QMPError, OSError, TimeoutError) as e:
            log.warning("stop: cannot resume the paused VM: %s", e)
        return False

    async def _powerdown(self) -> None:
        """Press the power button again now and then: a guest still booting misses the first."""
        while not self._process.reaped:
            await self._qmp.execute("system_powerdown")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ACPI_REPEAT):
                    await self._gone()

    async def _quit(self) -> None:
        await self._qmp.execute("quit")

    def _signal(self, sig: signal.Signals) -> Step:
        async def run() -> None:
            self._process.kill(sig)

        return run


def _agent_shutdown(agent: Agent) -> Step:
    async def run() -> None:
        await agent.shutdown("vmhost stop")

    return run


def granted(config: StopConfig, timeout: float | None) -> float:
    """The stop's timeout: None is ``timeout_seconds``; at most ``max_timeout_seconds``."""
    if timeout is None:
        timeout = config.timeout_seconds
    limit = config.max_timeout_seconds
    if timeout > limit:
        log.warning("stop timeout %g s clamped to max_timeout_seconds %d", timeout, limit)
        timeout = limit
    return timeout


def event_name(step: str) -> str:
    """A stop step as a watcher's ``event``: its name without the note, one word
    (``QMP quit (paused on a disk I/O error: ...)`` is ``qmp-quit``)."""
    return step.partition(" (")[0].lower().replace(" ", "-")
