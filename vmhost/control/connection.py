"""One control connection: Go's framing, the request limits, turns among pipeliners.

Each connection is an ``asyncio.Protocol`` on the loop's transports (uvloop in
``vmhost serve``).  It frames requests as Go's server does, one JSON value at a
time (:class:`~vmhost.control.goscan.Scanner` keeps its place between reads, so no
byte is scanned twice); the exact lines Go's and our clients send skip parsing.
A request must fit in ``max_request`` bytes and arrive within ``request_timeout``
of the connect (or of the previous answer); a pipelining client gets a turn of 64
answers, then waits for the others; a client that stops reading stops being read.
After ``logs`` or ``watch`` the connection belongs to its stream and serves nothing
else.  What a connection needs from the server is :class:`Host`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final, Protocol, cast

import msgspec

from . import goscan, wire
from .goscan import Scanner
from .streams import Watch
from .wire import Request


class Limits(msgspec.Struct, frozen=True):
    max_request: int = wire.MAX_REQUEST_BYTES
    request_timeout: float = 10.0
    max_connections: int = 4096
    max_log_streams: int = 16


class Host(Protocol):
    """The server, as its connections see it."""

    @property
    def limits(self) -> Limits: ...

    @property
    def closing(self) -> bool:
        """Every connection gets one answer, then is closed."""
        ...

    def answer(self, request: Request) -> bytes | None:
        """The encoded answer; ``None`` for a streaming method."""
        ...

    def state_answer(self, method: str, detail: bool) -> bytes: ...

    def admit(self, conn: Connection) -> None: ...

    def touch(self, conn: Connection) -> None: ...

    def forget(self, conn: Connection) -> None: ...

    def wait_turn(self, conn: Connection) -> None: ...

    def stream(self, conn: Connection, request: Request) -> None: ...


_TOO_LARGE: Final = wire.invalid_request("request too large")
_TIMED_OUT: Final = wire.invalid_request("timed out waiting for the rest of the request")
LINES_PER_TURN: Final = 64
"""Pipelined requests answered in a row before the other connections get their turn."""
KNOWN_LINES: Final = {
    wire.encode_request(Request(method=method, detail=detail)): (method, detail)
    for method in (wire.STATUS, wire.INFO)
    for detail in (False, True)
}
"""The exact bytes Go's and our clients send for status/info, mapped to what they ask."""


class Connection(asyncio.Protocol):
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

    def __init__(self, server: Host) -> None:
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
        """Set by the server's close or drain for a connection it waits for."""
        self.watch: Watch | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.server.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        if self.closed is not None and not self.closed.done():  # done: the wait timed out
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
        if not self.buffer and (known := KNOWN_LINES.get(data)) is not None:
            # What nearly every client sends, whole in one read: no parsing to do.
            self.transport.write(self.server.state_answer(*known))
            self._answered()
            return
        self.buffer += data
        self._serve(False)

    def eof_received(self) -> bool:
        if self.stream is not None:  # a watcher or log follower went away: its stream ends
            self.transport.close()  # (a journal reader waiting for records holds descriptors)
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
                if (self.paused or len(answers) == LINES_PER_TURN) and not eof:
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
                    buf.clear()  # a stream is a connection's last request: what follows is not run
                    self.server.stream(self, request)
                    break
                answers.append(answer)
                last = self.server.closing
        except msgspec.DecodeError as e:
            if str(e) != "EOF" or not (self.answered or answers):  # Go: nothing at all came
                answers.append(wire.invalid_request(str(e)))
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
        if not scanner.first_byte:
            # At a value's start: a whole line of the usual kind needs no scanner.
            start = scanner.pos = goscan.skip_space(buf, scanner.pos)
            nl = buf.find(b"\n", start, limit)
            if nl >= 0:
                line = bytes(buf[start : nl + 1])
                if (known := KNOWN_LINES.get(line)) is not None:
                    return self.server.state_answer(*known), nl + 1
                if (request := wire.decode_plain(line)) is not None:
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
        elif self.scanner is not None and self.scanner.first_byte:
            self.finish(_TIMED_OUT)
        else:
            self.transport.close()
        self.server.forget(self)
