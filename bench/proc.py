"""What the kernel says about a process: CPU time and memory, read from /proc."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

_TICK: Final = float(os.sysconf("SC_CLK_TCK"))
SERVER_CPU: Final = 0
"""The CPU the measured server runs on; the load runs on the other one."""
LOAD_CPU: Final = 1


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (its children not included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _kib(path: str, key: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise KeyError(f"{key} not in {path}")


def rss_kib(pid: int) -> int:
    return _kib(f"/proc/{pid}/status", "VmRSS:")


def peak_rss_kib(pid: int) -> int:
    return _kib(f"/proc/{pid}/status", "VmHWM:")


class Memory:
    """RSS, PSS (shared pages split among their users) and USS (pages only this process has)."""

    def __init__(self, pid: int) -> None:
        path = f"/proc/{pid}/smaps_rollup"
        self.rss = _kib(path, "Rss:")
        self.pss = _kib(path, "Pss:")
        self.uss = _kib(path, "Private_Clean:") + _kib(path, "Private_Dirty:")


def pinned(cpu: int) -> Callable[[], None]:
    """A ``preexec_fn`` that moves the child (and whatever it spawns) onto one CPU."""

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


def spawn(argv: Sequence[str], *, cpu: int | None, **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, preexec_fn=None if cpu is None else pinned(cpu), **kwargs)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)
