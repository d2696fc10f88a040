"""Many idle VMs on one host: ``python3 -m bench.density [--vms 10] [--against REV]``.

In one run, each group is N processes started side by side and measured once all of
them are up, so the shared pages are split the same way for every group:

- the anchors: the Go reference peer (tests/goracle), a bare ``python3``, and a
  ``python3`` that only imports the libraries vmhost requires;
- ``vmhost serve`` of the working tree (and of git revision REV with ``--against``),
  each with a real QEMU that boots nothing;
- idle CPU per vmhost from ``/proc/PID/task/*/schedstat`` (nanoseconds: the tick
  counts of ``/proc/PID/stat`` are too coarse for a tenth of a millisecond a second);
- exec → READY=1 (median) of the working tree's ``vmhost serve``;
- all of it under one interpreter (``--python``; by default a venv made as the package
  makes it, see :func:`packaged_python`: the bench re-runs itself under it);
- at scale (``--scale-vms``, 0 to skip): tiny guests under a container's systemd
  (tests/fleet.py, root only), started at once, listed, stopped at once.

Writes bench/density.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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


@dataclass
class Scale:
    """Seconds, for ``count`` tiny guests under a container's systemd."""

    count: int
    memory_mib: int
    load: float
    units_active: float
    guests_ready: float
    listed: float
    stopped: float


def scale(count: int) -> Scale:
    """Start ``count`` tiny guests at once, list them, stop them at once: the scale test's
    recipe (tests/fleet.py), timed."""
    _tests()
    import container
    import fleet
    import systemd_vm
    from conftest import CACHE
    from guest.build import build

    guest, venv = build(CACHE / "guest"), container.venv()
    with systemd_vm.booted("vmhost-density", venv, guest) as ct:
        vms = fleet.make_fleet(ct, venv, guest, count)
        load = os.getloadavg()[0]
        started = fleet.start_all(ct, vms)
        listed, _ = fleet.timed_list(vms[0])
        stopped = fleet.stop_all(ct)
    times = (started.units_active, started.guests_ready, listed, stopped)
    return Scale(count, fleet.MEMORY_MIB, load, *times)


def _tests() -> None:
    """tests/ on the path: the container, the guest and the fleet are the test suite's."""
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))


def packaged_python() -> Path:
    """A venv made as the package makes it: Debian's /usr/bin/python3, the code installed (not
    editable), no test tools (tests/container.py's).  The dev venv is no model of a host: an
    other build of the interpreter, an editable finder and typing_extensions at every start."""
    _tests()
    import container

    return container.venv() / "bin" / "python"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.density", description=__doc__)
    parser.add_argument("--vms", type=int, default=10, help="processes per group (default 10)")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measured")
    parser.add_argument("--runs", type=int, default=10, help="exec -> READY=1 repetitions")
    parser.add_argument("--against", metavar="REV", help="also vmhost serve at git REV")
    parser.add_argument(
        "--scale-vms", type=int, default=20, help="tiny guests at scale (default 20; 0: skip)"
    )
    parser.add_argument(
        "--python", type=Path, help="what runs vmhost and the anchors (default: packaged_python)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    python = args.python or packaged_python()
    if Path(sys.executable) == python:
        text = processes(args)
    else:  # everything per process is measured under that interpreter
        child = [str(python), "-m", "bench.density", "--vms", str(args.vms), "--idle",
                 str(args.idle), "--runs", str(args.runs), "--scale-vms", "0", "--python",
                 str(python), "--out", str(args.out)]  # fmt: skip
        if args.against:
            child += ["--against", args.against]
        subprocess.run(child, check=True, cwd=REPO, env=environment(), stdout=subprocess.DEVNULL)
        text = args.out.read_text()
    if args.scale_vms:
        text += _scale_report(scale(args.scale_vms))
    args.out.write_text(text)
    print(text)
    return 0


def processes(args: argparse.Namespace) -> str:
    """The anchors, vmhost's PSS and idle CPU, exec → READY=1: the report's first part."""
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    loads = [os.getloadavg()[0]]
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
        loads.append(os.getloadavg()[0])
        start = lifecycle.start_stop(work / "start", args.runs)
    ready = [r.exec_to_ready * 1000 for r in start.runs]
    return _report(args, started, loads, rows, (pss, idle, ready))


def _report(
    args: argparse.Namespace,
    started: str,
    loads: list[float],
    rows: list[tuple[str, str, str]],
    tree: tuple[float, float, list[float]],
) -> str:
    against = f" --against {args.against}" if args.against else ""
    command = f"python3 -m bench.density --vms {args.vms} --idle {args.idle:g} --runs {args.runs}"
    pss, idle, ready = tree
    median = proc.median(ready)
    lines = [
        "# Many VMs on one host: footprint, idle CPU, start-up, scale",
        "",
        f"`{command}{against}`, {started}; {os.cpu_count()} CPUs, load average {loads[0]:.1f}"
        " at the start (a loaded machine inflates the CPU and time figures: cold caches on"
        " every wakeup, a share of 2 CPUs).  Every process below runs"
        f" `{sys.executable}` (Python {platform.python_version()}); by default a venv made as"
        " the package makes it (Debian's python3, the code installed, no test tools).",
        "",
        f"{args.vms} processes of each kind side by side; PSS per process (shared pages split"
        f" among their users); idle CPU per vmhost over {args.idle:g} s from schedstat.",
        "",
        "| processes | PSS per process | idle CPU |",
        "|---|--:|--:|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        f"exec → READY=1 of the working tree's `vmhost serve` (QEMU runs, no guest boots;"
        f" load average {loads[1]:.1f}): median {median:.0f} ms (min"
        f" {min(ready):.0f}, max {max(ready):.0f}, n={len(ready)}).",
        "",
        "| goal (issue 28) | measured | met |",
        "|---|--:|---|",
        _goal(f"PSS ≤ 15 MiB per vmhost at {args.vms}", f"{pss:.1f} MiB", pss <= 15),
        _goal("idle CPU ≤ 0.1 ms/s per vmhost", f"{idle:.3f} ms/s", idle <= 0.1),
        _goal("exec → READY=1 ≤ 120 ms median", f"{median:.0f} ms", median <= 120),
        "",
        f"Per VM at 100 VMs: {pss * 100 / 1024:.2f} GiB of vmhost processes ({pss:.1f} MiB"
        f" each) and {idle * 100:.1f} ms of CPU per second all told ({idle * 100 / 10:.2f}% of"
        " one CPU); each QEMU and its guest come on top.",
        "",
    ]
    return "\n".join(lines)


def _goal(goal: str, measured: str, met: bool) -> str:
    return f"| {goal} | {measured} | {'yes' if met else 'NO'} |"


def _scale_report(at: Scale | None) -> str:
    if at is None:
        return ""
    lines = [
        "",
        f"## At scale: {at.count} tiny guests under systemd",
        "",
        f"{at.count} VMs of {at.memory_mib} MiB, TCG, in a systemd container (tests/fleet.py, as"
        f" tests/test_scale.py; load average {at.load:.1f} before the start).",
        "",
        "| step | seconds |",
        "|---|--:|",
        f"| `systemctl start` of all at once: every unit active | {at.units_active:.1f} |",
        f"| … every guest booted (its READY line on the console) | {at.guests_ready:.1f} |",
        f"| `vmhostctl list` over all (median of 3, process start included; goal ≤ 0.5) |"
        f" {at.listed:.2f} |",
        f"| `systemctl stop 'vmhost@*'`: every guest powered off by ACPI | {at.stopped:.1f} |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
