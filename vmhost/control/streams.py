"""The long-lived answers, ``watch``, ``logs`` and ``console``: lines that keep coming.

A stream writes into a :class:`Sink` (the connection, as this module defines it:
the control server and its connections import this module, never the other way).
A stream's connection leaves the server's idle bookkeeping (no request timeout,
never evicted for room), so :class:`Streams` keeps it instead, for the server's
``close`` and ``drain`` to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncGenerator, Callable
from typing import Any, Final, Generic, Protocol, TypeVar

from ..errors import TooManyWatchersError, VmhostError
from ..vm.state import Change, Changes, Watcher
from . import wire
from .attach import Consoles
from .wire import Request, Response

log = logging.getLogger(__name__)

LogSource = Callable[[int, bool], AsyncGenerator[str, None]]
"""``(lines, follow)`` → formatted journal lines, for the ``logs`` extension."""

_WATCH_SNDBUF: Final = 8 * 1024
"""A watcher's kernel send buffer (Linux doubles it): a few dozen lines, not 200 KiB."""


class Watched(Protocol):
    """What a stream needs from the VM."""

    @property
    def pid(self) -> int: ...

    @property
    def changes(self) -> Changes:
        """What ``watch`` subscribes to."""
        ...


class Sink(Protocol):
    """Where a stream writes: its connection, which holds the stream while it runs."""

    transport: asyncio.Transport
    paused: bool
    """The transport's write buffer is full: wait for :attr:`drained`."""
    drained: asyncio.Event | None
    stream: asyncio.Future[None] | None
    """The running stream; set by the stream, cancelled when the connection goes."""
    watch: Watch | None

    def finish(self, answer: bytes) -> None:
        """Write a last answer and close."""
        ...


S = TypeVar("S", bound=Sink)


class Streams(Generic[S]):
    """The server's open streams; ``logs`` is served only with a source, and capped."""

    def __init__(
        self,
        controller: Watched,
        source: LogSource | None,
        max_logs: int,
        consoles: Consoles | None = None,
    ) -> None:
        self.controller = controller
        self.consoles = consoles
        self._source = source
        self._max_logs = max_logs
        self.logs: set[S] = set()
        self.watches: set[S] = set()
        self._change_line: tuple[Change | None, bytes] = (None, b"")

    def serves(self, method: str) -> bool:
        if method == wire.CONSOLE:
            return self.consoles is not None
        return method == wire.WATCH or (method == wire.LOGS and self._source is not None)

    def start(self, conn: S, request: Request) -> None:
        """Hand ``conn`` to the stream ``request`` asks for (one :meth:`serves`)."""
        if request.method == wire.CONSOLE:
            assert self.consoles is not None
            self.consoles.attach(conn.transport, request)  # the connection is the console's now
        elif request.method == wire.WATCH:
            self._watch(conn)
        else:
            self._stream_logs(conn, request)

    def _watch(self, conn: S) -> None:
        try:
            Watch(self, conn)
        except TooManyWatchersError as e:
            conn.finish(wire.error_response(str(e)))
            return
        self.watches.add(conn)
        assert conn.stream is not None
        conn.stream.add_done_callback(lambda _: self.watches.discard(conn))

    def finish(self, last_line: str) -> None:
        """A reload: every stream ends with ``last_line``; a console's also says where the
        output had reached, for the next attach to go on from there."""
        farewell = wire.encode_response(Response(ok=True, message=last_line))
        for conn in [*self.logs, *self.watches]:
            conn.finish(farewell)
        if self.consoles is not None:
            self.consoles.end(last_line, resume=True)

    def cut(self, why: str) -> None:
        """vmhost exits: the streams are cut; the consoles are told ``why``."""
        for conn in [*self.logs, *self.watches]:
            conn.transport.abort()
        if self.consoles is not None:
            self.consoles.end(why)

    def change_line(self, change: Change) -> bytes:
        """A change's line, encoded once for all its watchers."""
        last, line = self._change_line
        if change is not last:
            line = self._encode_change(change)
            self._change_line = (change, line)
        return line

    def _encode_change(self, change: Change) -> bytes:
        state = change.state
        return wire.encode_response(
            Response(
                ok=True,
                state=state.wire,
                vm_state=state.value,
                pid=self.controller.pid,
                message=change.message,
                event=change.event,
            )
        )

    def _stream_logs(self, conn: S, request: Request) -> None:
        assert self._source is not None
        if len(self.logs) >= self._max_logs:
            conn.finish(wire.error_response("too many log streams"))
            return
        self.logs.add(conn)
        lines = min(request.lines, wire.MAX_LOG_LINES) if request.lines > 0 else 10
        task = asyncio.ensure_future(_pump_logs(conn, self._source(lines, request.follow)))
        conn.stream = task
        task.add_done_callback(lambda _: self.logs.discard(conn))


class Watch:
    """A ``watch`` stream: the snapshot at once, then each change, written as it comes.

    Written from inside the controller's change (no task in between), so the line
    that says the VM ended is out before the server closes.  Only what the kernel
    takes is sent: the transport pauses as soon as it holds a byte, changes then
    wait in the watcher's bounded backlog, and one that overflows is dropped.
    """

    __slots__ = ("conn", "streams", "watcher")

    def __init__(self, streams: Streams[Any], conn: Sink) -> None:
        self.streams = streams
        self.conn = conn
        self.watcher: Watcher = streams.controller.changes.watch(self.send)
        conn.watch = self
        conn.stream = done = asyncio.get_running_loop().create_future()
        done.add_done_callback(lambda _: self.watcher.close())
        transport = conn.transport
        transport.set_write_buffer_limits(high=0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _WATCH_SNDBUF)
        self._write(self.watcher.snapshot)

    def send(self) -> None:
        conn, watcher = self.conn, self.watcher
        while not conn.paused and (change := watcher.take()) is not None:
            self._write(change)
        if watcher.dropped:
            log.warning(
                "watcher dropped: %d changes behind", self.streams.controller.changes.backlog
            )
            conn.transport.abort()

    def _write(self, change: Change) -> None:
        transport = self.conn.transport
        if transport.is_closing():
            return
        transport.write(self.streams.change_line(change))
        if change.state.ended:
            transport.close()


async def _pump_logs(conn: Sink, lines: AsyncGenerator[str, None]) -> None:
    try:
        async with contextlib.aclosing(lines):  # its journal reader closed now, not at a gc
            async for line in lines:
                while conn.paused:
                    conn.drained = asyncio.Event()
                    await conn.drained.wait()
                if conn.transport.is_closing():
                    return
                conn.transport.write(wire.encode_response(Response(ok=True, message=line)))
    except VmhostError as e:
        conn.transport.write(wire.error_response(str(e)))
    finally:
        conn.transport.close()
