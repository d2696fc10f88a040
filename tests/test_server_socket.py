"""The control server's socket: bound or handed over by systemd, never a file replaced, and
closed with every connection the kernel accepted answered (issue 13)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import time
from pathlib import Path

import pytest
import uvloop
from conftest import FakeController
from serving import STATUS, STOPPING, ask, event_loop_policy, send_queued

from vmhost.control import server as server_module
from vmhost.control.listen import bind
from vmhost.control.server import Server
from vmhost.control.wire import Request
from vmhost.errors import AlreadyRunningError

__all__ = ["event_loop_policy"]  # a fixture, used by name
pytestmark = pytest.mark.filterwarnings("ignore:Overriding the .event_loop_policy. fixture")


def _listening(path: Path) -> socket.socket:
    """A socket as systemd passes it: listening, and held open by someone else."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(512)
    return listener


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
        clients = [send_queued(path, requests[i % 3]) for i in range(300)]
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
        kept = send_queued(path, b'{"method":"status"}\n')
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
                clients.append(send_queued(path, b'{"method":"stop"}\n'))
            return real(request)

        monkeypatch.setattr(srv, "answer", answer)
        clients.extend(send_queued(path, b'{"method":"stop"}\n') for _ in range(4))
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
            clients.append(send_queued(alias, b'{"method":"stop"}\n'))
        except ConnectionRefusedError:
            refused += 1
        return real(request)

    monkeypatch.setattr(srv, "answer", answer)
    clients.extend(send_queued(alias, b'{"method":"stop"}\n') for _ in range(4))
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
