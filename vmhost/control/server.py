"""The control server: one listening unix socket, many short connections.

Listening (on a socket :mod:`vmhost.control.listen` binds, or handed over by systemd or
a previous vmhost), dispatch, the answers encoded once per VM state, the connection cap
and idle sweep, and two endings: :meth:`Server.close` (a final exit: what the kernel
queued is answered) and :meth:`Server.drain` (a reload: the backlog is kept for the next
vmhost).  Framing is :mod:`vmhost.control.connection`; ``watch`` and ``logs`` are
:mod:`vmhost.control.streams`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable
from pathlib import Path
from typing import Final, Protocol

from .. import __version__
from ..vm.migration import check_uri
from ..vm.state import VMState
from . import wire
from .attach import Consoles
from .connection import Connection, Limits
from .listen import bind, raise_fd_limit
from .streams import LogSource, Streams, Watched
from .wire import Request, Response

log = logging.getLogger(__name__)


class Controller(Watched, Protocol):
    """What the server needs from the VM; :class:`vmhost.vm.controller.QemuController` is one."""

    @property
    def state(self) -> VMState: ...

    @property
    def ssh_port(self) -> int: ...

    @property
    def backend(self) -> str: ...

    @property
    def step(self) -> str:
        """The stop chain's step running now; outside a stop, what a booting guest is waited
        for or how long it took to be ready ([boot] ready); "" if nothing."""
        ...

    @property
    def stop_timeout(self) -> float:
        """Seconds the running stop was granted (a request may ask for more than allowed)."""
        ...

    def stop(self, timeout: float | None = None) -> Awaitable[None]:
        """Start a graceful stop now (``None``: the config's ``[stop] timeout_seconds``); the
        result resolves once the VM is gone."""
        ...

    def force_stop(self) -> Awaitable[None]:
        """Start killing the VM now; the result resolves once it is gone."""
        ...

    def migrate(self, uri: str) -> str:
        """Start a live migration to ``uri``: "" once begun, else why not."""
        ...

    async def wait(self) -> None: ...


_STOPPING: Final = wire.encode_response(Response(ok=True, state="stopping"))
_ENDED: Final = wire.error_response("vmhost is exiting")
_MIGRATING: Final = wire.encode_response(Response(ok=True, state="running", vm_state="migrating"))
_NO_STOP_WHILE_MIGRATING: Final = (
    "the VM is migrating: stop it once that ends (systemctl stop cancels the migration)"
)
_TURNS_PER_SLICE: Final = 4
"""Turns run before the loop looks at new I/O again (about a millisecond)."""
_SWEEP_EVERY: Final = 1.0  # seconds; the idle sweep runs only while a connection is open
_BACKLOG: Final = socket.SOMAXCONN
"""The loop calls listen() again: as long a queue as systemd's default ``Backlog=`` gives (the
kernel caps both at ``net.core.somaxconn``, 4096 by default), and as :func:`bind` asks for."""
_QUEUED_MAX: Final = 512
_QUEUED_SECONDS: Final = 0.05
"""At close: how many queued connections are answered, and how long that may take."""
_FINAL_SECONDS: Final = 2.0
"""At close of a socket that was shut down: time for clients that do not read their answer."""
_GRACE_SECONDS: Final = 1.0
"""At close: how long after its connect a connection's first request may still come."""


class Server:
    """Serves the control protocol for one controller until closed.

    ``listen`` is an already-listening socket (socket activation) or a path to
    bind; only a path we bound ourselves is removed on close.
    """

    def __init__(
        self,
        controller: Controller,
        listen: socket.socket | Path,
        *,
        limits: Limits = Limits(),  # noqa: B008 - frozen
        logs: LogSource | None = None,
        consoles: Consoles | None = None,
    ) -> None:
        self.controller = controller
        self.limits = limits
        self._listen = listen
        self._sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._connections: dict[Connection, None] = {}
        self.streams = Streams[Connection](controller, logs, limits.max_log_streams, consoles)
        self._tasks: set[asyncio.Task[None]] = set()
        self._cache: dict[tuple[str, bool], bytes] = {}
        self._cached_for: tuple[VMState | None, str] = (None, "")
        self._turns: deque[Connection] = deque()
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
        factory = functools.partial(Connection, self)
        raise_fd_limit(self.limits.max_connections)
        self._server = await loop.create_unix_server(factory, sock=sock, backlog=_BACKLOG)

    async def close(self) -> None:
        """Stop listening; answer what the kernel queued meanwhile and the requests still
        coming on accepted connections; drop the rest.

        A socket we bound ourselves is ours alone: it is shut down first, so every later
        connect is refused and every one queued is answered.  One handed to us (systemd's)
        may serve again after us (a restart keeps it): answered in bounded rounds."""
        if self._server is None or self._sock is None:
            return
        self.closing = True
        if isinstance(self._listen, Path):
            with contextlib.suppress(FileNotFoundError):
                self._listen.unlink()
        final = isinstance(self._listen, Path)
        queue = self._sock.dup()  # the loop closes its socket: the queue lives on in this one
        self._server.close()
        if final:
            queue.shutdown(socket.SHUT_RD)  # connects are refused now; the queued stay accepted
        with queue:
            await self._answer_queued(queue, final)
        await self._answer_coming()
        for timer in filter(None, (self._turn_runner, self._sweeper)):
            timer.cancel()
        for conn in self._connections:
            conn.transport.abort()
        self.streams.cut("vmhost is exiting")
        for task in self._tasks:
            task.cancel()  # waits for a VM that is gone, or that outlives us
        self._server = self._sock = None

    async def _answer_queued(self, queue: socket.socket, final: bool) -> None:
        """Connections a client made before we stopped listening get their one answer.

        Accepted in rounds until a round finds none, so a client that connects while the
        last round is being answered is answered too; bounded in count and time all told,
        except for a ``final`` (shut down) queue: it cannot grow, so all of it is answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (_FINAL_SECONDS if final else _QUEUED_SECONDS)
        factory = functools.partial(Connection, self)
        left = sys.maxsize if final else _QUEUED_MAX
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

    async def _answer_coming(self) -> None:
        """Connections accepted before close whose request is on its way (a client writes
        just after its connect) get their answer, until ``_GRACE_SECONDS`` after the last
        connect.  One between requests is closed at once: a stop waits for no idle client."""
        coming = [conn for conn in self._connections if conn.buffer or not conn.answered]
        if coming:  # in idle order: the youngest is the last
            left = coming[-1].since + _GRACE_SECONDS - time.monotonic()
            if left > 0:
                await self._wait_closed(coming, left)

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
        self.streams.finish(last_line)
        await self._wait_closed([*self._connections, *self.streams.logs], timeout)
        for conn in [*self._connections, *self.streams.logs]:
            conn.transport.abort()
        return self._sock

    async def resume(self) -> None:
        """Serve again after :meth:`drain` (the re-exec did not happen)."""
        assert self._sock is not None
        factory = functools.partial(Connection, self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(factory, sock=self._sock, backlog=_BACKLOG)

    @staticmethod
    async def _wait_closed(conns: list[Connection], timeout: float) -> None:
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
        if method in (wire.STATUS, wire.INFO):
            return self.state_answer(method, request.detail)
        if method == wire.MIGRATE:
            why = "vmhost is exiting" if self.closing else self._migrate(request.uri)
            return wire.error_response(f"cannot migrate: {why}") if why else _MIGRATING
        if method in (wire.STOP, wire.FORCE_STOP):
            if self.closing:  # the VM is gone already
                return _STOPPING
            c = self.controller
            if method == wire.STOP and c.state is VMState.MIGRATING:  # never lost: refused
                return wire.error_response(_NO_STOP_WHILE_MIGRATING)
            if method == wire.FORCE_STOP:
                self._spawn(c.force_stop())
                return _STOPPING
            asked = request.timeout_seconds
            self._spawn(c.stop(asked if asked > 0 else None))  # none named: the config's
            return self._stop_detail(asked) if request.detail else _STOPPING
        if self.streams.serves(method):
            return _ENDED if self.closing else None
        return wire.error_response(f"unknown method: {method}")

    def _migrate(self, uri: str) -> str:
        return check_uri(uri) or self.controller.migrate(uri)

    def _stop_detail(self, asked: int) -> bytes:
        """A stop's answer with the detail fields: the time the running chain was granted."""
        c = self.controller
        granted = c.stop_timeout
        message = f"stop timeout {granted:g} s"
        if asked > granted:
            message += f" (asked {asked} s: clamped to [stop] max_timeout_seconds)"
        response = Response(ok=True, state="stopping", vm_state=c.state.value, message=message)
        return wire.encode_response(response)

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
        if method == wire.INFO:
            response.ssh_port = c.ssh_port
            response.backend = c.backend
        if detail:
            response.vm_state = state.value
            response.pid = c.pid
            response.version = __version__
            response.message = step  # the stop chain's step, while stopping
        return wire.encode_response(response)

    def _spawn(self, awaitable: Awaitable[None]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("control request failed: %s", exc, exc_info=exc)

    def admit(self, conn: Connection) -> None:
        if len(self._connections) >= self.limits.max_connections:
            oldest = next(iter(self._connections))
            del self._connections[oldest]
            oldest.transport.abort()
        self._connections[conn] = None
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_EVERY, self._sweep)

    def touch(self, conn: Connection) -> None:
        """Move ``conn`` to the young end, so dict order is idle order."""
        if self._connections.pop(conn, 0) is None:
            self._connections[conn] = None

    def wait_turn(self, conn: Connection) -> None:
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
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep) if self._connections else None

    def stream(self, conn: Connection, request: Request) -> None:
        """Hand ``conn`` to its stream; it leaves the idle-connection bookkeeping."""
        self._connections.pop(conn, None)
        self.streams.start(conn, request)

    def forget(self, conn: Connection) -> None:
        self._connections.pop(conn, None)
        if conn.stream is not None:
            conn.stream.cancel()
