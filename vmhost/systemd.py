"""The guest console's lines in the journal, under a budget of their own."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from systemd import journal

from .journal import CONSOLE_IDENTIFIER, FIELD_VM, journal_connected

_log = logging.getLogger(__name__)


def console_logger(vm: str, lines_per_second: int) -> Callable[[bytes], None]:
    """Guest serial-console output -> one journal record per line, attributed to the VM,
    within a budget.  Outside systemd it drops the output: console.log already has it.
    """
    if not journal_connected():
        return _drop
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
        _log.warning(
            "%d guest console lines not sent to the journal (over its budget of %d lines/s); "
            "console.log has them",
            self.dropped,
            self.rate,
            extra={"VMHOST_CONSOLE_DROPPED": str(self.dropped)},
        )
        self.dropped = 0
        self.reported = now


def _drop(_chunk: bytes) -> None:
    """Outside systemd the console line is already in console.log."""
