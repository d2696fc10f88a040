"""The control server's streams (`logs`, `watch`): capped, ended by the client's EOF, by a
drain or a close, and nothing served on their connection after them."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest
from conftest import FakeController
from serving import STATUS, ask, event_loop_policy, send_queued

from vmhost.control import wire
from vmhost.control.connection import Limits
from vmhost.control.server import Server
from vmhost.vm.state import Change, VMState

__all__ = ["event_loop_policy"]  # a fixture, used by name
pytestmark = pytest.mark.filterwarnings("ignore:Overriding the .event_loop_policy. fixture")


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


def _journal_watches() -> int:
    """This process's inotify descriptors: a following journal reader holds one."""
    fds = Path("/proc/self/fd")
    return sum(os.readlink(fd) == "anon_inode:inotify" for fd in fds.iterdir() if fd.exists())


async def test_a_vanished_follower_frees_the_real_journal_reader_without_a_collection(
    sock_path: Path, controller: FakeController
) -> None:
    """cysystemd's reader lets its descriptors go only when freed; the cancelled stream keeps
    no traceback that holds it (the soak saw 17 descriptors kept until a garbage collection)."""
    from vmhost.logs import entries

    def journal(lines: int, follow: bool) -> AsyncGenerator[str, None]:
        return entries("no-such-vm", lines=lines, follow=follow)

    before = _journal_watches()
    gc.disable()
    try:
        async with Server(controller, sock_path, logs=journal):
            _, writer = await asyncio.open_unix_connection(sock_path)
            writer.write(b'{"method":"logs","follow":true}\n')
            async with asyncio.timeout(5):
                while _journal_watches() == before:  # following: waiting for a record
                    await asyncio.sleep(0.01)
            writer.close()
            async with asyncio.timeout(3):
                while _journal_watches() != before:
                    await asyncio.sleep(0.01)
    finally:
        gc.enable()


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
        queued = send_queued(path, b'{"method":')  # queued at close, never completes
        await server.close()
        queued.close()
    async with asyncio.timeout(3):
        assert await reader.read() == b""
    writer.close()
    await asyncio.sleep(0.1)
    assert errors == []
