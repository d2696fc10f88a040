"""Handing a running QEMU to a re-executed vmhost: what is handed over, and pausing
QEMU's streams at a line boundary so no message is cut between the two."""

from __future__ import annotations

import asyncio
from typing import IO, Any, Final

import msgspec

from ..errors import ReloadRefusedError
from .process import QemuProcess
from .qmp import QmpSession, pause_at_line
from .readiness import Readiness
from .state import VMState

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
            notify_fd=readiness.notify_fd,
            ready_note=readiness.note,
        )

    @property
    def fds(self) -> tuple[int, ...]:
        fds = (self.qmp_fd, self.console_fd, self.stderr_fd)
        return (*fds, self.notify_fd) if self.notify_fd >= 0 else fds


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
