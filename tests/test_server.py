"""The control server over real unix sockets: answers, framing, bad input, limits, closing.

Every test runs on uvloop (what ``vmhost serve`` uses) and on the stdlib loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import pytest
import uvloop
from conftest import FakeController

import vmhost
from vmhost.control import server as server_module
from vmhost.control import wire
from vmhost.control.connection import Limits
from vmhost.control.listen import bind
from vmhost.control.server import Server
from vmhost.control.wire import Request
from vmhost.errors import AlreadyRunningError
from vmhost.vm.state import Change, VMState

pytestmark = pytest.mark.filterwarnings("ignore:Overriding the .event_loop_policy. fixture")

STATUS = b'{"ok":true,"state":"running"}\n'
STOPPING = b'{"ok":true,"state":"stopping"}\n'


@pytest.fixture(params=["uvloop", "asyncio"])
def event_loop_policy(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoopPolicy]:
    yield (
        uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()
    )


async def exchange(path: Path, data: bytes, *, close_write: bool = False) -> bytes:
    """Send ``data`` and read until the server closes (10 s at most)."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    if close_write:
        writer.write_eof()
    try:
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def ask(path: Path, line: bytes = b'{"method":"status"}\n') -> bytes:
    """One request per connection, as the Go client does."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(line)
    try:
        async with asyncio.timeout(10):
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
        (b'{\n  "method": "status"\n}\n', STATUS),
        (b'{"method":"status"}garbage', STATUS),
        (b'{"method":"<&>"}\n', b'{"ok":false,"error":"unknown method: \\u003c\\u0026\\u003e"}\n'),
    ],
)
async def test_answers(server: Server, sock_path: Path, line: bytes, answer: bytes) -> None:
    """Each request gets the Go server's exact bytes: newline or not, over several lines,
    followed by anything, with Go's escapes in the answer."""
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
    """stop answers stopping and has started when the answer arrives; no timeout (or 0) leaves
    it to the controller: the config's [stop] timeout_seconds."""
    assert await ask(sock_path, b'{"method":"stop","timeout_seconds":10}\n') == STOPPING
    assert controller.stops == [10]
    assert await ask(sock_path) == b'{"ok":true,"state":"stopping"}\n'
    assert await ask(sock_path, b'{"method":"stop"}\n') == STOPPING
    assert await ask(sock_path, b'{"method":"stop","timeout_seconds":0}\n') == STOPPING
    assert await ask(sock_path, b'{"method":"force_stop"}\n') == STOPPING
    assert controller.stops == [10, None, None]
    assert controller.force_stops == 1


async def test_pipelined_requests(server: Server, sock_path: Path) -> None:
    """Several requests on one connection, with or without newlines, answered in order."""
    answer = await exchange(
        sock_path,
        b'{"method":"status"}\n{"method":"bogus"}{"method":"status"}\n',
        close_write=True,
    )
    assert answer == STATUS + b'{"ok":false,"error":"unknown method: bogus"}\n' + STATUS


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"{bad json\n", b"invalid character 'b' looking for beginning of object key string"),
        (b'\xff\xfe{"method":"status"}\n', b"invalid character '\xc3\xbf' looking for beginning"),
        (
            b'{"method":7}\n',
            b"json: cannot unmarshal number into Go struct field Request.method of type",
        ),
        (b'["status"]\n', b"json: cannot unmarshal array into Go value of type vmhost.Request"),
        (b"[" * 10_001, b"invalid character '[' exceeded max depth"),
        (b'{"method":"status"' + b" " * 70000 + b"}\n", b"request too large"),
        (b" " * 70000 + b'{"method":"status"}', b"request too large"),
    ],
)
async def test_bad_input_is_answered_and_closed(
    server: Server, sock_path: Path, data: bytes, error: bytes
) -> None:
    """Bad input gets one `invalid request` answer in Go's words (or, past the size limit, a
    refusal), then the server closes the connection."""
    answer = await exchange(sock_path, data + b'{"method":"status"}\n')
    assert answer.startswith(b'{"ok":false,"error":"invalid request: ' + error)
    assert answer.count(b"\n") == 1


@pytest.mark.parametrize(
    ("data", "answer"),
    [
        (b"", b'{"ok":false,"error":"invalid request: EOF"}\n'),
        (b" \n\t ", b'{"ok":false,"error":"invalid request: EOF"}\n'),
        (b'{"method":"sta', b'{"ok":false,"error":"invalid request: unexpected EOF"}\n'),
        (b'{"method":"status"}\n  ', STATUS),
        (b"null", b'{"ok":false,"error":"unknown method: "}\n'),
    ],
)
async def test_half_close(server: Server, sock_path: Path, data: bytes, answer: bytes) -> None:
    """After a half-close, Go's answer: EOF before any value, or the value EOF completed."""
    assert await exchange(sock_path, data, close_write=True) == answer


async def test_request_split_into_many_reads(server: Server, sock_path: Path) -> None:
    """A request dribbled a byte at a time is answered once it is whole, not before."""
    reader, writer = await asyncio.open_unix_connection(sock_path)
    wire = b'{"method":\n"info"  }'
    for byte in wire[:-1]:
        writer.write(bytes([byte]))
        await writer.drain()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await reader.readline()
    writer.write(wire[-1:])
    async with asyncio.timeout(10):
        assert (await reader.readline()).startswith(b'{"ok":true,"state":"running","ssh_port"')
    writer.close()


async def test_silent_client_is_closed(server: Server, sock_path: Path) -> None:
    """A client that sends nothing is dropped after the request timeout, without an answer."""
    start = time.monotonic()
    assert await exchange(sock_path, b"") == b""
    assert time.monotonic() - start >= server.limits.request_timeout


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
    """A good client's answers keep coming while others stall, flood and send junk: none of
    its requests waits for the stalled clients' timeout (the figures are in the bench)."""
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
    assert max(latencies) < server.limits.request_timeout / 2
    for writer in stalled:
        writer.close()


async def test_a_failing_turn_does_not_wedge_the_others(
    server: Server, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in one pipelining client's turn costs that client, not the others'."""
    lines = wire.encode_request(Request(method="stop", timeout_seconds=5)) * 200
    real = server.answer
    calls = 0

    def answer(request: Request) -> bytes | None:
        nonlocal calls
        calls += 1
        if calls == 100:  # inside the second turn of the first client
            raise RuntimeError("boom")
        return real(request)

    monkeypatch.setattr(server, "answer", answer)
    first = await exchange(sock_path, lines, close_write=True)
    answered = first.count(b"\n")  # its first turn at least; never the failed one's
    assert first == STOPPING * answered and 64 <= answered < 100
    second = await exchange(sock_path, lines, close_write=True)
    assert second == STOPPING * 200


def _listening(path: Path) -> socket.socket:
    """A socket as systemd passes it: listening, and held open by someone else."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(512)
    return listener


def _send(path: Path, line: bytes) -> socket.socket:
    """Connect and send, without an await: the connection waits in the kernel's queue."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    client.sendall(line)
    return client


async def _answer(client: socket.socket) -> bytes:
    """What the server wrote back; b"" for a connection reset unanswered."""
    client.setblocking(False)
    with client, contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(10):
            return await asyncio.get_running_loop().sock_recv(client, 100)
    return b""


async def test_queued_connections_answered_at_close(
    tmp_path: Path, controller: FakeController
) -> None:
    """Connections the kernel queued before close get their answer: the final state for
    status, stopping for stop and force_stop; then close returns."""
    path = tmp_path / "s.sock"
    requests = [b'{"method":"status"}\n', b'{"method":"stop"}\n', b'{"method":"force_stop"}']
    expected = [b'{"ok":true,"state":"stopped"}\n', STOPPING, STOPPING]
    with _listening(path) as listener:
        srv = Server(controller, listener)
        await srv.start()
        assert await ask(path) == STATUS
        controller.end()
        clients = [_send(path, requests[i % 3]) for i in range(300)]
        started = time.monotonic()
        await srv.close()
        assert time.monotonic() - started < 10
    for i, client in enumerate(clients):
        assert await _answer(client) == expected[i % 3]
    assert controller.stops == [] and controller.force_stops == 0


async def test_a_request_written_just_after_the_connect_is_answered_through_a_restart(
    tmp_path: Path, controller: FakeController
) -> None:
    """A client whose connect was accepted before close (systemd's socket: a restart) but
    whose request comes 100 ms later, as on a loaded host, still gets its answer line."""
    path = tmp_path / "s.sock"
    with _listening(path) as listener:
        srv = Server(controller, listener)
        await srv.start()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        await asyncio.sleep(0.05)  # the loop has accepted it; nothing written yet
        closing = asyncio.create_task(srv.close())
        await asyncio.sleep(0.1)
        with contextlib.suppress(OSError):  # a connection aborted already: EPIPE
            client.sendall(b'{"method":"status"}\n')
        answer = await _answer(client)
        await closing
    assert answer.endswith(b"\n"), answer


async def test_idle_connections_do_not_hold_up_close(
    tmp_path: Path, controller: FakeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client between requests and one silent for longer than the grace are closed at once."""
    monkeypatch.setattr(server_module, "_GRACE_SECONDS", 0.3)
    path = tmp_path / "s.sock"
    with _listening(path) as listener:
        srv = Server(controller, listener)
        await srv.start()
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(path))
        await asyncio.sleep(0.4)
        kept = _send(path, b'{"method":"status"}\n')
        kept.setblocking(False)
        assert await asyncio.get_running_loop().sock_recv(kept, 100) == STATUS
        started = time.monotonic()
        await srv.close()
        assert time.monotonic() - started < 0.2
    assert await _answer(silent) == await _answer(kept) == b""


@pytest.mark.parametrize("chain", [40, None])
async def test_connections_made_while_closing_are_answered(
    tmp_path: Path, controller: FakeController, monkeypatch: pytest.MonkeyPatch, chain: int | None
) -> None:
    """A client that connects again while close answers the queued ones (a daemon polling
    through a stop) is answered too: close accepts until a round finds none.  Clients that
    never let up are answered up to the bound, and close returns."""
    path = tmp_path / "s.sock"
    clients: list[socket.socket] = []
    with _listening(path) as listener:
        srv = Server(controller, listener)
        await srv.start()
        controller.end()
        real = srv.answer

        def answer(request: Request) -> bytes | None:
            if chain is None or len(clients) < chain:  # each answer brings the next client
                clients.append(_send(path, b'{"method":"stop"}\n'))
            return real(request)

        monkeypatch.setattr(srv, "answer", answer)
        clients.extend(_send(path, b'{"method":"stop"}\n') for _ in range(4))
        started = time.monotonic()
        await srv.close()
        assert time.monotonic() - started < 10
    answers = [await _answer(client) for client in clients]
    if chain is not None:
        assert answers == [STOPPING] * chain
    else:  # the last client of each round connected after the bound: reset, unanswered
        answered = answers.count(STOPPING)
        assert 4 < answered <= 512 and answers[answered:] == [b""] * (len(answers) - answered)


async def test_a_final_close_answers_every_accepted_connection(
    tmp_path: Path, controller: FakeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket vmhost bound itself (`vmhost serve` by hand) closes for good: clients that never
    let up (connecting through a second name of the socket, so removing the path does not stop
    them) are answered until connects are refused; no accepted connection is reset."""
    path, alias = tmp_path / "s.sock", tmp_path / "alias.sock"
    srv = Server(controller, path)
    await srv.start()
    os.link(path, alias)
    controller.end()
    real = srv.answer
    clients: list[socket.socket] = []
    refused = 0

    def answer(request: Request) -> bytes | None:
        nonlocal refused
        try:  # each answer brings the next client
            clients.append(_send(alias, b'{"method":"stop"}\n'))
        except ConnectionRefusedError:
            refused += 1
        return real(request)

    monkeypatch.setattr(srv, "answer", answer)
    clients.extend(_send(alias, b'{"method":"stop"}\n') for _ in range(4))
    await srv.close()
    answers = [await _answer(client) for client in clients]
    assert refused > 0
    assert answers == [STOPPING] * len(clients)


async def test_out_of_descriptors_does_not_spin(
    server: Server, sock_path: Path, event_loop_policy: asyncio.AbstractEventLoopPolicy
) -> None:
    """EMFILE at accept: the server neither spins nor stops serving once descriptors are free."""
    if not isinstance(event_loop_policy, uvloop.EventLoopPolicy):
        pytest.skip("the stdlib loop logs EMFILE once per queued connection (asyncio's own)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    clients = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 20, hard))
    try:
        with pytest.raises(OSError):  # every descriptor taken: by clients or accepted ones
            for _ in range(40):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(client)
                client.setblocking(False)
                client.connect(str(sock_path))
        cpu = time.process_time()
        await asyncio.sleep(0.5)
        assert time.process_time() - cpu < 0.25, "the loop spun on accept"
    finally:
        for client in clients:
            client.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    async with asyncio.timeout(10):
        while True:
            try:
                assert await ask(sock_path) == STATUS
                break
            except (ConnectionError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.1)


async def test_socket_cleaned_up(tmp_path: Path, controller: FakeController) -> None:
    """The socket is group-writable while serving, and gone after close."""
    path = tmp_path / "s.sock"
    async with Server(controller, path):
        assert oct(path.stat().st_mode & 0o777) == "0o660"
    assert not path.exists()


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


async def test_stale_socket_replaced(tmp_path: Path, controller: FakeController) -> None:
    """A socket file left by a dead server is replaced, and the new one serves."""
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    async with Server(controller, path):
        assert await ask(path) == STATUS


def test_regular_file_not_replaced(tmp_path: Path) -> None:
    """A non-socket file at the socket path is never deleted."""
    path = tmp_path / "file.sock"
    path.write_text("keep")
    with pytest.raises(AlreadyRunningError, match="not a socket"):
        bind(path)
    assert path.read_text() == "keep"


async def test_default_request_limit(tmp_path: Path, controller: FakeController) -> None:
    """With the default limits, a 64 KiB request is served and one byte more is refused."""
    path = tmp_path / "s.sock"
    request = b'{"method":"status"' + b" " * (wire.MAX_REQUEST_BYTES - 19) + b"}"
    assert len(request) == Limits().max_request
    async with Server(controller, path):
        assert await ask(path, request) == STATUS
        refused = await exchange(path, b" " + request)
    assert refused == wire.invalid_request("request too large")


async def test_logs_capped_and_streamed(tmp_path: Path, controller: FakeController) -> None:
    """`logs` asks the journal for 10,000 lines at most, and each line goes out as it comes."""
    asked: list[tuple[int, bool]] = []
    more = asyncio.Event()

    async def journal(lines: int, follow: bool) -> AsyncGenerator[str, None]:
        asked.append((lines, follow))
        yield "first"
        await more.wait()
        yield "second"

    path = tmp_path / "s.sock"
    async with Server(controller, path, logs=journal):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b'{"method":"logs","lines":9223372036854775807,"follow":true}\n')
        async with asyncio.timeout(10):
            assert await reader.readline() == b'{"ok":true,"message":"first"}\n'
            more.set()
            assert await reader.readline() == b'{"ok":true,"message":"second"}\n'
            assert await reader.read() == b""
        writer.close()
    assert asked == [(wire.MAX_LOG_LINES, True)]


@pytest.mark.parametrize("method", [b"logs", b"watch"])
async def test_nothing_runs_after_a_stream(
    sock_path: Path, controller: FakeController, method: bytes
) -> None:
    """Requests pipelined after `logs` or `watch` are not run, however often the stream's
    writes pause and resume: no stop, no second journal reader."""
    asked: list[int] = []

    async def journal(lines: int, follow: bool) -> AsyncGenerator[str, None]:
        asked.append(lines)
        for i in range(lines):
            yield f"{i:04d}" + "x" * 1000  # far past the transport's high-water mark

    loop = asyncio.get_running_loop()
    pipelined = b'{"method":"%s","lines":300}\n{"method":"stop"}\n{"method":"logs"}\n' % method
    async with Server(controller, sock_path, logs=journal):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.setblocking(False)
            await loop.sock_connect(client, str(sock_path))
            await loop.sock_sendall(client, pipelined)
            if method == b"watch":
                await asyncio.sleep(0.1)  # subscribed: the snapshot is out
                for i in range(25):  # past the watcher's send buffer, within its backlog
                    controller.changes.publish(Change(VMState.PAUSED, f"{i:02d}" + "x" * 2000))
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # unread: the server's writes paused
            received = b""
            async with asyncio.timeout(10):
                while received.count(b"\n") < (300 if method == b"logs" else 26):
                    chunk = await loop.sock_recv(client, 1 << 16)
                    assert chunk
                    received += chunk
            await asyncio.sleep(0.2)  # the writes resumed: time for what must not happen
    assert controller.stops == [] and controller.state is not VMState.STOPPING
    assert asked == ([300] if method == b"logs" else [])
    assert received.count(b"\n") == (300 if method == b"logs" else 26)


async def test_log_streams_past_the_cap_are_refused(
    sock_path: Path, controller: FakeController
) -> None:
    """Past max_log_streams a `logs` gets an error, status still answers, and the slot of a
    client gone (seen at the next record: EOF alone may be a half-close) serves the next."""
    more = asyncio.Event()

    async def journal(lines: int, follow: bool) -> AsyncGenerator[str, None]:
        yield "a record"
        await more.wait()
        yield "another"
        await asyncio.Event().wait()

    follow = b'{"method":"logs","follow":true}\n'
    limits = Limits(max_log_streams=2)
    async with Server(controller, sock_path, limits=limits, logs=journal) as server:
        streams = [await asyncio.open_unix_connection(sock_path) for _ in range(2)]
        async with asyncio.timeout(5):
            for reader, writer in streams:
                writer.write(follow)
                assert await reader.readline() == b'{"ok":true,"message":"a record"}\n'
            assert await ask(sock_path, follow) == wire.error_response("too many log streams")
            assert await ask(sock_path) == STATUS
            streams.pop()[1].close()
            more.set()  # writing it to the closed client fails: the server forgets it
            while len(server.streams.logs) > 1:
                await asyncio.sleep(0.01)
            more.clear()
            reader, writer = await asyncio.open_unix_connection(sock_path)
            writer.write(follow)
            assert await reader.readline() == b'{"ok":true,"message":"a record"}\n'
        for _, other in [*streams, (reader, writer)]:
            other.close()


async def test_a_vanished_log_follower_releases_its_journal_reader(
    sock_path: Path, controller: FakeController
) -> None:
    """A logs -f client that goes away while no record comes: its reader is closed at once."""
    released = asyncio.Event()

    async def journal(lines: int, follow: bool) -> AsyncGenerator[str, None]:
        try:
            yield "a record"
            await asyncio.Event().wait()  # following: nothing more comes
        finally:
            released.set()  # the journal's descriptors go with it

    async with Server(controller, sock_path, logs=journal):
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"method":"logs","follow":true}\n')
        async with asyncio.timeout(3):
            assert await reader.readline() == b'{"ok":true,"message":"a record"}\n'
        writer.close()
        async with asyncio.timeout(3):
            await released.wait()


async def test_drain_ends_log_streams_and_keeps_new_clients_waiting(
    sock_path: Path, controller: FakeController
) -> None:
    """A reload's drain: a log stream gets a last line and EOF; a client that connects meanwhile
    waits in the backlog, unrefused, and is answered once accepting resumes."""

    async def journal(lines: int, follow: bool) -> AsyncGenerator[str, None]:
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
        await server.resume()
        assert await waiting == STATUS


@pytest.mark.parametrize("end", ["drain", "close"])
async def test_a_slow_client_at_drain_or_close_is_no_loop_error(
    tmp_path: Path, controller: FakeController, end: str
) -> None:
    """A client that outlasts the drain's or close's wait is dropped without a loop error."""
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    path = tmp_path / "s.sock"
    server = Server(controller, path)
    await server.start()
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b'{"method":')  # half a request: it is waited for, then dropped
    await asyncio.sleep(0.05)
    if end == "drain":
        (await server.drain(0.05, "vmhost reloaded")).close()
    else:
        controller.end()
        queued = _send(path, b'{"method":')  # queued at close, never completes
        await server.close()
        queued.close()
    async with asyncio.timeout(3):
        assert await reader.read() == b""
    writer.close()
    await asyncio.sleep(0.1)
    assert errors == []


async def test_stop_detail_says_what_was_granted(server: Server, sock_path: Path) -> None:
    """A stop asking for detail learns its timeout and that it was clamped; a Go one does not."""
    plain = await ask(sock_path, b'{"method":"stop","timeout_seconds":900}\n')
    assert plain == STOPPING
    detailed = wire.decode_response(
        await ask(sock_path, b'{"method":"stop","timeout_seconds":900,"detail":true}\n')
    )
    assert (detailed.state, detailed.vm_state) == ("stopping", "stopping")
    assert detailed.message == (
        "stop timeout 600 s (asked 900 s: clamped to [stop] max_timeout_seconds)"
    )


async def test_migrate_is_started_or_refused_with_the_reason(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    """migrate: a bad URI and a VM already migrating are refused; a stop meanwhile too."""
    bad = b'{"method":"migrate","uri":"exec:sh"}\n'
    assert await ask(sock_path, bad) == (
        b'{"ok":false,"error":"cannot migrate: not a tcp:HOST:PORT URI: \'exec:sh\'"}\n'
    )
    good = b'{"method":"migrate","uri":"tcp:host2:49152"}\n'
    assert await ask(sock_path, good) == b'{"ok":true,"state":"running","vm_state":"migrating"}\n'
    assert controller.migrations == ["tcp:host2:49152"]
    again = await ask(sock_path, good)
    assert again == b'{"ok":false,"error":"cannot migrate: the VM is migrating"}\n'
    refused = await ask(sock_path, b'{"method":"stop"}\n')
    assert b'"ok":false' in refused and b"migrating" in refused
    assert controller.stops == []
