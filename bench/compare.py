"""Old server against new, in one run: ``python3 -m bench --compare REV``.

The ``vmhost`` package at git revision REV is exported to a scratch
directory and served by the stand-in controller beside the working tree's;
both run alike (``-S`` with an explicit path, so the editable install's finder
cannot pick the package), pinned to the server CPU, and are measured in
interleaved rounds, so a busy moment of the shared machine hits both; the
median of the rounds is reported, with the new figure relative to the old.
"""

from __future__ import annotations

import io
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Final

import msgspec

from . import load, proc
from .load import Run
from .targets import REPO, StandIn, environment

CLIENTS: Final = (1, 16, 64)


class Side(msgspec.Struct):
    label: str
    runs: list[Run]
    idle_rss_kib: int
    peak_rss_kib: int


def export(rev: str, into: Path) -> Path:
    """The ``vmhost`` package as it was at ``rev``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "vmhost"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _stand_in(workdir: Path, name: str, package_root: Path) -> StandIn:
    site = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    env = environment(PYTHONPATH=":".join([str(package_root), str(REPO), *site]))
    return StandIn(workdir, "uvloop", name=name, env=env, python=[sys.executable, "-S"])


def compare(workdir: Path, loadgen: Path, rev: str, seconds: float, rounds: int) -> list[Side]:
    old_root = export(rev, workdir / "old")
    sides = [_stand_in(workdir, "old", old_root), _stand_in(workdir, "new", REPO)]
    labels = [f"server at {rev}", "server in the working tree"]
    try:
        idle = [proc.rss_kib(s.pid) for s in sides]
        for s in sides:  # warm-up
            load.run_one(loadgen, s, "status", "conn", 16, min(seconds, 0.5))
        cells: list[list[list[Run]]] = [[[] for _ in CLIENTS] for _ in sides]
        for _ in range(rounds):
            for i, clients in enumerate(CLIENTS):
                for side, s in zip(cells, sides, strict=True):
                    side[i].append(load.run_one(loadgen, s, "status", "conn", clients, seconds))
        return [
            Side(
                label=label,
                runs=[_median(runs) for runs in side],
                idle_rss_kib=rss,
                peak_rss_kib=proc.peak_rss_kib(s.pid),
            )
            for label, side, rss, s in zip(labels, cells, idle, sides, strict=True)
        ]
    finally:
        for s in sides:
            s.close()


def _median(runs: list[Run]) -> Run:
    """The run of median throughput; failures summed over all rounds."""
    middle = sorted(runs, key=lambda r: r.rps)[len(runs) // 2]
    return msgspec.structs.replace(
        middle,
        failed=sum(r.failed for r in runs),
        wrong=sum(r.wrong for r in runs),
    )


def table(sides: list[Side], seconds: float, rounds: int) -> str:
    old = sides[0]
    lines = [
        f"Status, one request per connection; median of {rounds} interleaved rounds of "
        f"{seconds:g} s; new relative to old in brackets.",
        "",
        "| server | c1 req/s | c16 req/s | c64 req/s | CPU per request at c16 | RSS idle / peak | "
        "failed/wrong |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for side in sides:
        rps = []
        for o, n in zip(old.runs, side.runs, strict=True):
            rel = "" if side is old else f" ({n.rps / o.rps - 1:+.0%})"
            rps.append(f"{n.rps:,.0f}{rel}")
        cpu = side.runs[1].server_cpu_us_per_request
        cpu_rel = (
            "" if side is old else f" ({cpu / old.runs[1].server_cpu_us_per_request - 1:+.0%})"
        )
        bad = sum(r.failed for r in side.runs), sum(r.wrong for r in side.runs)
        lines.append(
            f"| {side.label} | {' | '.join(rps)} | {cpu:.1f} µs{cpu_rel} | "
            f"{side.idle_rss_kib / 1024:.1f} / {side.peak_rss_kib / 1024:.1f} MiB | "
            f"{bad[0]}/{bad[1]} |"
        )
    return "\n".join(lines) + "\n"
