"""The control server over real unix sockets: answers, bad input, limits, neighbours unharmed."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import FakeController

import vmhost
from vmhost.errors import AlreadyRunningError
from vmhost.protocol import VMState
from vmhost.server import Limits, Server, bind

STATUS = b'{"ok":true,"state":"running"}\n'


async def exchange(path: Path, data: bytes, *, close_write: bool = False) -> bytes:
    """Send ``data`` and read until the server closes or 2 s pass."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    if close_write:
        writer.write_eof()
    try:
        async with asyncio.timeout(3):
            return await reader.read()
    finally:
        writer.close()


async def ask(path: Path, line: bytes = b'{"method":"status"}\n') -> bytes:
    """One request per connection, as the Go client does."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(line)
    try:
        async with asyncio.timeout(3):
            return await reader.readline()
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        (b'{"method":"status"}\n', STATUS),
        (
            b'{"method":"info"}\n',
            b'{"ok":true,"state":"running","ssh_port":2222,"backend":"qemu"}\n',
        ),
        (b'{"Method":"status"}\n', STATUS),
        (b'{"method":"reboot"}\n', b'{"ok":false,"error":"unknown method: reboot"}\n'),
        (b"{}\n", b'{"ok":false,"error":"unknown method: "}\n'),
        (b'{"method":"status"}', STATUS),
        (
            b'{"method":"status","detail":true}\n',
            b'{"ok":true,"state":"running","vm_state":"running","pid":4242,"version":"%s"}\n'
            % vmhost.__version__.encode(),
        ),
    ],
)
async def test_answers(server: Server, sock_path: Path, line: bytes, answer: bytes) -> None:
    """Each request gets the Go server's exact bytes, newline or not."""
    assert await ask(sock_path, line) == answer


async def test_state_changes_are_seen(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    """A cached answer follows the controller's state."""
    assert await ask(sock_path) == STATUS
    controller.state = VMState.CRASHED
    assert await ask(sock_path) == b'{"ok":true,"state":"error"}\n'


async def test_stop_and_force_stop(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    """stop answers stopping at once; a missing timeout means 30 s."""
    assert await ask(sock_path, b'{"method":"stop","timeout_seconds":10}\n') == (
        b'{"ok":true,"state":"stopping"}\n'
    )
    assert await ask(sock_path, b'{"method":"stop"}\n') == b'{"ok":true,"state":"stopping"}\n'
    assert await ask(sock_path, b'{"method":"force_stop"}\n') == (
        b'{"ok":true,"state":"stopping"}\n'
    )
    await asyncio.sleep(0.05)
    assert controller.stops == [10, 30]
    assert controller.force_stops == 1


async def test_pipelined_requests(server: Server, sock_path: Path) -> None:
    """Several newline-delimited requests on one connection get answers in order."""
    answer = await exchange(
        sock_path,
        b'{"method":"status"}\n{"method":"bogus"}\n{"method":"status"}\n',
        close_write=True,
    )
    assert answer == STATUS + b'{"ok":false,"error":"unknown method: bogus"}\n' + STATUS


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"{bad json\n", b"invalid request: JSON is malformed"),
        (b'\xff\xfe{"method":"status"}\n', b"invalid request: JSON is malformed"),
        (b'{"method":7}\n', b"invalid request: Expected `str`, got `int` - at `$.method`"),
        (b'["status"]\n', b"invalid request: cannot decode array"),
        (b'{"method":"status"' + b" " * 70000 + b"}\n", b"invalid request: request too large"),
        (b"x" * 70000, b"invalid request: request too large"),
    ],
)
async def test_bad_input_is_answered_and_closed(
    server: Server, sock_path: Path, data: bytes, error: bytes
) -> None:
    """Bad input gets one `invalid request` answer, then the server closes the connection."""
    answer = await exchange(sock_path, data + b'{"method":"status"}\n')
    assert answer.startswith(b'{"ok":false,"error":"' + error)
    assert answer.count(b"\n") == 1


async def test_silent_client_is_closed(server: Server, sock_path: Path) -> None:
    """A client that sends nothing is dropped after the request timeout, without an answer."""
    start = time.monotonic()
    assert await exchange(sock_path, b"") == b""
    assert 0.9 < time.monotonic() - start < 2.9


async def test_stalled_half_line_times_out(server: Server, sock_path: Path) -> None:
    """Half a request and a stall gets a timeout error, then the connection is closed."""
    answer = await exchange(sock_path, b'{"method":"sta')
    assert answer == (
        b'{"ok":false,"error":"invalid request: timed out waiting for the rest of the request"}\n'
    )


async def test_many_connections_at_once(server: Server, sock_path: Path) -> None:
    """200 clients at once all get answers while idle ones are still open."""
    idle = [await asyncio.open_unix_connection(sock_path) for _ in range(50)]
    answers = await asyncio.gather(*(ask(sock_path) for _ in range(200)))
    assert answers == [STATUS] * 200
    for _, writer in idle:
        writer.close()


async def test_cap_evicts_idle_not_the_newcomer(server: Server, sock_path: Path) -> None:
    """Past max_connections the oldest idle connection goes, and a new client is still served."""
    idle = [
        await asyncio.open_unix_connection(sock_path) for _ in range(server.limits.max_connections)
    ]
    assert await ask(sock_path) == STATUS
    assert await idle[0][0].read() == b""
    for _, writer in idle:
        writer.close()


async def test_abusers_do_not_slow_a_good_client(server: Server, sock_path: Path) -> None:
    """A good client's answers keep coming while others stall, flood and send junk."""
    stalled = []
    for _ in range(100):
        _, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"method":')
        stalled.append(writer)
    junk = [exchange(sock_path, b"\x00" * 5000 + b"\n") for _ in range(50)]
    latencies = []

    async def good() -> None:
        for _ in range(200):
            start = time.perf_counter()
            assert await ask(sock_path) == STATUS
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(good(), *junk)
    latencies.sort()
    assert latencies[int(len(latencies) * 0.99)] < 0.05
    for writer in stalled:
        writer.close()


async def test_pid_file_and_socket_cleaned_up(tmp_path: Path, controller: FakeController) -> None:
    """The PID file exists while serving; socket and PID file are gone after close."""
    path, pid_file = tmp_path / "s.sock", tmp_path / "vmhost.pid"
    async with Server(controller, path, pid_file=pid_file):
        assert pid_file.read_text() == f"{os.getpid()}\n"
        assert oct(path.stat().st_mode & 0o777) == "0o660"
    assert not path.exists() and not pid_file.exists()


async def test_activated_socket_is_left_in_place(
    tmp_path: Path, controller: FakeController
) -> None:
    """A socket handed over by systemd is served, and its file stays for the next instance."""
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    async with Server(controller, listener):
        assert await ask(path) == STATUS
    assert path.exists()


async def test_second_server_refused(server: Server, sock_path: Path) -> None:
    """Binding over a live server's socket is refused and the first keeps serving."""
    with pytest.raises(AlreadyRunningError, match="already serving"):
        bind(sock_path)
    assert await ask(sock_path) == STATUS


def test_stale_socket_replaced(tmp_path: Path) -> None:
    """A socket file left by a dead server is replaced."""
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    bind(path).close()


def test_regular_file_not_replaced(tmp_path: Path) -> None:
    """A non-socket file at the socket path is never deleted."""
    path = tmp_path / "file.sock"
    path.write_text("keep")
    with pytest.raises(AlreadyRunningError, match="not a socket"):
        bind(path)
    assert path.read_text() == "keep"


def test_limits_default() -> None:
    """The documented limits hold by default."""
    assert Limits().max_request == 64 * 1024


async def test_drain_ends_log_streams_and_keeps_new_clients_waiting(
    sock_path: Path, controller: FakeController
) -> None:
    """A reload's drain: a log stream gets a last line and EOF; a client that connects meanwhile
    waits in the backlog, unrefused, and is answered once accepting resumes."""

    async def journal(lines: int, follow: bool) -> AsyncIterator[str]:
        yield "a record"
        await asyncio.Event().wait()  # following: nothing more comes

    async with Server(controller, sock_path, logs=journal) as server:
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"method":"logs","follow":true}\n')
        async with asyncio.timeout(3):
            assert await reader.readline() == b'{"ok":true,"message":"a record"}\n'
        await server.drain(1.0, "vmhost reloaded")
        async with asyncio.timeout(3):
            assert await reader.readline() == b'{"ok":true,"message":"vmhost reloaded"}\n'
            assert await reader.read() == b""
        writer.close()

        waiting = asyncio.ensure_future(ask(sock_path))
        await asyncio.sleep(0.2)  # long enough to be answered, were it accepted
        assert not waiting.done()
        server.resume()
        assert await waiting == STATUS
