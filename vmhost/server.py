"""The control server: one listening unix socket, many short connections.

The event loop's own unix server and transports carry the bytes (uvloop in
``vmhost serve``; the stdlib loop works too, slower).  Each connection is an
``asyncio.Protocol`` that frames requests as Go's server does, one JSON value
at a time (:class:`vmhost.protocol.Scanner` keeps its place between reads, so
no byte is scanned twice), and answers ``status``/``info`` with bytes encoded
once per VM state; the exact lines Go's and our clients send skip parsing.

Limits keep one client from hurting the others: a request must fit in
``max_request`` bytes and arrive within ``request_timeout`` of the connect (or
of the previous answer); past ``max_connections`` the longest-idle connection
is dropped to make room; a pipelining client gets a turn of 64 answers, then
waits for the others; a client that stops reading stops being read, and is
dropped at its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, cast

import msgspec

from . import __version__, protocol
from .errors import AlreadyRunningError
from .protocol import Request, Response, Scanner
from .streams import LogSource, Streams, Watch
from .vm.state import VMState

if TYPE_CHECKING:
    from .attach import Consoles
    from .vm.state import Changes

log = logging.getLogger(__name__)


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

    @property
    def changes(self) -> Changes:
        """What ``watch`` subscribes to."""
        ...

    @property
    def stop_timeout(self) -> float:
        """Seconds the running stop was granted (a request may ask for more than allowed)."""
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
_ENDED: Final = protocol.error_response("vmhost is exiting")
_LINES_PER_TURN: Final = 64
"""Pipelined requests answered in a row before the other connections get their turn."""
_TURNS_PER_SLICE: Final = 4
"""Turns run before the loop looks at new I/O again (about a millisecond)."""
_KNOWN_LINES: Final = {
    protocol.encode_request(Request(method=method, detail=detail)): (method, detail)
    for method in (protocol.STATUS, protocol.INFO)
    for detail in (False, True)
}
"""The exact bytes Go's and our clients send for status/info, mapped to what they ask."""
_BACKLOG: Final = socket.SOMAXCONN
"""The loop calls listen() again: as long a queue as systemd's default ``Backlog=`` gives (the
kernel caps both at ``net.core.somaxconn``, 4096 by default), and as :func:`bind` asks for."""
_QUEUED_MAX: Final = 512
_QUEUED_SECONDS: Final = 0.05
"""At close: how many queued connections are answered, and how long that may take."""


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
        consoles: Consoles | None = None,
    ) -> None:
        self.controller = controller
        self.limits = limits
        self._listen = listen
        self._pid_file = pid_file
        self._sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._connections: dict[_Connection, None] = {}
        self.streams = Streams(controller, logs, limits.max_log_streams, consoles)
        self._tasks: set[asyncio.Task[None]] = set()
        self._cache: dict[tuple[str, bool], bytes] = {}
        self._cached_for: tuple[VMState | None, str] = (None, "")
        self._turns: deque[_Connection] = deque()
        self._turn_runner: asyncio.Handle | None = None
        self.closing = False
        """Set by :meth:`close`: every connection gets one answer, then is closed."""

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        sock = self._listen if isinstance(self._listen, socket.socket) else bind(self._listen)
        self._sock = sock
        loop = asyncio.get_running_loop()
        factory = functools.partial(_Connection, self)
        self._server = await loop.create_unix_server(factory, sock=sock, backlog=_BACKLOG)
        if self._pid_file is not None:
            self._pid_file.write_text(f"{os.getpid()}\n")
        self._sweeper = loop.call_later(1.0, self._sweep)

    async def close(self) -> None:
        """Stop listening; answer what the kernel queued meanwhile (bounded); drop the rest."""
        if self._server is None or self._sock is None:
            return
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if isinstance(self._listen, Path):
            with contextlib.suppress(FileNotFoundError):
                self._listen.unlink()
        queue = self._sock.dup()  # the loop closes its socket: the queue lives on in this one
        self._server.close()
        with queue:
            await self._answer_queued(queue)
        if self._turn_runner is not None:
            self._turn_runner.cancel()
        for conn in [*self._connections, *self.streams.logs, *self.streams.watches]:
            conn.transport.abort()
        if self.streams.consoles is not None:
            self.streams.consoles.end("vmhost is exiting")
        for task in self._tasks:
            task.cancel()  # waits for a VM that is gone, or that outlives us
        self._server = self._sock = None
        if self._pid_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self._pid_file.unlink()

    async def _answer_queued(self, queue: socket.socket) -> None:
        """Connections a client made before we stopped listening get their one answer.

        Accepted in rounds until a round finds none, so a client that connects while the
        last round is being answered is answered too; bounded in count and time all told."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _QUEUED_SECONDS
        factory = functools.partial(_Connection, self)
        left = _QUEUED_MAX
        while left and loop.time() < deadline:
            accepted: list[socket.socket] = []
            with contextlib.suppress(OSError):  # BlockingIOError: none left; EMFILE: no room
                while len(accepted) < left:
                    accepted.append(queue.accept()[0])
            if not accepted:
                return
            left -= len(accepted)
            connected = await asyncio.gather(
                *(loop.connect_accepted_socket(factory, sock) for sock in accepted)
            )
            await self._wait_closed([conn for _, conn in connected], deadline - loop.time())

    async def drain(self, timeout: float, last_line: str) -> socket.socket:
        """Stop accepting (new clients wait in the listen backlog), end log streams and
        watches with ``last_line``, give open connections ``timeout`` to finish, then drop
        the rest.

        For a re-exec: the returned socket holds the backlog for the next vmhost to
        answer; :meth:`resume` serves it again if the exec does not happen.
        """
        assert self._server is not None and self._sock is not None
        self._sock = self._sock.dup()  # the loop closes its socket: the backlog lives on here
        self._server.close()
        self._server = None
        await asyncio.sleep(0)  # the loop calls connection_made soon after accept: let it
        farewell = protocol.encode_response(Response(ok=True, message=last_line))
        for conn in [*self.streams.logs, *self.streams.watches]:
            conn.finish(farewell)
        if self.streams.consoles is not None:
            self.streams.consoles.end(last_line, resume=True)
        await self._wait_closed([*self._connections, *self.streams.logs], timeout)
        for conn in [*self._connections, *self.streams.logs]:
            conn.transport.abort()
        return self._sock

    async def resume(self) -> None:
        """Serve again after :meth:`drain` (the re-exec did not happen)."""
        assert self._sock is not None
        factory = functools.partial(_Connection, self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(factory, sock=self._sock, backlog=_BACKLOG)

    @staticmethod
    async def _wait_closed(conns: list[_Connection], timeout: float) -> None:
        """Until each of ``conns`` is closed, or ``timeout``."""
        loop = asyncio.get_running_loop()
        waits = []
        for conn in conns:
            if not conn.transport.is_closing():
                conn.closed = loop.create_future()
                waits.append(conn.closed)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*waits)

    def answer(self, request: Request) -> bytes | None:
        """The encoded answer to one request; ``None`` for a streaming method."""
        method = request.method
        if method in (protocol.STATUS, protocol.INFO):
            return self.state_answer(method, request.detail)
        if method in (protocol.STOP, protocol.FORCE_STOP):
            if self.closing:  # the VM is gone already
                return _STOPPING
            c = self.controller
            if method == protocol.FORCE_STOP:
                self._spawn(c.force_stop())
                return _STOPPING
            asked = request.timeout_seconds
            if asked <= 0:
                asked = protocol.DEFAULT_STOP_TIMEOUT
            self._spawn(c.stop(asked))
            return self._stop_detail(asked) if request.detail else _STOPPING
        if self.streams.serves(method):
            return _ENDED if self.closing else None
        return protocol.error_response(f"unknown method: {method}")

    def _stop_detail(self, asked: int) -> bytes:
        """A stop's answer with the detail fields: the time the running chain was granted."""
        c = self.controller
        granted = c.stop_timeout
        message = f"stop timeout {granted:g} s"
        if asked > granted:
            message += f" (asked {asked} s: clamped to [stop] max_timeout_seconds)"
        response = Response(ok=True, state="stopping", vm_state=c.state.value, message=message)
        return protocol.encode_response(response)

    def state_answer(self, method: str, detail: bool) -> bytes:
        """``status``/``info``, encoded once per VM state and reused until the state changes."""
        state, step = self.controller.state, self.controller.step
        cached_state, cached_step = self._cached_for
        if state is not cached_state or step != cached_step:  # no enum hashing per request
            self._cache.clear()
            self._cached_for = (state, step)
        cached = self._cache.get((method, detail))
        if cached is None:
            cached = self._cache[method, detail] = self._encode_state(method, detail, state, step)
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
            response.version = __version__
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

    def admit(self, conn: _Connection) -> None:
        if len(self._connections) >= self.limits.max_connections:
            oldest = next(iter(self._connections))
            del self._connections[oldest]
            oldest.transport.abort()
        self._connections[conn] = None

    def touch(self, conn: _Connection) -> None:
        """Move ``conn`` to the young end, so dict order is idle order."""
        if self._connections.pop(conn, 0) is None:
            self._connections[conn] = None

    def wait_turn(self, conn: _Connection) -> None:
        """Queue a pipelining connection for its next turn."""
        self._turns.append(conn)
        if self._turn_runner is None:
            self._turn_runner = asyncio.get_running_loop().call_soon(self._run_turns)

    def _run_turns(self) -> None:
        """A few turns, then back to the loop: new requests wait for a slice, not a round."""
        try:
            for _ in range(min(len(self._turns), _TURNS_PER_SLICE)):
                conn = self._turns.popleft()
                try:
                    conn.next_turn()
                except Exception:  # costs its connection, never the other pipeliners
                    log.exception("control connection failed")
                    conn.transport.abort()
        finally:
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

    def stream(self, conn: _Connection, request: Request) -> None:
        """Hand ``conn`` to its stream; it leaves the idle-connection bookkeeping."""
        self._connections.pop(conn, None)
        self.streams.start(conn, request)

    def forget(self, conn: _Connection) -> None:
        self._connections.pop(conn, None)
        if conn.stream is not None:
            conn.stream.cancel()


class _Connection(asyncio.Protocol):
    """One client: its unanswered bytes, the value being scanned, its place in the limits."""

    __slots__ = (
        "answered",
        "buffer",
        "closed",
        "drained",
        "paused",
        "scanner",
        "server",
        "since",
        "stream",
        "transport",
        "waiting",
        "watch",
    )

    transport: asyncio.Transport

    def __init__(self, server: Server) -> None:
        self.server = server
        self.buffer = bytearray()
        """Everything after the last value answered; the scanner's place is in it."""
        self.scanner: Scanner | None = None
        """Made at the first partial or unusual request: most clients never need one."""
        self.answered = False
        self.waiting = False
        self.since = time.monotonic()
        self.stream: asyncio.Future[None] | None = None
        self.paused = False
        self.drained: asyncio.Event | None = None
        self.closed: asyncio.Future[None] | None = None
        """Set by :meth:`Server.close` for a connection it waits for."""
        self.watch: Watch | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.server.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        if self.closed is not None:
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.drained is not None:
            self.drained.set()
        if not self.waiting:  # else its turn comes and carries on
            self.next_turn()
        if self.watch is not None:
            self.watch.send()

    def data_received(self, data: bytes) -> None:
        if self.stream is not None:
            return
        if not self.buffer and (known := _KNOWN_LINES.get(data)) is not None:
            # What nearly every client sends, whole in one read: no parsing to do.
            self.transport.write(self.server.state_answer(*known))
            self._answered()
            return
        self.buffer += data
        self._serve(False)

    def eof_received(self) -> bool:
        if self.watch is not None:  # the watcher went away (or will send nothing more)
            self.transport.close()
            return True
        idle = not self.buffer and self.answered  # Go closes it in silence: nothing to scan
        if self.stream is None and not idle and not self.transport.is_closing():
            self._serve(True)
        if self.stream is None:
            self.transport.close()
        return True

    def _serve(self, eof: bool) -> None:
        """Answer every complete value in the buffer, up to this client's turn."""
        buf, limit = self.buffer, self.server.limits.max_request
        answers: list[bytes] = []
        last = False
        try:
            while (buf or eof) and not last:
                if (self.paused or len(answers) == _LINES_PER_TURN) and not eof:
                    # Answers pile up unread, or this client had its turn: hold the rest.
                    if not self.paused:
                        self._pause_for_others()
                    break
                request, end = self._next_value(buf, limit, eof)
                if request is None:
                    if len(buf) > limit:
                        answers.append(_TOO_LARGE)
                        last = True
                    break
                del buf[:end]
                self.scanner = None
                answer = request if isinstance(request, bytes) else self.server.answer(request)
                if answer is None:
                    assert isinstance(request, Request)
                    self.server.stream(self, request)
                    break
                answers.append(answer)
                last = self.server.closing
        except msgspec.DecodeError as e:
            if str(e) != "EOF" or not (self.answered or answers):  # Go: nothing at all came
                answers.append(protocol.invalid_request(str(e)))
            last = True
        if answers:
            self.transport.write(answers[0] if len(answers) == 1 else b"".join(answers))
            self._answered()
        if last:
            self._close()

    def _next_value(
        self, buf: bytearray, limit: int, eof: bool
    ) -> tuple[Request | bytes | None, int]:
        """The next request (or its answer, for a known line) and where it ends in ``buf``;
        ``None`` while it is not complete.  At EOF, Go's error for what is missing is raised."""
        scanner = self.scanner
        if scanner is None:
            scanner = self.scanner = Scanner()
        if not scanner.kind:
            # At a value's start: a whole line of the usual kind needs no scanner.
            start = scanner.pos = protocol.skip_space(buf, scanner.pos)
            nl = buf.find(b"\n", start, limit)
            if nl >= 0:
                line = bytes(buf[start : nl + 1])
                if (known := _KNOWN_LINES.get(line)) is not None:
                    return self.server.state_answer(*known), nl + 1
                if (request := protocol.decode_plain(line)) is not None:
                    return request, nl + 1
        end = scanner.scan(buf, min(len(buf), limit))
        if end < 0 and eof:
            end = scanner.at_eof()
        if end < 0:
            return None, -1
        return scanner.request(buf), end

    def _pause_for_others(self) -> None:
        """A pipelining client waits while every other ready connection is served."""
        if not self.waiting:
            self.waiting = True
            self.transport.pause_reading()
            self.server.wait_turn(self)

    def next_turn(self) -> None:
        """Answer held requests; read again only once they are all answered."""
        self.waiting = False
        if self.paused or self.transport.is_closing():
            return  # resume_writing carries on, or there is no one left to answer
        if self.buffer:
            self._serve(False)
        if not (self.waiting or self.paused or self.transport.is_closing()):
            self.transport.resume_reading()

    def _answered(self) -> None:
        """Restart the idle clock: the request timeout counts from the last answer."""
        self.answered = True
        self.since = time.monotonic()
        self.server.touch(self)
        if self.server.closing:
            self._close()

    def _close(self) -> None:
        self.buffer.clear()
        self.transport.close()

    def finish(self, answer: bytes) -> None:
        """Write a last answer and close; the rest of the input is dropped."""
        self.transport.write(answer)
        self._close()

    def expire(self) -> None:
        if self.transport.get_write_buffer_size():
            # Unread answers for a whole timeout: closing would wait on this peer forever.
            self.transport.abort()
        elif self.scanner is not None and self.scanner.kind:
            self.finish(_TIMED_OUT)
        else:
            self.transport.close()
        self.server.forget(self)


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
