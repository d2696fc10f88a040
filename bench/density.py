"""Many idle VMs on one host: ``python3 -m bench.density [--vms 10] [--against REV]``.

In one run, each group is N processes started side by side and measured once all of
them are up, so the shared pages are split the same way for every group:

- the anchors: the Go reference peer (tests/goracle), a bare ``python3``, and a
  ``python3`` that only imports the libraries vmhost requires;
- ``vmhost serve`` of the working tree (and of git revision REV with ``--against``),
  each with a real QEMU that boots nothing;
- idle CPU per vmhost from ``/proc/PID/task/*/schedstat`` (nanoseconds: the tick
  counts of ``/proc/PID/stat`` are too coarse for a tenth of a millisecond a second);
- exec → READY=1 (median) of the working tree's ``vmhost serve``.

Writes bench/density.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from . import compare, lifecycle, proc
from .targets import FORCE_STOP, REPO, Service, ask, environment

OUT: Final = Path(__file__).resolve().parent / "density.md"
LIBRARIES: Final = "import asyncio, uvloop, msgspec, qemu.qmp, systemd.daemon, systemd.journal"
GORACLE: Final = REPO / "tests" / "goracle"


def schedstat_ns(pid: int) -> int:
    """CPU time of every thread of ``pid``, in nanoseconds."""
    tasks = Path(f"/proc/{pid}/task")
    return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks.iterdir())


def build_go_peer(workdir: Path) -> Path:
    binary = workdir / "goracle"
    env = {
        **os.environ,
        "GOCACHE": str(workdir / "gocache"),
        "GOPATH": str(workdir / "gopath"),
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=GORACLE, env=env, check=True)
    return binary


@contextlib.contextmanager
def _group(argvs: Sequence[list[str]], ready: bytes) -> Iterator[list[int]]:
    """Processes that print ``ready`` once up; their pids while they live."""
    children = [
        subprocess.Popen(
            a, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment(), cwd=REPO
        )
        for a in argvs
    ]
    try:
        for child in children:
            assert child.stdout is not None
            if ready not in child.stdout.readline():
                raise RuntimeError(f"{argvs[0]} did not start")
        time.sleep(0.5)
        yield [c.pid for c in children]
    finally:
        for child in children:
            child.kill()
            child.wait()


def _pss_mib(pids: Sequence[int]) -> float:
    return sum(proc.Memory(p).pss for p in pids) / len(pids) / 1024


def anchors(workdir: Path, count: int) -> dict[str, float]:
    """PSS per process (MiB) of ``count`` side by side, for each anchor."""
    python = [sys.executable, "-c"]
    wait = "import sys; print('up', flush=True); sys.stdin.read()"
    groups = {
        "Go reference peer (tests/goracle)": (
            [str(build_go_peer(workdir)), str(workdir / "go-{i}.sock"), "running", "22", "qemu"],
            b"serving",
        ),
        "bare python3": ([*python, wait], b"up"),
        "python3 importing only the required libraries": ([*python, f"{LIBRARIES}; {wait}"], b"up"),
    }
    result = {}
    for label, (argv, ready) in groups.items():
        argvs = [[a.replace("{i}", str(i)) for a in argv] for i in range(count)]
        with _group(argvs, ready) as pids:
            result[label] = _pss_mib(pids)
    return result


class Fleet:
    """``count`` idle ``vmhost serve`` with QEMU, of this tree or of an exported revision."""

    def __init__(self, workdir: Path, count: int, package_root: Path | None = None) -> None:
        self.services: list[Service] = []
        env = None
        if package_root is not None:  # -S: the editable install's finder must not pick the tree
            site = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
            env = environment(PYTHONPATH=":".join([str(package_root), *site]))
        try:
            for i in range(count):
                service = Service(
                    workdir, f"vm{i:02d}", cpu=None, env=env, isolated=env is not None
                )
                self.services.append(service)
                service.wait_serving()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for service in self.services:
            with contextlib.suppress(OSError):
                ask(service.sock, FORCE_STOP)
        for service in self.services:
            service.close()

    def pss_mib(self) -> float:
        return _pss_mib([s.pid for s in self.services])

    def idle_ms_per_s(self, seconds: float) -> float:
        before = [schedstat_ns(s.pid) for s in self.services]
        started = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        used = [schedstat_ns(s.pid) - b for s, b in zip(self.services, before, strict=True)]
        return sum(used) / len(used) / elapsed / 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.density", description=__doc__)
    parser.add_argument("--vms", type=int, default=10, help="processes per group (default 10)")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measured")
    parser.add_argument("--runs", type=int, default=10, help="exec -> READY=1 repetitions")
    parser.add_argument("--against", metavar="REV", help="also vmhost serve at git REV")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="vmhost-density-") as tmp:
        work = Path(tmp)
        for label, pss in anchors(work, args.vms).items():
            rows.append((label, f"{pss:.1f} MiB", "-"))
        sides: list[tuple[str, Path | None]] = [("vmhost serve, working tree", None)]
        if args.against:
            sides.insert(
                0, (f"vmhost serve at {args.against}", compare.export(args.against, work / "old"))
            )
        for label, root in sides:
            fleet = Fleet(work / label.replace(" ", "_"), args.vms, root)
            try:
                time.sleep(1.0)  # start-up garbage settles
                pss = fleet.pss_mib()
                idle = fleet.idle_ms_per_s(args.idle)
            finally:
                fleet.close()
            rows.append((label, f"{pss:.1f} MiB", f"{idle:.3f} ms/s"))
        start = lifecycle.start_stop(work / "start", args.runs)
    ready = [r.exec_to_ready * 1000 for r in start.runs]
    text = _report(args, started, load, rows, ready)
    args.out.write_text(text)
    print(text)
    return 0


def _report(
    args: argparse.Namespace,
    started: str,
    load: float,
    rows: list[tuple[str, str, str]],
    ready: list[float],
) -> str:
    command = " ".join(["python3 -m bench.density", *sys.argv[1:]])
    lines = [
        "# Many idle VMs: footprint, idle CPU, start-up",
        "",
        f"`{command}`, {started}; {os.cpu_count()} CPUs, load average {load:.1f} at the start"
        " (a loaded machine inflates the CPU figures: cold caches on every wakeup).",
        "",
        f"{args.vms} processes of each kind side by side; PSS per process (shared pages split"
        f" among their users); idle CPU per vmhost over {args.idle:g} s from schedstat.",
        "",
        "| processes | PSS per process | idle CPU |",
        "|---|--:|--:|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        f"exec → READY=1 of the working tree's `vmhost serve` (QEMU runs, no guest boots):"
        f" median {proc.median(ready):.0f} ms (min {min(ready):.0f}, max {max(ready):.0f},"
        f" n={len(ready)}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
