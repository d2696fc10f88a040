"""Abusive and hostile clients against a real ``vmhost serve`` running the tiny guest.

Each abuse runs while a well-behaved client (the project's own ``Client``, in
a separate process so the abusers' CPU does not count against it) asks for
``status`` in a loop.  That client must see no error and a p99 within 10 times
its quiet value (measured just before; the absolute figures belong to the bench);
the server must survive, close what it should, and keep its memory bounded:
its RSS is sampled from /proc throughout and may not grow by more than
``RSS_BOUND``.  The access rules are test_access.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
from conftest import VM
from fixtures import ENV, Vmhost

from vmhost.client import Client
from vmhost.control import wire
from vmhost.control.connection import Limits
from vmhost.control.server import Server
from vmhost.service import EXIT_OK

MakeVM = Callable[..., VM]
VmhostFor = Callable[[VM], Vmhost]
Abuse = Callable[[Path], Coroutine[Any, Any, str]]

P99_FACTOR: Final = 10
P99_FLOOR: Final = 0.010
"""The good client's p99 under abuse: within 10x its quiet p99, or 10 ms on a quiet machine."""
RSS_BOUND: Final = 64 * 1024 * 1024
"""Growth allowed over the idle server; the measured growth is printed with each test."""
TIMEOUT: Final = Limits().request_timeout
SWEEP: Final = 1.0
"""The server looks for expired connections once a second."""
FLOOD: Final = 1000
_STATUS: Final = wire.encode_request(wire.Request(method="status"))

GOOD_CLIENT: Final = """
import json, sys, time
from vmhost.client import Client
from vmhost.errors import VmhostError
path, seconds = sys.argv[1], float(sys.argv[2])
client = Client(path, deadline=5.0)
latencies, errors = [], []
end = time.monotonic() + seconds
while time.monotonic() < end:
    start = time.perf_counter()
    try:
        state = client.status().state
        if state != "running":
            errors.append(f"state {state}")
    except VmhostError as e:
        errors.append(str(e))
    latencies.append(time.perf_counter() - start)
    time.sleep(0.005)
print(json.dumps({"latencies": latencies, "errors": errors}))
"""


@pytest.fixture
def served(make_vm: MakeVM, vmhost_for: VmhostFor) -> Vmhost:
    """A booted guest under ``vmhost serve``: the target of every abuse here."""
    vm = vmhost_for(make_vm())
    vm.boot()
    return vm


# -- measuring -------------------------------------------------------------------


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def descriptors(pid: int) -> int:
    """Open descriptors: past the idle baseline, one per connection (readlink on each costs)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Sampler:
    """RSS and socket count of one process, every 50 ms, in a thread."""

    pid: int
    rss: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.rss.append(rss(self.pid))
            self.fds.append(descriptors(self.pid))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def good_client(path: Path, seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", GOOD_CLIENT, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        env=ENV,
    )


def good_client_result(good: subprocess.Popen[bytes], seconds: float) -> tuple[list[float], Any]:
    out, _ = good.communicate(timeout=seconds + 30)
    result = json.loads(out)
    return result["latencies"], result["errors"]


def under_abuse(
    vm: Vmhost, abuse: Abuse, seconds: float, factor: float = P99_FACTOR, floor: float = P99_FLOOR
) -> None:
    """Run ``abuse`` against vm while a good client polls status; check what both saw."""
    quiet, _ = good_client_result(good_client(vm.socket, 2), 2)  # for comparison only
    baseline_rss, baseline_fds = rss(vm.pid), descriptors(vm.pid)
    sampler = Sampler(vm.pid)
    good = good_client(vm.socket, seconds)
    try:
        summary = asyncio.run(abuse(vm.socket))
        latencies, errors = good_client_result(good, seconds)
    finally:
        sampler.stop()
        if good.poll() is None:
            good.kill()
    growth = max(sampler.rss) - baseline_rss
    held = max(sampler.fds) - baseline_fds
    print(
        f"\n{summary}; good client: {len(latencies)} status, {len(errors)} errors, "
        f"p99 {p99(latencies) * 1000:.2f} ms (quiet: {p99(quiet) * 1000:.2f} ms), "
        f"max {max(latencies) * 1000:.2f} ms; server: {held} connections held at most, "
        f"RSS {baseline_rss / 2**20:.1f} MiB +{growth / 2**20:.1f} MiB peak"
    )
    assert errors == []
    assert len(latencies) > seconds * 20, "the good client was starved"
    assert p99(latencies) <= max(factor * p99(quiet), floor)
    assert growth < RSS_BOUND
    assert vm.status().vm_state == "running"
    # Everything the abusers opened is gone again: nothing lingers past its timeout.
    assert descriptors(vm.pid) <= baseline_fds + 1


async def connect(path: Path) -> socket.socket:
    """A raw non-blocking socket: asyncio streams would hide an answer behind EPIPE."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, str(path))
    return sock


async def send(sock: socket.socket, data: bytes) -> bool:
    """Send all of ``data``; False if the server closed first (it may have answered)."""
    try:
        await asyncio.get_running_loop().sock_sendall(sock, data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


async def read_to_eof(sock: socket.socket, timeout: float) -> bytes:
    """What the server sent until it closed; ``TimeoutError`` if it never closed."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await loop.sock_recv(sock, 65536):
                data += chunk
    return data


async def hung_up(sock: socket.socket, timeout: float) -> None:
    """Until the server closes its end, without reading what it sent."""
    poll = select.poll()
    poll.register(sock, select.POLLRDHUP)
    async with asyncio.timeout(timeout):
        while not poll.poll(0):
            await asyncio.sleep(0.1)


# -- the abuses ----------------------------------------------------------------------


async def slowloris(path: Path, clients: int = 100) -> str:
    """One byte a second: each is cut at the request timeout with an answer saying so."""

    async def one() -> float:
        sock = await connect(path)
        started = time.monotonic()

        async def dribble() -> None:
            for byte in _STATUS:
                if not await send(sock, bytes([byte])):
                    return
                await asyncio.sleep(1.0)

        dripping = asyncio.create_task(dribble())
        answer = await read_to_eof(sock, TIMEOUT + SWEEP + 5)
        dripping.cancel()
        sock.close()
        assert answer == wire.invalid_request("timed out waiting for the rest of the request")
        return time.monotonic() - started

    cut_after = await asyncio.gather(*(one() for _ in range(clients)))
    assert max(cut_after) < TIMEOUT + SWEEP + 1
    return f"slowloris: {clients} cut after {min(cut_after):.1f}-{max(cut_after):.1f} s"


async def flood(path: Path, clients: int = FLOOD) -> str:
    """Connections opened at once and left silent: all held, then all closed at the timeout."""
    started = time.monotonic()
    socks = await asyncio.gather(*(connect(path) for _ in range(clients)))
    opened = time.monotonic() - started
    answers = await asyncio.gather(*(read_to_eof(sock, TIMEOUT + SWEEP + 5) for sock in socks))
    for sock in socks:
        sock.close()
    assert answers == [b""] * clients
    return f"flood: {clients} connections opened in {opened:.2f} s, all closed by the server"


async def half_closed(path: Path, rounds: int = 200) -> str:
    """Requests followed by EOF, bare EOFs, cut requests, and clients gone before the answer."""

    async def answered(data: bytes) -> bytes:
        sock = await connect(path)
        await send(sock, data)
        sock.shutdown(socket.SHUT_WR)
        answer = await read_to_eof(sock, 2.0)
        sock.close()
        return answer

    async def vanish() -> None:
        sock = await connect(path)
        await send(sock, _STATUS)
        sock.close()

    ok_line = b'{"ok":true,"state":"running"}\n'
    for _ in range(rounds):
        full, bare, cut, _ = await asyncio.gather(
            answered(_STATUS), answered(b""), answered(_STATUS[:10]), vanish()
        )
        assert full == ok_line
        assert bare == wire.invalid_request("EOF")  # as Go answers nothing at all
        assert wire.decode_response(cut).error.startswith("invalid request: ")
    return f"half-closed: {rounds} x (request+EOF, bare EOF, cut request+EOF, vanished)"


async def never_read(path: Path, clients: int = 100) -> str:
    """Pipelined requests and never a read: the server stops reading them, then drops them."""

    async def one() -> int:
        sock = await connect(path)
        sent = 0
        stalled = time.monotonic() + 1.0
        while time.monotonic() < stalled:  # until the server has stopped reading us for 1 s
            try:
                sent += sock.send(_STATUS * 4096)
                stalled = time.monotonic() + 1.0
            except BlockingIOError:
                await asyncio.sleep(0.05)
        await hung_up(sock, TIMEOUT + SWEEP + 5)
        sock.close()
        return sent // len(_STATUS)

    sent = await asyncio.gather(*(one() for _ in range(clients)))
    return f"never-read: {clients} clients pipelined {min(sent)}-{max(sent)} requests each, dropped"


async def oversized(path: Path, clients: int = 50) -> str:
    """Lines past 64 KiB, with and without newline: 'request too large', then closed."""
    too_large = wire.invalid_request("request too large")

    async def one(data: bytes) -> None:
        sock = await connect(path)
        await send(sock, data)
        answer = await read_to_eof(sock, 5.0)
        sock.close()
        assert answer == too_large

    lines = [
        b"[" * 5000 + b"1" * 2**20,
        b" " * 2**20 + b"\n",
        b'{"method":"' + b"s" * 2**20 + b'"}\n',
    ]
    await asyncio.gather(*(one(lines[i % len(lines)]) for i in range(clients)))
    return f"oversized: {clients} lines of 1 MiB refused"


async def dribblers(path: Path, clients: int = 20, seconds: float = 5.0) -> str:
    """60 KB requests whose last KB comes a byte per send, over and over: each read costs the
    server the new bytes only, never a new look at the 59 KB before them."""
    request = b'{"method":"status"' + b" " * (60_000 - 20) + b"}"
    head, tail = request[:-1000], request[-1000:]
    end = time.monotonic() + seconds

    async def one() -> int:
        answered = 0
        while time.monotonic() < end:
            sock = await connect(path)
            await send(sock, head)
            for i in range(len(tail)):
                await send(sock, tail[i : i + 1])
                await asyncio.sleep(0.001)  # a byte per read, at a rate the good client shares
            sock.shutdown(socket.SHUT_WR)
            assert await read_to_eof(sock, TIMEOUT) == b'{"ok":true,"state":"running"}\n'
            sock.close()
            answered += 1
        return answered

    answered = await asyncio.gather(*(one() for _ in range(clients)))
    return f"dribblers: {clients} clients, {sum(answered)} requests of 60 KB, a byte at a time"


async def pipeliners(path: Path, clients: int = 3, seconds: float = 5.0) -> str:
    """Clients that pipeline requests as fast as they can and read every answer."""
    loop = asyncio.get_running_loop()

    async def one() -> int:
        sock = await connect(path)
        answered = 0

        async def write() -> None:
            while await send(sock, _STATUS * 8192):
                pass

        async def read() -> None:
            nonlocal answered
            while chunk := await loop.sock_recv(sock, 2**20):
                answered += chunk.count(b"\n")

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await asyncio.gather(write(), read())
        sock.close()
        return answered

    answered = await asyncio.gather(*(one() for _ in range(clients)))
    rate = sum(answered) / seconds
    return f"pipeliners: {clients} clients got {rate:.0f} answers/s together"


async def everything(path: Path) -> str:
    results = await asyncio.gather(
        slowloris(path, 30),
        flood(path, FLOOD),
        half_closed(path, 50),
        never_read(path, 30),
        oversized(path, 20),
        pipeliners(path, 1, TIMEOUT),
    )
    return "all at once: " + "; ".join(results)


# -- the tests ---------------------------------------------------------------------------


@pytest.mark.slow
def test_slowloris(served: Vmhost) -> None:
    """100 clients at one byte a second are cut at the timeout; the good client never waits."""
    under_abuse(served, slowloris, TIMEOUT + SWEEP)


@pytest.mark.slow
def test_flood_of_connections(served: Vmhost) -> None:
    """1,000 silent connections are all held, then closed; the good client never notices."""
    under_abuse(served, flood, TIMEOUT + SWEEP)


@pytest.mark.slow
def test_half_closed_connections(served: Vmhost) -> None:
    """Half-closed and vanishing clients get their answer or a clean close, nothing else."""
    under_abuse(served, half_closed, 5)


@pytest.mark.slow
def test_clients_that_never_read(served: Vmhost) -> None:
    """Clients that never read are paused, then dropped at the timeout; memory stays bounded."""
    under_abuse(served, never_read, TIMEOUT + SWEEP)


@pytest.mark.slow
def test_oversized_lines(served: Vmhost) -> None:
    """1 MiB lines are refused without buffering them; the good client is unaffected."""
    under_abuse(served, oversized, 5)


@pytest.mark.slow
def test_dribbled_requests(served: Vmhost) -> None:
    """20 clients sending 60 KB a byte at a time: the good client's p99 stays within 2x quiet."""
    under_abuse(served, dribblers, 5, factor=2)


@pytest.mark.slow
def test_pipelining_clients(served: Vmhost) -> None:
    """Clients pipelining at full speed get their turn, not the whole server."""
    under_abuse(served, pipeliners, 5)


@pytest.mark.slow
def test_all_abuses_at_once(served: Vmhost) -> None:
    """Every abuse together; then a normal stop still ends the VM cleanly."""
    under_abuse(served, everything, TIMEOUT + SWEEP)
    assert Client(served.socket).stop(10).state == "stopping"
    assert served.wait(15) == EXIT_OK


async def test_slow_reader_gets_every_answer(server: Server, sock_path: Path) -> None:
    """Pipelined requests held back while the client does not read are all answered, in order."""
    count = 50_000
    sock = await connect(sock_path)
    sender = asyncio.create_task(send(sock, _STATUS * count))
    await asyncio.sleep(0.5)
    assert not sender.done(), "the server kept reading a client that does not read"
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(10):
        while data.count(b"\n") < count:
            data += await loop.sock_recv(sock, 65536)
    assert await sender
    sock.close()
    assert data.splitlines() == [b'{"ok":true,"state":"running"}'] * count
