"""``python3 -m bench``: run every measurement and write bench/results.{md,json}.

Needs what the test suite needs (QEMU, a C compiler, the tiny guest's Debian
packages) and two CPUs: the server runs on CPU 0, the load on CPU 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import pstats
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from . import compare, lifecycle, load, proc, watchers
from .report import LoadResults, Machine, Profile, Results, targets, write
from .targets import Reference, Service, StandIn, Target

OUT = Path(__file__).resolve().parent


def _busy_share(seconds: float = 1.0) -> float:
    """Share of all CPUs that was not idle over ``seconds`` (other work competing with us)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def _machine() -> Machine:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    return Machine(
        cpu=cpu,
        cpus=os.cpu_count() or 0,
        memory_mib=mem,
        kernel=platform.release(),
        python=platform.python_version(),
        qemu=qemu,
        busy_before=_busy_share(),
    )


@contextlib.contextmanager
def _running(target: Target) -> Iterator[Target]:
    try:
        yield target
    finally:
        target.close()


def _measure(
    loadgen: Path,
    target: Target,
    seconds: float,
    repeat: int,
    methods: tuple[str, ...] = load.METHODS,
) -> LoadResults:
    idle = proc.rss_kib(target.pid)
    runs = load.matrix(loadgen, target, seconds, repeat, methods)
    return LoadResults(
        label=target.label,
        idle_rss_kib=idle,
        peak_rss_kib=max(proc.peak_rss_kib(target.pid), *(r.server_rss_kib for r in runs)),
        runs=runs,
    )


def _profile(work: Path, loadgen: Path, seconds: float) -> Profile:
    stats_path = work / "standin.prof"
    with _running(StandIn(work, "uvloop", profile=stats_path)) as target:
        load.run_one(loadgen, target, "status", "conn", 16, seconds)
    out = io.StringIO()
    stats = pstats.Stats(str(stats_path), stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(18)
    text = out.getvalue()
    top = text[text.index("   ncalls") :].rstrip().splitlines()
    return Profile(
        load=f"cProfile of the stand-in (uvloop), status, one request per connection, "
        f"16 clients, {seconds:g} s; sorted by own time. cProfile slows Python code down, "
        "so read it for the shares, not the totals.",
        top=top,
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="per load run (default 3)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="load runs per cell, the fastest kept (default 1)"
    )
    parser.add_argument("--runs", type=int, default=10, help="start/stop repetitions")
    parser.add_argument("--guest-runs", type=int, default=3, help="ACPI stop repetitions")
    parser.add_argument("--vms", type=int, default=10, help="idle VMs for the footprint")
    parser.add_argument("--quick", action="store_true", help="1 s runs, fewer repetitions")
    parser.add_argument("--out", type=Path, default=OUT, help="where results.{md,json} go")
    parser.add_argument(
        "--compare",
        metavar="REV",
        help="only: the server at git revision REV against the working tree's (compare.md)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for --compare")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.runs, args.guest_runs, args.vms = 1.0, 3, 1, 3
    if (os.cpu_count() or 0) < 2:
        parser.error("needs two CPUs: one for the server, one for the load")

    command = shlex.join(["python3", "-m", "bench", *sys.argv[1:]])
    if args.compare:
        return _compare(args.compare, args.seconds, args.rounds, args.out, command)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = _machine()
    print(f"bench: {machine.cpus} CPUs, {machine.busy_before:.0%} busy before start", flush=True)
    with tempfile.TemporaryDirectory(prefix="vmhost-bench-") as tmp:
        work = Path(tmp)
        loadgen = load.build(work)
        print("bench: reference server", flush=True)
        with _running(Reference(work, load.build(work, "refserver"))) as ref:
            reference = _measure(loadgen, ref, args.seconds, args.repeat, ("status",))
        print("bench: vmhost serve under load", flush=True)
        with _running(Service(work)) as service:
            assert isinstance(service, Service)
            service.wait_serving()
            service_results = _measure(loadgen, service, args.seconds, args.repeat)
        stand_ins = []
        for loop in ("uvloop", "asyncio"):
            print(f"bench: server alone, {loop}", flush=True)
            with _running(StandIn(work, loop)) as stand_in:
                stand_ins.append(
                    _measure(loadgen, stand_in, args.seconds, args.repeat, ("status",))
                )
        print("bench: watchers beside the load", flush=True)
        watching = watchers.measure(work, loadgen, args.seconds, max(args.repeat, 3))
        print("bench: profile", flush=True)
        profile = _profile(work, loadgen, args.seconds)
        print("bench: start and force_stop", flush=True)
        start_path = lifecycle.start_stop(work / "start", args.runs)
        print("bench: ACPI stop of the tiny guest", flush=True)
        graceful = lifecycle.graceful_stop(work / "guest", args.guest_runs)
        print(f"bench: footprint of {args.vms} idle VMs", flush=True)
        footprint = lifecycle.footprint(work / "fleet", args.vms)
    results = Results(
        command=command,
        started=started,
        seconds_per_run=args.seconds,
        repeat=args.repeat,
        machine=machine,
        reference=reference,
        service=service_results,
        stand_ins=stand_ins,
        start_path=start_path,
        graceful_stop=graceful,
        footprint=footprint,
        profile=profile,
        targets=[],
        watchers=watching,
    )
    results.targets = targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    write(results, args.out)
    for t in results.targets:
        print(f"  {'ok ' if t.met else 'NOT'} {t.name}: {t.measured} (goal {t.goal})")
    print(f"bench: wrote {args.out / 'results.md'} and results.json")
    return 0


def _compare(rev: str, seconds: float, rounds: int, out: Path, command: str) -> int:
    print(f"bench: {rev} against the working tree, {_busy_share():.0%} busy", flush=True)
    with tempfile.TemporaryDirectory(prefix="vmhost-bench-") as tmp:
        work = Path(tmp)
        sides = compare.compare(work, load.build(work), rev, seconds, rounds)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = f"# Server against {rev}\n\n`{command}`, {started}.\n\n" + compare.table(
        sides, seconds, rounds
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
