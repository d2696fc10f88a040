"""The control server: one listening unix socket, many short connections.

The common exchange is one tiny request per connection, so per-connection
cost is what matters.  Each connection is an ``asyncio.Protocol`` (the
parsing, no task or reader object per client) driven by a minimal transport
of our own: all sockets sit in ONE private epoll set that the event loop
watches as a single reader, a new connection is read at once (a Go client
has written its request before we accept it), and the answers to
``status``/``info`` are pre-encoded bytes keyed by the VM state.  Compared
with asyncio's or uvloop's transports this saves the per-connection
bookkeeping (handles, weak references, scheduled callbacks) that cost more
than the request itself, and it runs the same on either loop.

Limits keep one client from hurting the others: a request must fit in
``max_request`` bytes and arrive within ``request_timeout`` of the connect (or
of the previous answer); past ``max_connections`` the longest-idle connection
is dropped to make room; a client that stops reading stops being read.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final, Protocol, cast

import msgspec

from . import protocol
from .errors import AlreadyRunningError, VmhostError
from .protocol import Request, Response, VMState

log = logging.getLogger(__name__)

LogSource = Callable[[int, bool], AsyncIterator[str]]
"""``(lines, follow)`` → formatted journal lines, for the ``logs`` extension."""


class Controller(Protocol):
    """What the server needs from the VM; :class:`vmhost.controller.QemuController` is one."""

    @property
    def state(self) -> VMState: ...

    @property
    def ssh_port(self) -> int: ...

    @property
    def backend(self) -> str: ...

    @property
    def pid(self) -> int: ...

    @property
    def step(self) -> str:
        """The stop chain's step running now, "" outside a stop."""
        ...

    def stop(self, timeout: float) -> Awaitable[None]:
        """Start a graceful stop now; the result resolves once the VM is gone."""
        ...

    def force_stop(self) -> Awaitable[None]:
        """Start killing the VM now; the result resolves once it is gone."""
        ...

    async def wait(self) -> None: ...


class Limits(msgspec.Struct, frozen=True):
    max_request: int = protocol.MAX_REQUEST_BYTES
    request_timeout: float = 10.0
    max_connections: int = 4096
    max_log_streams: int = 16


_TOO_LARGE: Final = protocol.invalid_request("request too large")
_TIMED_OUT: Final = protocol.invalid_request("timed out waiting for the rest of the request")
_STOPPING: Final = protocol.encode_response(Response(ok=True, state="stopping"))
_LINES_PER_TURN: Final = 64
"""Pipelined requests answered in a row before the other connections get their turn."""
_TURNS_PER_SLICE: Final = 4
"""Turns run between two looks at new I/O (about a millisecond)."""
_KNOWN_LINES: Final = {
    protocol.encode_request(Request(method=method, detail=detail)): (method, detail)
    for method in (protocol.STATUS, protocol.INFO)
    for detail in (False, True)
}
"""The exact bytes Go's and our clients send for status/info, mapped to what they ask."""
_EVENTS_PER_WAKEUP: Final = 256
_ACCEPTS_PER_WAKEUP: Final = 64
_READ_SIZE: Final = 256 * 1024  # as asyncio: a bad request is read whole before the answer
_HIGH_WATER: Final = 64 * 1024
_LOW_WATER: Final = 16 * 1024
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_IN: Final = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_AF_UNIX: Final = int(socket.AF_UNIX)
_SOCK_STREAM: Final = int(socket.SOCK_STREAM)
_DONTWAIT: Final = int(socket.MSG_DONTWAIT)


class Server:
    """Serves the control protocol for one controller until closed.

    ``listen`` is an already-listening socket (socket activation) or a path to
    bind; only a path we bound ourselves is removed on close, as is the PID file.
    """

    def __init__(
        self,
        controller: Controller,
        listen: socket.socket | Path,
        *,
        pid_file: Path | None = None,
        limits: Limits = Limits(),  # noqa: B008 - frozen
        logs: LogSource | None = None,
    ) -> None:
        self.controller = controller
        self.limits = limits
        self._listen = listen
        self._pid_file = pid_file
        self._logs = logs
        self._sock: socket.socket | None = None
        self._epoll: select.epoll | None = None
        self._transports: dict[int, _Transport] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._connections: dict[_Connection, None] = {}
        self._streams: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cache: dict[tuple[str, bool, VMState, str], bytes] = {}
        self._turns: deque[_Connection] = deque()
        self._turn_runner: asyncio.Handle | None = None

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        sock = self._listen if isinstance(self._listen, socket.socket) else bind(self._listen)
        # Listened on already (by bind or by systemd): the kernel's backlog is kept.
        sock.setblocking(False)
        self._sock = sock
        self._epoll = select.epoll()
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        loop = asyncio.get_running_loop()
        loop.add_reader(self._epoll.fileno(), self._ready)
        if self._pid_file is not None:
            self._pid_file.write_text(f"{os.getpid()}\n")
        self._sweeper = loop.call_later(1.0, self._sweep)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._turn_runner is not None:
            self._turn_runner.cancel()
        if self._epoll is not None:
            asyncio.get_running_loop().remove_reader(self._epoll.fileno())
            for transport in list(self._transports.values()):
                transport.abort()
            self._epoll.close()
            self._epoll = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if isinstance(self._listen, Path):
            with contextlib.suppress(FileNotFoundError):
                self._listen.unlink()
        if self._pid_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self._pid_file.unlink()

    def _ready(self) -> None:
        """Everything the epoll set has for us; an event is only a hint (reads never block)."""
        assert self._epoll is not None and self._sock is not None
        listen_fd = self._sock.fileno()
        transports = self._transports
        for fd, events in self._epoll.poll(0, _EVENTS_PER_WAKEUP):
            if fd == listen_fd:
                self._accept()
            elif (transport := transports.get(fd)) is not None:
                transport.ready(events)

    def _accept(self) -> None:
        assert self._epoll is not None and self._sock is not None
        # socket.accept() builds two enums and a Python-level socket per call: the C
        # method and a C socket object cost a fraction, and this runs per request.
        accept: Callable[[], tuple[int, object]] = self._sock._accept  # type: ignore[attr-defined]
        transports = self._transports
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                fd, _ = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    self._pause_accepting(e)
                    return
                continue  # the client gave up before we accepted: nothing to serve
            transport = transports[fd] = _Transport(self, fd)
            # A Go client writes right after connecting: answer first, join the epoll set after.
            transport.read()
            transport.watch()

    def _pause_accepting(self, error: OSError) -> None:
        """Out of descriptors or memory: stop accepting for a second rather than spin."""
        assert self._epoll is not None and self._sock is not None
        log.error("cannot accept control connections: %s; retrying in 1 s", error)
        self._epoll.modify(self._sock.fileno(), 0)
        asyncio.get_running_loop().call_later(1.0, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._epoll is not None and self._sock is not None:
            self._epoll.modify(self._sock.fileno(), select.EPOLLIN)

    def _closed(self, fd: int) -> None:
        self._transports.pop(fd, None)

    def answer(self, request: Request) -> bytes | None:
        """The encoded answer to one request; ``None`` for the streaming ``logs`` method."""
        method = request.method
        if method in (protocol.STATUS, protocol.INFO):
            return self.state_answer(method, request.detail)
        if method == protocol.STOP:
            timeout = request.timeout_seconds
            if timeout <= 0:
                timeout = protocol.DEFAULT_STOP_TIMEOUT
            self._spawn(self.controller.stop(timeout))
            return _STOPPING
        if method == protocol.FORCE_STOP:
            self._spawn(self.controller.force_stop())
            return _STOPPING
        if method == protocol.LOGS and self._logs is not None:
            return None
        return protocol.error_response(f"unknown method: {method}")

    def state_answer(self, method: str, detail: bool) -> bytes:
        """``status``/``info``, encoded once per VM state and reused until the state changes."""
        state = self.controller.state
        key = (method, detail, state, self.controller.step)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._encode_state(*key)
        return cached

    def _encode_state(self, method: str, detail: bool, state: VMState, step: str) -> bytes:
        c = self.controller
        response = Response(ok=True, state=state.wire)
        if method == protocol.INFO:
            response.ssh_port = c.ssh_port
            response.backend = c.backend
        if detail:
            response.vm_state = state.value
            response.pid = c.pid
            response.message = step  # the stop chain's step, while stopping
        return protocol.encode_response(response)

    def _spawn(self, awaitable: Awaitable[None]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("control request failed: %s", exc, exc_info=exc)

    def _admit(self, conn: _Connection) -> None:
        if len(self._connections) >= self.limits.max_connections:
            oldest = next(iter(self._connections))
            del self._connections[oldest]
            oldest.transport.abort()
        self._connections[conn] = None

    def _touch(self, conn: _Connection) -> None:
        """Move ``conn`` to the young end, so dict order is idle order."""
        del self._connections[conn]
        self._connections[conn] = None

    def wait_turn(self, conn: _Connection) -> None:
        """Queue a pipelining connection for its next turn."""
        self._turns.append(conn)
        if self._turn_runner is None:
            self._turn_runner = asyncio.get_running_loop().call_soon(self._run_turns)

    def _run_turns(self) -> None:
        """A few turns, then back to the loop: new requests wait for a slice, not a round."""
        # While callbacks are ready the loop polls without sleeping, and then Linux does
        # not always report our (nested) epoll as readable: look at it ourselves.
        if self._epoll is not None:
            self._ready()
        for _ in range(min(len(self._turns), _TURNS_PER_SLICE)):
            self._turns.popleft().next_turn()
        # Decided only now, so the turns queued meanwhile never start a second runner.
        loop = asyncio.get_running_loop()
        self._turn_runner = loop.call_soon(self._run_turns) if self._turns else None

    def _sweep(self) -> None:
        deadline = time.monotonic() - self.limits.request_timeout
        expired = []
        for conn in self._connections:
            if conn.since > deadline:
                break
            expired.append(conn)
        for conn in expired:
            conn.expire()
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    def stream_logs(self, conn: _Connection, request: Request) -> None:
        assert self._logs is not None
        self._connections.pop(conn, None)
        if len(self._streams) >= self.limits.max_log_streams:
            conn.finish(protocol.error_response("too many log streams"))
            return
        self._streams.add(conn)
        lines = request.lines if request.lines > 0 else 10
        task = asyncio.ensure_future(_pump_logs(conn, self._logs(lines, request.follow)))
        conn.stream = task
        task.add_done_callback(lambda _: self._streams.discard(conn))

    def forget(self, conn: _Connection) -> None:
        self._connections.pop(conn, None)
        if conn.stream is not None:
            conn.stream.cancel()


class _Connection(asyncio.Protocol):
    __slots__ = (
        "buffer",
        "drained",
        "held",
        "paused",
        "server",
        "since",
        "stream",
        "transport",
        "waiting",
    )

    transport: asyncio.Transport

    def __init__(self, server: Server) -> None:
        self.server = server
        self.buffer = b""
        self.held = 0
        """``buffer[held:]`` is what is left to answer: held lines are not copied per turn."""
        self.waiting = False
        self.since = time.monotonic()
        self.stream: asyncio.Future[None] | None = None
        self.paused = False
        self.drained: asyncio.Event | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.server._admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)

    def pause_writing(self) -> None:
        self.paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.drained is not None:
            self.drained.set()
        if not self.waiting:  # else its turn comes and carries on
            self.next_turn()

    def data_received(self, data: bytes) -> None:
        if self.stream is not None:
            return
        if not self.buffer and (known := _KNOWN_LINES.get(data)) is not None:
            # What nearly every client sends, whole in one read: no parsing to do.
            self.transport.write(self.server.state_answer(*known))
            self._answered()
            return
        start = 0
        if self.buffer:
            if data:
                data = self.buffer[self.held :] + data
            else:  # held lines, taken up where they stopped
                data, start = self.buffer, self.held
            self.buffer, self.held = b"", 0
        turn = _LINES_PER_TURN
        while (end := data.find(b"\n", start)) >= 0:
            if self.paused or not turn:
                # Answers pile up unread, or this client had its turn: hold the rest.
                self.buffer, self.held = data, start
                if not self.paused:
                    self._pause_for_others()
                return
            if end - start > self.server.limits.max_request:
                self.finish(_TOO_LARGE)
                return
            if not self._handle(data[start:end]):
                return
            turn -= 1
            start = end + 1
        rest = data[start:] if start else data
        if len(rest) > self.server.limits.max_request:
            self.finish(_TOO_LARGE)
        elif rest and not rest.isspace():
            self._handle_unterminated(rest)

    def _pause_for_others(self) -> None:
        """A pipelining client waits while every other ready connection is served."""
        if not self.waiting:
            self.waiting = True
            self.transport.pause_reading()
            self.server.wait_turn(self)

    def next_turn(self) -> None:
        """Answer held lines; read again only once they are all answered (or it grows)."""
        self.waiting = False
        if self.paused or self.transport.is_closing():
            return  # resume_writing carries on, or there is no one left to answer
        if self.buffer:
            self.data_received(b"")
        if not (self.waiting or self.paused or self.transport.is_closing()):
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        rest = self.buffer[self.held :]
        if rest and not rest.isspace():
            self._handle(rest)
        if self.stream is None:
            self.transport.close()
        return True

    def _handle_unterminated(self, rest: bytes) -> None:
        """Answer a request that came without its newline, as Go's decoder would."""
        try:
            request = protocol.decode_request(rest)
        except msgspec.DecodeError as e:
            if "truncated" in str(e):
                self.buffer = rest
            else:
                self.finish(protocol.invalid_request(str(e)))
            return
        self._dispatch(request)

    def _handle(self, line: bytes) -> bool:
        """Answer one line; ``False`` when the connection is done."""
        if not line or line.isspace():
            return True
        try:
            request = protocol.decode_request(line)
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            self.finish(protocol.invalid_request(str(e)))
            return False
        return self._dispatch(request)

    def _dispatch(self, request: Request) -> bool:
        answer = self.server.answer(request)
        if answer is None:
            self.server.stream_logs(self, request)
            return False
        self.transport.write(answer)
        self._answered()
        return True

    def _answered(self) -> None:
        """Restart the idle clock: the request timeout counts from the last answer."""
        self.since = time.monotonic()
        if self in self.server._connections:
            self.server._touch(self)

    def finish(self, answer: bytes) -> None:
        """Write a last answer and close; the rest of the input is dropped."""
        self.buffer, self.held = b"", 0
        self.transport.write(answer)
        self.transport.close()

    def expire(self) -> None:
        if self.transport.get_write_buffer_size():
            # Unread answers for a whole timeout: closing would wait on this peer forever.
            self.transport.abort()
        elif self.buffer:
            self.finish(_TIMED_OUT)
        else:
            self.transport.close()
        self.server.forget(self)


class _Transport(asyncio.Transport):
    """One accepted socket, in the server's epoll set, driving one :class:`_Connection`.

    Semantics as asyncio's socket transport, minus what the control socket
    never needs: writes go out at once and only the rest is buffered,
    ``pause_writing`` above 64 KiB, ``close`` after the buffer drains.
    ``connection_lost`` is called directly rather than scheduled: the
    connection object tolerates it from inside its own callbacks.
    """

    __slots__ = (
        "_closing",
        "_eof",
        "_mask",
        "_out",
        "_paused",
        "_reading",
        "_server",
        "_sock",
        "fd",
        "protocol",
    )

    def __init__(self, server: Server, fd: int) -> None:
        # No BaseTransport.__init__: its extra-info dict is never asked for here.
        self._server = server
        self._sock: _socket.socket | None = _socket.socket(_AF_UNIX, _SOCK_STREAM, 0, fd)
        self.fd = fd
        self._out = b""
        self._mask = -1  # not in the epoll set yet
        self._reading = True
        self._eof = False
        self._closing = False
        self._paused = False
        protocol = _Connection(server)
        self.protocol: _Connection | None = protocol
        protocol.connection_made(self)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def ready(self, events: int) -> None:
        if events & select.EPOLLOUT or (self._out and events & _IN):
            self._flush()
        if self._sock is None:
            return
        if self._reading and events & _IN:
            self.read()
        elif events & (select.EPOLLHUP | select.EPOLLERR) and not self._out:
            self._lose(None)  # peer gone while we were not reading (a finished log stream)

    def read(self) -> None:
        """Read what is there, if anything; an epoll event is a hint, this never blocks."""
        protocol = self.protocol
        assert self._sock is not None and protocol is not None
        try:
            data = self._sock.recv(_READ_SIZE, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lose(e)
            return
        try:
            if data:
                protocol.data_received(data)
                return
            self._eof = True
            keep_open = protocol.eof_received()
        except Exception as e:  # a failing callback costs its connection, never the server
            log.exception("control connection failed")
            self._lose(e)
            return
        if not keep_open:
            self.close()
        elif self._sock is not None:
            self._update()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._sock is None or self._closing:
            return
        if self._out:
            self._out += data
        else:
            try:
                sent = self._sock.send(data, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self._lose(e)
                return
            if sent == len(data):
                return
            self._out = bytes(data[sent:])
            self._update()
        if not self._paused and len(self._out) > _HIGH_WATER:
            self._paused = True
            assert self.protocol is not None
            self.protocol.pause_writing()

    def _flush(self) -> None:
        assert self._sock is not None
        try:
            sent = self._sock.send(self._out, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lose(e)
            return
        self._out = self._out[sent:]
        if self._paused and len(self._out) <= _LOW_WATER:
            self._paused = False
            assert self.protocol is not None
            self.protocol.resume_writing()
        if not self._out:
            if self._closing:
                self._lose(None)
            else:
                self._update()

    def watch(self) -> None:
        """Join the epoll set (if still open), to hear of the next request or the end."""
        if self._sock is not None:
            self._update()

    def _update(self) -> None:
        """Tell epoll what we wait for: input while reading, room while output is pending."""
        mask = (select.EPOLLIN if self._reading and not self._eof else 0) | (
            select.EPOLLOUT if self._out else 0
        )
        epoll = self._server._epoll
        if mask != self._mask and epoll is not None:
            if self._mask < 0:
                epoll.register(self.fd, mask)
            else:
                epoll.modify(self.fd, mask)
            self._mask = mask

    def pause_reading(self) -> None:
        self._reading = False
        self._update()

    def resume_reading(self) -> None:
        self._reading = True
        self._update()

    def is_reading(self) -> bool:
        return self._reading

    def is_closing(self) -> bool:
        return self._closing or self._sock is None

    def close(self) -> None:
        if self._closing or self._sock is None:
            return
        self._closing = True
        self._reading = False
        if self._out:
            self._update()
        else:
            self._lose(None)

    def abort(self) -> None:
        self._out = b""
        self._lose(None)

    def get_write_buffer_size(self) -> int:
        return len(self._out)

    def _lose(self, exc: Exception | None) -> None:
        """Close the socket (which also leaves the epoll set) and tell the protocol, once.

        The protocol is let go of, as asyncio's transports do: the two point at each other,
        and a cycle per connection left for the garbage collector costs more than the request.
        """
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        self._closing = True
        self._server._closed(self.fd)
        protocol, self.protocol = self.protocol, None
        assert protocol is not None
        protocol.connection_lost(exc)


async def _pump_logs(conn: _Connection, lines: AsyncIterator[str]) -> None:
    try:
        async for line in lines:
            while conn.paused:
                conn.drained = asyncio.Event()
                await conn.drained.wait()
            if conn.transport.is_closing():
                return
            conn.transport.write(protocol.encode_response(Response(ok=True, message=line)))
    except VmhostError as e:
        conn.transport.write(protocol.error_response(str(e)))
    finally:
        conn.transport.close()


def bind(path: Path, *, mode: int = 0o660) -> socket.socket:
    """A listening socket at ``path``; a stale socket file is replaced, a live server is not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(str(path))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            _remove_stale(path)
            sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _remove_stale(path: Path) -> None:
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise AlreadyRunningError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise AlreadyRunningError(f"another vmhost is already serving {path}")
