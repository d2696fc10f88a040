"""The control server as its tests reach it: one request as the Go client makes it, bytes until
the server closes, a connection left in the kernel's queue, a server in a thread of its own for
blocking clients; and every test that takes ``event_loop_policy`` runs twice, on uvloop (what
``vmhost serve`` uses) and on the stdlib loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from conftest import FakeController

from vmhost.control.connection import Limits
from vmhost.control.server import Server

STATUS = b'{"ok":true,"state":"running"}\n'
STOPPING = b'{"ok":true,"state":"stopping"}\n'
WATCH = b'{"method":"watch"}\n'


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


def send_queued(path: Path, line: bytes) -> socket.socket:
    """Connect and send, without an await: the connection waits in the kernel's queue."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    client.sendall(line)
    return client


@contextlib.contextmanager
def served_in_thread(path: Path, controller: FakeController) -> Iterator[Path]:
    """A real Server on uvloop in its own thread, so a test talks to it with blocking sockets."""
    ready = threading.Event()
    loop = uvloop.new_event_loop()
    done: asyncio.Future[None] = loop.create_future()

    async def serve() -> None:
        async with Server(controller, path, limits=Limits(request_timeout=2.0)):
            ready.set()
            await done

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(5)
    yield path
    loop.call_soon_threadsafe(done.set_result, None)
    thread.join(5)
