"""Handing a running QEMU to a re-executed vmhost: what is handed over, and pausing
QEMU's streams at a line boundary so no message is cut between the two."""

from __future__ import annotations

import asyncio
from typing import IO, Any, Final

import msgspec

from ..errors import ReloadRefusedError
from .process import QemuProcess
from .qmp import QmpSession, pause_at_line
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
    console_input_fd: int = -1
    """The console input pipe's write end; -1 when there is none (an older vmhost's QEMU)."""

    @classmethod
    def of(
        cls,
        process: QemuProcess,
        qmp: QmpSession,
        console: IO[bytes],
        *,
        state: VMState,
        agent: bool,
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
        )

    @property
    def fds(self) -> tuple[int, ...]:
        extra = (self.console_input_fd,) if self.console_input_fd >= 0 else ()
        return (self.qmp_fd, self.console_fd, self.stderr_fd, *extra)


async def pause_streams(process: QemuProcess, qmp: QmpSession) -> None:
    """Stop reading QEMU's stderr and QMP once what was read is consumed (QMP events
    included); the rest stays in the kernel for the next reader."""
    try:
        async with asyncio.timeout(QUIESCE_TIMEOUT):
            if (stderr := process.stream) and not stderr[0].is_closing():
                await pause_at_line(*stderr)
            await qmp.quiesce()
    except TimeoutError:
        resume_streams(process, qmp)
        raise ReloadRefusedError("QEMU's output did not pause at a line boundary") from None


def resume_streams(process: QemuProcess, qmp: QmpSession) -> None:
    """Read QEMU's streams again: the handover did not happen."""
    for stream in (qmp.stream, process.stream):
        if stream is not None and not stream[0].is_closing():
            stream[0].resume_reading()
