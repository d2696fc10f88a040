"""The guest's serial console: read from QEMU's pipe, kept in rotated files, sent to the
journal within a budget of its own; its input, a pipe of its own, for ``vmhostctl console``."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from qemu.qmp import QMPError
from systemd import journal

from ..config import ConsoleConfig
from ..journal import CONSOLE_IDENTIFIER, FIELD_VM, journal_connected
from .argv import console_with_input
from .rotating import RotatingFile

if TYPE_CHECKING:
    from .qmp import QmpSession

log = logging.getLogger(__name__)

CHUNK: Final = 16384  # < the smallest rotation size: a file never outgrows its cap
GATHER: Final = 0.05
"""The console's reading pauses this long after a short read, so QEMU's one-byte writes
gather in the pipe (64 KiB: QEMU only waits beyond ~1.3 MB/s) rather than wake the loop
each: at most 20 wakeups a second however the guest prints."""


async def read_console(
    pipe: IO[bytes],
    config: ConsoleConfig,
    state_dir: Path,
    on_console: Callable[[bytes], None] | None,
) -> None:
    """Serial output goes to console.log as is (rotated by size: the guest decides how
    much it prints, so the host caps what it keeps), and to ``on_console``.

    Read straight from the pipe, not through a transport, which would read
    each byte as it comes: what is read is handled before the next await, so
    a handover needs no quiescing here and the rest stays in the pipe.
    """
    out = RotatingFile(state_dir / "console.log", config.file_kib * 1024, config.files)
    with contextlib.closing(pipe), contextlib.closing(out):  # also when cancelled
        while True:
            await _readable(pipe.fileno())
            chunk = pipe.read(CHUNK)
            if chunk is None:  # woken for nothing
                continue
            if not chunk:
                return
            out.write(chunk)
            if on_console is not None:
                on_console(chunk)
            if len(chunk) < CHUNK:
                await asyncio.sleep(GATHER)  # the next bytes gather in the pipe


class ConsoleInput:
    """The serial console's input: a pipe whose write end only vmhost holds (QEMU reads the
    other), handed over at a reload like the output pipe; ``fd`` is -1 while there is none.

    One page (4 KiB): a guest that reads no input holds that much of it, not 64 KiB of
    stale keys.  vmhost writes it without blocking; QEMU reads as the guest's UART takes.
    """

    def __init__(self) -> None:
        self.fd = -1
        self._change: dict[str, object] | None = None

    def open(self, console_fd: int) -> int:
        """A new pipe for a QEMU about to start whose console writes ``console_fd`` (its
        number in QEMU); the read end is returned, to be passed to QEMU and closed here."""
        self.close()
        read, self.fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, 4096)
        self._change = console_with_input(console_fd, read)
        return read

    def adopt(self, fd: int) -> None:
        """The write end a previous vmhost handed over (-1 from one that had none)."""
        self.fd = fd

    async def connect(self, qmp: QmpSession) -> None:
        """Give QEMU's serial chardev its input, keeping its output (QMP ``chardev-change``:
        QEMU 7.2's ``file`` chardev has no ``input-path=`` on the command line, 8.1 has).
        Without it the console is only read."""
        if self._change is None or self.fd < 0:
            return
        try:
            await qmp.execute("chardev-change", arguments=self._change)
        except (QMPError, OSError, TimeoutError) as e:
            log.warning("the serial console takes no input: %s", e)
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():  # a loop may call it again before the waiter runs
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def console_logger(vm: str, lines_per_second: int) -> Callable[[bytes], None]:
    """Guest serial-console output -> one journal record per line, attributed to the VM,
    within a budget.  Outside systemd it drops the output: console.log already has it.
    """
    if not journal_connected():
        return _discard
    return ConsoleJournal(vm, lines_per_second)


class ConsoleJournal:
    """Console lines to the journal under a token bucket of their own.

    journald rate-limits a unit as a whole: a guest printing at full speed
    would have it drop vmhost's STOPPED/CRASHED records too, and every line
    sent costs the event loop.  So at most ``lines_per_second`` lines (bursts
    of ten seconds' worth) are sent; the rest are only counted (a split and a
    count per chunk, nothing per line), and the count is reported by vmhost
    itself, at most once a second.
    """

    BURST_SECONDS: Final = 10
    REPORT_INTERVAL: Final = 1.0
    MAX_LINE: Final = 65536
    """A longer line is cut: the guest chooses what it prints, not what vmhost holds."""

    def __init__(
        self, vm: str, lines_per_second: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.vm = vm
        self.rate = lines_per_second
        self.burst = float(lines_per_second * self.BURST_SECONDS)
        self.clock = clock
        self.tokens = self.burst
        self.last = self.reported = clock()
        self.dropped = 0
        self._partial = b""

    def __call__(self, chunk: bytes) -> None:
        *lines, partial = (self._partial + chunk).split(b"\n")
        self._partial = partial[-self.MAX_LINE :]
        if not lines:
            return
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        sent = min(len(lines), int(self.tokens))
        self.tokens -= sent
        for line in lines[:sent]:
            journal.send(
                line[: self.MAX_LINE].decode(errors="replace").rstrip("\r"),
                SYSLOG_IDENTIFIER=CONSOLE_IDENTIFIER,
                PRIORITY=str(journal.LOG_INFO),
                **{FIELD_VM: self.vm},
            )
        self.dropped += len(lines) - sent
        if self.dropped and now - self.reported >= self.REPORT_INTERVAL:
            self._report(now)

    def _report(self, now: float) -> None:
        log.warning(
            "%d guest console lines not sent to the journal (over its budget of %d lines/s); "
            "console.log has them",
            self.dropped,
            self.rate,
            extra={"VMHOST_CONSOLE_DROPPED": str(self.dropped)},
        )
        self.dropped = 0
        self.reported = now


def _discard(_chunk: bytes) -> None:
    """Outside systemd the console line is already in console.log."""
