"""Old server against new, in one run: ``python3 -m bench --compare REV``.

The ``vmhost`` package at git revision REV is exported to a scratch
directory and served by the stand-in controller beside the working tree's;
both run alike (``-S`` with an explicit path, so the editable install's finder
cannot pick the package), pinned to the server CPU, and are measured in
interleaved rounds (which side goes first alternates), so a busy moment of
the shared machine hits both; the median of the rounds is reported, with the
new figure relative to the old.  On a loaded machine those rates move by tens
of percent between two runs of the same code, so where valgrind is installed
each side is also run under callgrind: the instructions it executes per
request do not depend on what else the machine runs.
"""

from __future__ import annotations

import io
import shutil
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
COUNTED_SECONDS: Final = 3.0
"""Of one client's load under callgrind: about a thousand requests, so start-up is left out."""


class Side(msgspec.Struct):
    label: str
    runs: list[Run]
    idle_rss_kib: int
    peak_rss_kib: int
    instructions: float | None = None
    """Per request at c1, counted by callgrind; ``None`` without valgrind."""


def export(rev: str, into: Path) -> Path:
    """The ``vmhost`` package as it was at ``rev``, with the working tree's build of the slirp
    guard (a C library QEMU preloads, built at install: git has only its source)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "vmhost"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        # Debian 12's 3.11.2 predates extraction filters (3.11.4); git's own archive is trusted.
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)
    if (into / "vmhost" / "slirp_guard.c").exists():
        for built in (REPO / "vmhost").glob("_slirp_guard*.so"):
            shutil.copy2(built, into / "vmhost")
    return into


def _stand_in(
    workdir: Path, name: str, package_root: Path, wrapper: list[str] | None = None
) -> StandIn:
    site = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    env = environment(PYTHONPATH=":".join([str(package_root), str(REPO), *site]))
    python = [*(wrapper or []), sys.executable, "-S"]
    timeout = 120.0 if wrapper else 10.0  # valgrind starts the interpreter ~50 times slower
    return StandIn(workdir, "uvloop", name=name, env=env, python=python, ready_timeout=timeout)


def instructions(workdir: Path, loadgen: Path, name: str, package_root: Path) -> float:
    """Instructions the stand-in executes per request (status, one request per connection,
    one client), counted by callgrind from after a warm-up to a dump."""
    out = workdir / f"callgrind-{name}.out"
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    s = _stand_in(workdir, f"{name}-callgrind", package_root, valgrind)
    try:
        load.run_one(loadgen, s, "status", "conn", 4, 1.0)
        subprocess.run(["callgrind_control", "--zero", str(s.pid)], check=True, capture_output=True)
        run = load.run_one(loadgen, s, "status", "conn", 1, COUNTED_SECONDS)
        subprocess.run(["callgrind_control", "--dump", str(s.pid)], check=True, capture_output=True)
    finally:
        s.close()
    if run.failed or run.wrong or not run.requests:
        raise RuntimeError(f"the {name} server under callgrind: {run}")
    (dump,) = workdir.glob(f"{out.name}.*")  # the one dump; the file itself is the exit's
    summary = next(line for line in dump.read_text().splitlines() if line.startswith("summary:"))
    return int(summary.split()[1]) / run.requests


def compare(workdir: Path, loadgen: Path, rev: str, seconds: float, rounds: int) -> list[Side]:
    roots = [export(rev, workdir / "old"), REPO]
    sides = [_stand_in(workdir, "old", roots[0]), _stand_in(workdir, "new", roots[1])]
    labels = [f"server at {rev}", "server in the working tree"]
    try:
        idle = [proc.rss_kib(s.pid) for s in sides]
        for s in sides:  # warm-up
            load.run_one(loadgen, s, "status", "conn", 16, min(seconds, 0.5))
        cells: list[list[list[Run]]] = [[[] for _ in CLIENTS] for _ in sides]
        for r in range(rounds):
            for i, clients in enumerate(CLIENTS):
                order = list(zip(cells, sides, strict=True))
                for side, s in order if r % 2 == 0 else reversed(order):
                    side[i].append(load.run_one(loadgen, s, "status", "conn", clients, seconds))
        result = [
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
    if shutil.which("valgrind") and shutil.which("callgrind_control"):
        for measured, name, root in zip(result, ("old", "new"), roots, strict=True):
            measured.instructions = instructions(workdir, loadgen, name, root)
    return result


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
        "| server | c1 req/s | c16 req/s | c64 req/s | CPU per request at c16 | "
        "instructions per request at c1 | RSS idle / peak | failed/wrong |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
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
        counted = "no valgrind"
        if side.instructions is not None and old.instructions is not None:
            rel = "" if side is old else f" ({side.instructions / old.instructions - 1:+.1%})"
            counted = f"{side.instructions:,.0f}{rel}"
        bad = sum(r.failed for r in side.runs), sum(r.wrong for r in side.runs)
        lines.append(
            f"| {side.label} | {' | '.join(rps)} | {cpu:.1f} µs{cpu_rel} | {counted} | "
            f"{side.idle_rss_kib / 1024:.1f} / {side.peak_rss_kib / 1024:.1f} MiB | "
            f"{bad[0]}/{bad[1]} |"
        )
    return "\n".join(lines) + "\n"
