"""The control server: one listening unix socket, many short connections.

Built on ``asyncio.Protocol`` rather than streams because the common exchange
is one tiny request per connection: no task or reader object per client, and
answers to ``status``/``info`` are pre-encoded bytes keyed by the VM state.

Limits keep one client from hurting the others: a request must fit in
``max_request`` bytes and arrive within ``request_timeout`` of the connect (or
of the previous answer); past ``max_connections`` the longest-idle connection
is dropped to make room; a client that stops reading stops being read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable, Coroutine
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

    async def stop(self, timeout: float) -> None: ...

    async def force_stop(self) -> None: ...

    async def wait(self) -> None: ...


class Limits(msgspec.Struct, frozen=True):
    max_request: int = protocol.MAX_REQUEST_BYTES
    request_timeout: float = 10.0
    max_connections: int = 4096
    max_log_streams: int = 16


_TOO_LARGE: Final = protocol.invalid_request("request too large")
_TIMED_OUT: Final = protocol.invalid_request("timed out waiting for the rest of the request")
_STOPPING: Final = protocol.encode_response(Response(ok=True, state="stopping"))


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
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._connections: dict[_Connection, None] = {}
        self._streams: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cache: dict[tuple[str, bool, VMState], bytes] = {}

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        sock = self._listen if isinstance(self._listen, socket.socket) else bind(self._listen)
        loop = asyncio.get_running_loop()
        # asyncio re-listens with a backlog of 100 unless told: keep the kernel maximum.
        self._server = await loop.create_unix_server(
            lambda: _Connection(self), sock=sock, backlog=socket.SOMAXCONN
        )
        if self._pid_file is not None:
            self._pid_file.write_text(f"{os.getpid()}\n")
        self._sweeper = loop.call_later(1.0, self._sweep)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
            for conn in [*self._connections, *self._streams]:
                conn.transport.abort()
            await self._server.wait_closed()
            self._server = None
        if isinstance(self._listen, Path):
            with contextlib.suppress(FileNotFoundError):
                self._listen.unlink()
        if self._pid_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self._pid_file.unlink()

    def answer(self, request: Request) -> bytes | None:
        """The encoded answer to one request; ``None`` for the streaming ``logs`` method."""
        method = request.method
        if method in (protocol.STATUS, protocol.INFO):
            state = self.controller.state
            key = (method, request.detail, state)
            cached = self._cache.get(key)
            if cached is None:
                cached = self._cache[key] = self._encode_state(method, request.detail, state)
            return cached
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

    def _encode_state(self, method: str, detail: bool, state: VMState) -> bytes:
        c = self.controller
        response = Response(ok=True, state=state.wire)
        if method == protocol.INFO:
            response.ssh_port = c.ssh_port
            response.backend = c.backend
        if detail:
            response.vm_state = state.value
            response.pid = c.pid
        return protocol.encode_response(response)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
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
    __slots__ = ("buffer", "drained", "paused", "server", "since", "stream", "transport")

    transport: asyncio.Transport

    def __init__(self, server: Server) -> None:
        self.server = server
        self.buffer = b""
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
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.stream is not None:
            return
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if end - start > self.server.limits.max_request:
                self.finish(_TOO_LARGE)
                return
            if not self._handle(data[start:end]):
                return
            start = end + 1
        rest = data[start:] if start else data
        if len(rest) > self.server.limits.max_request:
            self.finish(_TOO_LARGE)
        elif rest and not rest.isspace():
            self._handle_unterminated(rest)

    def eof_received(self) -> bool | None:
        if self.buffer and not self.buffer.isspace():
            self._handle(self.buffer)
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
        self.since = time.monotonic()
        if self in self.server._connections:
            self.server._touch(self)
        return True

    def finish(self, answer: bytes) -> None:
        """Write a last answer and close; the rest of the input is dropped."""
        self.buffer = b""
        self.transport.write(answer)
        self.transport.close()

    def expire(self) -> None:
        if self.buffer:
            self.finish(_TIMED_OUT)
        else:
            self.transport.close()
        self.server.forget(self)


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
