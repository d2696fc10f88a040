"""Handing a running QEMU to a re-executed vmhost: what is handed over, and pausing
QEMU's streams at a line boundary so no message is cut between the two."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import IO, Any, Final

import msgspec
from qemu.qmp import QMPError

from ..errors import ControllerError, ReloadRefusedError
from .parts import EXIT_GRACE, Parts
from .process import QemuProcess
from .qmp import COMMAND_TIMEOUT, QmpSession, pause_at_line
from .readiness import Readiness
from .state import Change, RunState, VMState

log = logging.getLogger(__name__)

QUIESCE_TIMEOUT: Final = 1.0
"""For QEMU's streams to reach a line boundary before a handover."""


class RunningQemu(msgspec.Struct, frozen=True, kw_only=True):
    """A running QEMU as one vmhost hands it to the next (the descriptors are inherited)."""

    pid: int
    qmp_fd: int
    console_fd: int
    stderr_fd: int
    state: VMState
    vcpus_stopped: bool = False
    shutdown_event: dict[str, Any] | None = None
    stderr_tail: list[str] = []
    agent: bool = False
    """The guest agent was provisioned: the next vmhost reconnects without provisioning again."""
    console_input_fd: int = -1
    """The console input pipe's write end; -1 when there is none (an older vmhost's QEMU)."""
    notify_fd: int = -1
    """vmhost's end of the guest's notify port (``[boot] ready = "notify"``), else -1."""
    ready_note: str = ""
    """How long the guest took to get ready, for ``status`` with detail."""

    @classmethod
    def of(
        cls,
        process: QemuProcess,
        qmp: QmpSession,
        console: IO[bytes],
        *,
        state: VMState,
        agent: bool,
        readiness: Readiness,
    ) -> RunningQemu:
        assert process.stderr is not None and qmp.sock is not None
        return cls(
            pid=process.pid,
            qmp_fd=qmp.sock.fileno(),
            console_fd=console.fileno(),
            stderr_fd=process.stderr.fileno(),
            state=state,
            vcpus_stopped=qmp.vcpus_stopped,
            shutdown_event=qmp.shutdown_event,
            stderr_tail=list(process.stderr_tail),
            agent=agent,
            console_input_fd=process.console_input.fd,
            notify_fd=readiness.notify_fd,
            ready_note=readiness.note,
        )

    def restore(self, process: QemuProcess, qmp: QmpSession, readiness: Readiness) -> IO[bytes]:
        """In the new vmhost: what the parts knew, and the console's read end."""
        qmp.shutdown_event, qmp.vcpus_stopped = self.shutdown_event, self.vcpus_stopped
        process.stderr_tail.extend(self.stderr_tail)
        process.adopt(self.pid, self.stderr_fd, self.console_input_fd)
        readiness.adopt(self.ready_note, self.notify_fd)  # only a ready guest is handed over
        return os.fdopen(self.console_fd, "rb", buffering=0)

    @property
    def fds(self) -> tuple[int, ...]:
        fds = (self.qmp_fd, self.console_fd, self.stderr_fd)
        extra = tuple(fd for fd in (self.console_input_fd, self.notify_fd) if fd >= 0)
        return (*fds, *extra)


def refusal(run: RunState, process: QemuProcess) -> str:
    """Why QEMU cannot be handed over right now; empty when it can."""
    if run.ended or process.reaped:
        return "QEMU is gone"
    if run.state is VMState.STOPPING:
        return "a stop is running (it goes on)"
    if run.state not in (VMState.RUNNING, VMState.PAUSED):
        return f"the VM is {run.state.value}"
    return ""


async def hand_over(
    run: RunState,
    process: QemuProcess,
    qmp: QmpSession,
    console: IO[bytes],
    readiness: Readiness,
    *,
    agent: bool,
) -> RunningQemu:
    """Pause QEMU's streams at a line boundary and describe what a new vmhost takes over.

    What was read is consumed here first (QMP events included); the rest stays
    in the kernel for the next reader.  The caller execs next without yielding
    to the loop, or resumes the streams if it cannot.
    """
    if reason := refusal(run, process):
        raise ReloadRefusedError(reason)
    await pause_streams(process, qmp, readiness)
    if reason := refusal(run, process):  # a stop may have come in meanwhile
        resume_streams(process, qmp, readiness)
        raise ReloadRefusedError(reason)
    return RunningQemu.of(process, qmp, console, state=run.state, agent=agent, readiness=readiness)


async def pause_streams(process: QemuProcess, qmp: QmpSession, readiness: Readiness) -> None:
    """Stop reading QEMU's stderr, the guest's notify port and QMP once what was read is
    consumed (QMP events included); the rest stays in the kernel for the next reader."""
    try:
        async with asyncio.timeout(QUIESCE_TIMEOUT):
            for lines in (process.stream, readiness.stream):
                if lines and not lines[0].is_closing():
                    await pause_at_line(*lines)
            await qmp.quiesce()
    except TimeoutError:
        resume_streams(process, qmp, readiness)
        raise ReloadRefusedError("QEMU's output did not pause at a line boundary") from None


def resume_streams(process: QemuProcess, qmp: QmpSession, readiness: Readiness) -> None:
    """Read QEMU's streams again: the handover did not happen."""
    for stream in (qmp.stream, process.stream, readiness.stream):
        if stream is not None and not stream[0].is_closing():
            stream[0].resume_reading()


class Reloadable(Parts):
    """The controller's reload half (a base of :class:`~.controller.QemuController`): QEMU
    handed over to a re-executed vmhost, and taken over by it."""

    def handover_refusal(self) -> str:
        """Why QEMU cannot be handed over right now; empty when it can."""
        return refusal(self._run, self._process)

    async def handover(self) -> RunningQemu:
        """Pause QEMU's streams at a line boundary and describe what a new vmhost takes over
        (:func:`.handover.hand_over`); the caller execs next, or calls :meth:`resume`."""
        assert self._console is not None
        parts = (self._run, self._process, self._qmp, self._console, self.readiness)
        return await hand_over(*parts, agent=self._connected_agent() is not None)

    def resume(self) -> None:
        """Read QEMU's streams again: the handover did not happen."""
        resume_streams(self._process, self._qmp, self.readiness)

    async def adopt(self, handed: RunningQemu) -> None:
        """Take over the QEMU a previous vmhost of this PID handed over (instead of :meth:`start`).

        The state is the handed-over one from the first moment, so clients
        queued meanwhile never see ``starting``; QMP is attached to the
        established session (no greeting, no negotiation) and asked
        ``query-status`` to prove QEMU answers.
        """
        self._run = RunState(handed.state)
        self.changes.publish(Change(handed.state, "taken over by the reloaded vmhost"))
        self._console = handed.restore(self._process, self._qmp, self.readiness)
        self._read_streams()
        try:
            sock = socket.socket(fileno=handed.qmp_fd)
            await self._qmp.connect(sock, budget=COMMAND_TIMEOUT, greeting=False)
            self._tasks.spawn(self._qmp.read_events())
            status = await self._qmp.execute("query-status")
        except (QMPError, OSError, TimeoutError) as e:
            await self._run.end(within=EXIT_GRACE)  # QMP at its end: QEMU is likely going
            if not self._run.ended:
                raise ControllerError(f"cannot take over QEMU (pid {handed.pid}): {e!r}") from e
            log.warning("QEMU (pid %d) ended while being taken over: %s", handed.pid, e)
            return  # wait() tells how it ended
        paused = isinstance(status, dict) and status.get("status") == "paused"
        state = self._run.state
        if paused != (state is VMState.PAUSED) and state is not VMState.UNRESPONSIVE:
            self._move(VMState.PAUSED if paused else VMState.RUNNING, "QMP query-status")
        self._supervise(agent=True, reconnect_agent=handed.agent)
