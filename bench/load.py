"""Request throughput and latency under load from the C generator (``loadgen.c``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Final

import msgspec

from . import proc
from .targets import INFO, RUNNING, STATUS, Target

CONCURRENCY: Final = (1, 16, 64)
MODES: Final = ("conn", "persist")
METHODS: Final = ("status", "info")


class Run(msgspec.Struct, kw_only=True):
    """One load run; latencies in microseconds, CPU in seconds."""

    method: str
    mode: str
    clients: int
    requests: int
    failed: int
    wrong: int
    rps: float
    p50_us: float
    p99_us: float
    max_us: float
    server_cpu_us_per_request: float
    server_cpu_share: float
    """Server CPU seconds per wall second: near 1.0 means the server is the bottleneck."""
    loadgen_cpu_share: float
    """The generator's own CPU per wall second, on its own CPU: below 1.0 it is not the limit."""
    server_rss_kib: int
    error: str = ""


def build(workdir: Path, name: str = "loadgen") -> Path:
    """Compile ``bench/NAME.c`` for this machine; stdlib C, so only a C compiler is needed."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("the load generator needs a C compiler (apt-get install gcc)")
    binary = workdir / name
    source = Path(__file__).with_name(f"{name}.c")
    subprocess.run(
        [compiler, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(source)],
        check=True,
    )
    return binary


def run_one(
    loadgen: Path, target: Target, method: str, mode: str, clients: int, seconds: float
) -> Run:
    request, expected = (STATUS, RUNNING) if method == "status" else (INFO, target.info)
    argv = [str(loadgen), str(target.sock), mode, str(clients), str(seconds), request, expected]
    cpu_before = proc.cpu_seconds(target.pid)
    started = time.monotonic()
    gen = proc.spawn(argv, cpu=proc.LOAD_CPU, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rss = 0
    while gen.poll() is None:
        rss = max(rss, proc.rss_kib(target.pid))
        time.sleep(0.05)
    wall = time.monotonic() - started
    server_cpu = proc.cpu_seconds(target.pid) - cpu_before
    out, err = gen.communicate()
    if not out:
        raise RuntimeError(f"loadgen failed: {err.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(out)
    requests = max(int(result["requests"]), 1)
    return Run(
        method=method,
        mode=mode,
        clients=clients,
        requests=result["requests"],
        failed=result["failed"],
        wrong=result["wrong"],
        rps=result["rps"],
        p50_us=result["p50_us"],
        p99_us=result["p99_us"],
        max_us=result["max_us"],
        server_cpu_us_per_request=server_cpu / requests * 1e6,
        server_cpu_share=server_cpu / wall,
        loadgen_cpu_share=result["cpu_seconds"] / result["elapsed"],
        server_rss_kib=rss,
        error=result["error"],
    )


def best_of(
    loadgen: Path,
    target: Target,
    method: str,
    mode: str,
    clients: int,
    seconds: float,
    repeat: int,
) -> Run:
    """The fastest of ``repeat`` runs (others' work on a shared machine only slows a run
    down); failures are summed over all of them, so none is hidden."""
    runs = [run_one(loadgen, target, method, mode, clients, seconds) for _ in range(repeat)]
    best = max(runs, key=lambda r: r.rps)
    best.failed = sum(r.failed for r in runs)
    best.wrong = sum(r.wrong for r in runs)
    return best


def matrix(
    loadgen: Path,
    target: Target,
    seconds: float,
    repeat: int = 1,
    methods: tuple[str, ...] = METHODS,
) -> list[Run]:
    """Every method x mode x concurrency, after a short warm-up."""
    run_one(loadgen, target, "status", "conn", 16, min(seconds, 0.5))
    return [
        best_of(loadgen, target, method, mode, clients, seconds, repeat)
        for method in methods
        for mode in MODES
        for clients in CONCURRENCY
    ]
