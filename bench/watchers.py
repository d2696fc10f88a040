"""Watchers beside the load: a good client's ``status`` latency with 100 watchers and one
that never reads, against the same server without them.

``python3 -m bench.watchers [--seconds S] [--rounds N]`` runs this scenario alone and
prints its figures (``python3 -m bench`` runs it among the others).  The stand-in
publishes a change once a second (already more than a VM ever does: the watchers are
all but idle), then 30 times a second, a stress in which the deaf watcher's backlog
overflows during a run.  Rounds alternate without and with watchers so drift on a
shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final

import msgspec

from . import load, proc
from .targets import REPO, StandIn, environment

WATCHERS: Final = 100
CHANGES_PER_SECOND: Final = (1.0, 30.0)
"""The first is the one judged against the goal: watchers that are all but idle."""
CLIENTS: Final = 16
_WATCH: Final = b'{"method":"watch"}\n'


class Side(msgspec.Struct, kw_only=True):
    """What the watchers' process saw in one round."""

    lines_min: int
    lines_max: int
    deaf_dropped: bool


class Watchers(msgspec.Struct, kw_only=True):
    watchers: int
    changes_per_second: float
    clients: int
    without: list[load.Run]
    with_watchers: list[load.Run]
    sides: list[Side]
    rss_without_kib: int
    rss_with_kib: int

    @property
    def p99_without_us(self) -> float:
        return proc.median([r.p99_us for r in self.without])

    @property
    def p99_with_us(self) -> float:
        return proc.median([r.p99_us for r in self.with_watchers])


def measure(work: Path, loadgen: Path, seconds: float, rounds: int) -> list[Watchers]:
    return [_measure(work, loadgen, seconds, rounds, rate) for rate in CHANGES_PER_SECOND]


def _measure(
    work: Path, loadgen: Path, seconds: float, rounds: int, changes_per_second: float
) -> Watchers:
    target = StandIn(work, "uvloop", changes=changes_per_second)
    try:
        load.run_one(loadgen, target, "status", "conn", CLIENTS, min(seconds, 0.5))
        rss_without = proc.rss_kib(target.pid)
        without, with_watchers, sides = [], [], []
        rss_with = 0
        for _ in range(rounds):
            without.append(load.run_one(loadgen, target, "status", "conn", CLIENTS, seconds))
            watchers = _spawn_watchers(target.sock)
            try:
                rss_with = max(rss_with, proc.rss_kib(target.pid))
                with_watchers.append(
                    load.run_one(loadgen, target, "status", "conn", CLIENTS, seconds)
                )
                rss_with = max(rss_with, proc.rss_kib(target.pid))
            finally:
                watchers.send_signal(signal.SIGTERM)
                out, _ = watchers.communicate(timeout=10)
            sides.append(msgspec.json.decode(out, type=Side))
    finally:
        target.close()
    return Watchers(
        watchers=WATCHERS,
        changes_per_second=changes_per_second,
        clients=CLIENTS,
        without=without,
        with_watchers=with_watchers,
        sides=sides,
        rss_without_kib=rss_without,
        rss_with_kib=rss_with,
    )


def _spawn_watchers(sock: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "bench.watchers", "client", str(sock), str(WATCHERS)]
    process = proc.spawn(
        argv, cpu=proc.LOAD_CPU, env=environment(), cwd=REPO, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    if process.stdout.readline() != b"watching\n":
        process.kill()
        raise RuntimeError("the watchers did not start")
    return process


def _client(path: Path, count: int) -> None:
    """``count`` watchers that read every line, one that reads nothing; on SIGTERM, one
    JSON line: the fewest and most lines a reader got, and whether the deaf one was cut."""
    stop = False

    def done(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, done)
    selector = selectors.DefaultSelector()
    lines: dict[socket.socket, int] = {}
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        sock.sendall(_WATCH)
        lines[sock] = 0
        selector.register(sock, selectors.EVENT_READ)
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.connect(str(path))
    deaf.sendall(_WATCH)
    while min(lines.values()) == 0:
        _read(selector, lines)
    print("watching", flush=True)
    while not stop:
        _read(selector, lines)
    deaf.setblocking(False)
    dropped = False
    try:
        while deaf.recv(65536):
            pass
        dropped = True
    except BlockingIOError:
        pass
    side = Side(lines_min=min(lines.values()), lines_max=max(lines.values()), deaf_dropped=dropped)
    sys.stdout.buffer.write(msgspec.json.encode(side) + b"\n")


def _read(selector: selectors.BaseSelector, lines: dict[socket.socket, int]) -> None:
    for key, _ in selector.select(0.2):
        sock = key.fileobj
        assert isinstance(sock, socket.socket)
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the server closed a watcher that reads")
        lines[sock] += data.count(b"\n")


def report(scenarios: list[Watchers]) -> list[str]:
    """The markdown section."""
    rows = ["## Watchers", ""]
    for w in scenarios:
        rows += _report(w)
    return rows


def _report(w: Watchers) -> list[str]:
    ratio = w.p99_with_us / w.p99_without_us
    rows = [
        f"Stand-in (uvloop), {w.changes_per_second:g} changes a second; `status`, one "
        f"request per connection, {w.clients} clients, without and then with {w.watchers} "
        "reading watchers plus one that never reads, alternating.",
        "",
        "| round | p99 without | p99 with | req/s without | req/s with | server CPU/req "
        "without | with | lines per watcher | deaf one dropped |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for n, (a, b, side) in enumerate(zip(w.without, w.with_watchers, w.sides, strict=True), 1):
        rows.append(
            f"| {n} | {a.p99_us:,.0f} µs | {b.p99_us:,.0f} µs | {a.rps:,.0f} | {b.rps:,.0f} | "
            f"{a.server_cpu_us_per_request:.1f} µs | {b.server_cpu_us_per_request:.1f} µs | "
            f"{side.lines_min}-{side.lines_max} | {'yes' if side.deaf_dropped else 'no'} |"
        )
    rows += [
        "",
        f"Median p99: {w.p99_without_us:,.0f} µs without, {w.p99_with_us:,.0f} µs with "
        f"({ratio:.2f}x). Server RSS {w.rss_without_kib / 1024:.1f} MiB without, "
        f"{w.rss_with_kib / 1024:.1f} MiB with the watchers "
        f"({(w.rss_with_kib - w.rss_without_kib) / (w.watchers + 1):.1f} KiB per watcher).",
        "",
    ]
    return rows


def main() -> int:
    if sys.argv[1:2] == ["client"]:
        _client(Path(sys.argv[2]), int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(prog="python3 -m bench.watchers", description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="per load run (default 2)")
    parser.add_argument("--rounds", type=int, default=10, help="without/with pairs (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmhost-bench-") as tmp:
        work = Path(tmp)
        results = measure(work, load.build(work), args.seconds, args.rounds)
    print("\n".join(report(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
