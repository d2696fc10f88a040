"""Live migration of the tiny guest between two ``vmhost serve`` on this host.

``python3 -m bench.migration [--runs N] [--memory MIB ...]`` boots the guest under one vmhost,
starts a second as the target (as ``vmhostctl receive`` does), asks the first to migrate
over loopback TCP, and reads QEMU's own figures from the source's final ``watch`` line:
the RAM sent, the total time, and the guest's downtime (``query-migrate``'s ``downtime``:
the vCPUs stopped on the source until they run on the target).  The guest migrates back
and forth, so each run starts from a guest that ran a while.  Writes bench/migration.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from vmhost import marks
from vmhost.client import Client
from vmhost.errors import ClientError

from .lifecycle import BOOT_TIMEOUT, GUEST_CACHE, _guest_builder, _guest_config
from .targets import environment, free_port, serve_argv

OUT: Final = Path(__file__).resolve().parent / "migration.md"
_DONE: Final = re.compile(r"migrated: (\d+) MiB sent in ([\d.]+) s, downtime (\d+) ms")


def _serve(vmdir: Path, config: Path) -> subprocess.Popen[bytes]:
    argv = serve_argv("bench", config, vmdir / "vmhost.sock", vmdir)
    log = (vmdir / "vmhost.log").open("ab")
    return subprocess.Popen(argv, env=environment(), stdout=log, stderr=log)


def _until(what: str, check: Callable[[], bool], timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        time.sleep(0.05)


def _state(vmdir: Path) -> str:
    try:
        return Client(vmdir / "vmhost.sock", detail=True).status().vm_state
    except ClientError:
        return ""


def _end(vmdir: Path, config: Path, port: int) -> Path:
    """A VM directory with ``config`` listening for migrations on ``port``."""
    vmdir.mkdir()
    text = config.read_text() + f'[migration]\nlisten_address = "127.0.0.1"\nport = {port}\n'
    text = re.sub(r"ssh_port = \d+", f"ssh_port = {free_port()}", text)
    (vmdir / "guest.toml").write_text(text)
    return vmdir / "guest.toml"


def run(workdir: Path, runs: int, memory_mib: int) -> list[tuple[int, float, int]]:
    """(MiB sent, seconds, downtime ms) per migration."""
    builder = _guest_builder()
    image = builder.build(GUEST_CACHE)
    disk = builder.fresh_disk(image, workdir / "disk.img")
    base = _guest_config(workdir, image.kernel, image.initrd, disk)
    base.write_text(base.read_text().replace("memory_mib = 256", f"memory_mib = {memory_mib}"))
    ports = [free_port(), free_port()]
    ends = [workdir / "a", workdir / "b"]
    configs = [_end(d, base, p) for d, p in zip(ends, ports, strict=True)]
    procs = {0: _serve(ends[0], configs[0])}
    figures = []
    try:
        _until("guest", lambda: b"TINYGUEST READY" in _console(ends[0]))
        for i in range(runs):
            src, dst = i % 2, (i + 1) % 2
            marks.request_incoming(ends[dst])
            procs[dst] = _serve(ends[dst], configs[dst])
            _until("target", lambda: _state(ends[dst]) == "incoming")  # noqa: B023
            time.sleep(1)  # the guest runs a while on the source
            changes = Client(ends[src] / "vmhost.sock").watch()
            next(changes)
            Client(ends[src] / "vmhost.sock").migrate(f"tcp:127.0.0.1:{ports[dst]}")
            done = next(m for c in changes if (m := _DONE.search(c.message)))
            figures.append((int(done[1]), float(done[2]), int(done[3])))
            if procs[src].wait(30) != 9:
                raise RuntimeError(f"the source vmhost did not exit 9 (run {i})")
            _until("running target", lambda: _state(ends[dst]) == "running")  # noqa: B023
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(60)
    return figures


def _console(vmdir: Path) -> bytes:
    try:
        return (vmdir / "console.log").read_bytes()
    except FileNotFoundError:
        return b""


def report(figures: list[tuple[int, float, int]], memory_mib: int) -> str:
    sent = [f[0] for f in figures]
    took = [f[1] for f in figures]
    down = [f[2] for f in figures]
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    return (
        f"# Live migration of the tiny guest, {memory_mib} MiB (loopback TCP, TCG)\n\n"
        f"`python3 -m bench.migration --runs {len(figures)}`, {when};"
        f" {os.cpu_count()} CPUs, load average {load:.1f} at the end.\n\n"
        "| | median | min | max |\n|---|--:|--:|--:|\n"
        f"| RAM sent (MiB) | {statistics.median(sent):g} | {min(sent)} | {max(sent)} |\n"
        f"| total time (s) | {statistics.median(took):.2f} | {min(took):.2f} | {max(took):.2f} |\n"
        f"| downtime (ms) | {statistics.median(down):g} | {min(down)} | {max(down)} |\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.migration")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--memory", type=int, nargs="+", default=[256, 1024], help="guest MiB")
    args = parser.parse_args()
    texts = []
    for memory in args.memory:
        with tempfile.TemporaryDirectory(prefix="vmhost-bench-migration-") as tmp:
            texts.append(report(run(Path(tmp), args.runs, memory), memory))
    text = "\n".join(texts)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
