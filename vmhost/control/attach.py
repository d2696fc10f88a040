"""``console``: people attached to the guest's serial console, many readers and one writer.

An extension method on the control socket, so whoever may use ``vmhostctl`` may
attach and nobody else: the kernel checks the socket file's owner, group and
mode, and there is no second socket to keep in step with it (under socket
activation systemd sets them, not vmhost) nor to hand over at a reload.

After the request line the connection changes protocol.  vmhost sends JSON
lines (:class:`ConsoleLine`): the first says whether the attach got the input,
the history follows, then the console's output as it comes, base64 in
``output``; ``message`` and ``mode`` tell of a takeover, the last line of the
end.  The client sends raw bytes, the keys for the guest, and only after the
first line.  Output is fanned out from the one console reader (at most 20
wakeups a second however the guest prints), encoded once for every reader; a
reader further behind than ``SEND_LIMIT`` is dropped, so none holds up the
guest, the others or the control socket.  Input goes to QEMU through a pipe
only vmhost holds (:mod:`vmhost.qemu`), bounded in size and rate: the writer is
not read from while its input waits.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pwd
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, cast

from .wire import READ_ONLY, READ_WRITE, ConsoleLine, Request, encode_console

log = logging.getLogger(__name__)

MAX_LINES: Final = 10_000
MAX_HISTORY: Final = 1024 * 1024
"""Bytes of history sent on an attach at most, however many lines were asked for."""
SEND_LIMIT: Final = 256 * 1024
"""Output a reader may have unread in vmhost (beyond the kernel's buffer) before it is dropped."""
INPUT_RATE: Final = 32 * 1024
"""Bytes per second the writer may type; a paste is paced to it."""
INPUT_HELD: Final = 4096
"""Input waiting for the guest before the writer is not read from any more."""


class ConsoleLog:
    """console.log and its rotated files, newest first: the history an attach is shown."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def files(self) -> list[Path]:
        found = [self.path]
        while (rotated := self.path.with_name(f"{self.path.name}.{len(found)}")).exists():
            found.append(rotated)
        return found

    def position(self) -> str:
        """Where the console's output ends now, as ``INODE:OFFSET`` of console.log (a rotation
        renames the file, so its inode finds it again); empty if there is none yet."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return ""
        return f"{st.st_ino}:{st.st_size}"

    def tail(self, lines: int) -> bytes:
        """The last ``lines`` lines (the unfinished one besides), ``MAX_HISTORY`` bytes at most."""
        parts: list[bytes] = []
        newlines = 0
        for block in _backwards([(path, 0) for path in self.files()]):
            parts.append(block)
            newlines += block.count(b"\n")
            if newlines > lines:
                break
        data = b"".join(reversed(parts))
        if newlines > lines:  # cut at the line boundary the count asks for
            cut = len(data)
            for _ in range(lines + 1):
                cut = data.rindex(b"\n", 0, cut)
            data = data[cut + 1 :]
        return data

    def since(self, position: str) -> bytes | None:
        """Everything after ``position`` (see :meth:`position`), ``MAX_HISTORY`` bytes at most
        (the newest); ``None`` if that file is gone."""
        inode, _, offset = position.partition(":")
        if not (inode.isdigit() and offset.isdigit()):
            return None
        segments: list[tuple[Path, int]] = []
        for path in self.files():
            try:
                found = path.stat().st_ino == int(inode)
            except FileNotFoundError:
                continue
            segments.append((path, int(offset) if found else 0))
            if found:
                return b"".join(reversed(list(_backwards(segments))))
        return None


def _backwards(segments: list[tuple[Path, int]]) -> Iterator[bytes]:
    """The files' blocks from each end back to its start offset, newest file first;
    ``MAX_HISTORY`` bytes at most.  Read in the event loop: the console's writer is in
    this thread too, so no rotation happens in between."""
    budget = MAX_HISTORY
    for path, start in segments:
        try:
            f = path.open("rb")
        except FileNotFoundError:
            continue
        with f:
            end = f.seek(0, os.SEEK_END)
            while end > start and budget > 0:
                begin = max(end - 65536, start, end - budget)
                f.seek(begin)
                block = f.read(end - begin)
                budget -= len(block)
                end = begin
                yield block


class Consoles:
    """The attached consoles of one VM; ``publish`` is called with each chunk of output.

    ``input_fd`` gives the descriptor that reaches the guest's serial input
    (-1 while there is none: QEMU not started, or started by a vmhost without it).
    """

    def __init__(self, log_file: Path, input_fd: Callable[[], int]) -> None:
        self.log = ConsoleLog(log_file)
        self._input_fd = input_fd
        self.sessions: set[Session] = set()
        self.writer: Session | None = None
        self._input = _Input(self)

    def attach(self, transport: asyncio.Transport, request: Request) -> None:
        """Take over ``transport`` (the request's connection) as an attached console."""
        session = Session(self, transport)
        wants_input = not request.read_only
        message = ""
        if wants_input and self._input_fd() < 0:
            wants_input = False
            message = "this guest's console takes no input (its QEMU was started without it)"
        elif wants_input and self.writer is not None and not request.force:
            wants_input = False
            message = f"{self.writer.peer} has the input; attach with --force to take it over"
        elif wants_input and self.writer is not None:
            self._demote(f"{session.peer} took over the input")
        if wants_input:
            self.writer = session
        history = self._history(request)
        self.sessions.add(session)
        transport.set_protocol(session)
        transport.resume_reading()  # the control connection may have paused it
        session.send(encode_console(ConsoleLine(ok=True, mode=session.mode, message=message)))
        if history:
            session.send(encode_console(ConsoleLine(ok=True, output=history)))
        log.info("console attached %s by %s", session.mode, session.peer)

    def _history(self, request: Request) -> bytes:
        if request.since and (following := self.log.since(request.since)) is not None:
            return following
        return self.log.tail(min(request.lines, MAX_LINES)) if request.lines > 0 else b""

    def _demote(self, why: str) -> None:
        previous, self.writer = self.writer, None
        self._input.drop()
        if previous is not None:
            previous.send(encode_console(ConsoleLine(ok=True, mode=READ_ONLY, message=why)))

    def publish(self, chunk: bytes) -> None:
        """New console output, for every attached reader; encoded once."""
        if self.sessions:
            line = encode_console(ConsoleLine(ok=True, output=chunk))
            for session in list(self.sessions):
                session.send(line)

    def typed(self, session: Session, data: bytes) -> None:
        if session is self.writer:
            self._input.add(session, data)

    def release(self, session: Session) -> None:
        if session is self.writer:
            self.writer = None
            self._input.drop()

    def detach(self, session: Session) -> None:
        self.sessions.discard(session)
        self.release(session)
        log.info("console detached (%s)", session.peer)

    def end(self, message: str, *, resume: bool = False) -> None:
        """Send every attached console a last line and close it (a reload, vmhost exiting);
        with ``resume`` the line says where a new attach picks up, so nothing is lost."""
        last = ConsoleLine(ok=True, message=message, resume=self.log.position() if resume else "")
        data = encode_console(last)
        for session in list(self.sessions):
            session.send(data)
            session.transport.close()

    def input_fd(self) -> int:
        return self._input_fd()


class Session(asyncio.Protocol):
    """One attached console: its connection, from the attach on."""

    def __init__(self, consoles: Consoles, transport: asyncio.Transport) -> None:
        self.consoles = consoles
        self.transport = transport
        self.peer = _peer(transport)

    @property
    def mode(self) -> str:
        return READ_WRITE if self is self.consoles.writer else READ_ONLY

    def send(self, data: bytes) -> None:
        """Write, or drop this reader if it is too far behind."""
        transport = self.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > SEND_LIMIT:
            log.warning("console reader %s dropped: it does not keep up", self.peer)
            transport.abort()
            return
        transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.consoles.typed(self, data)

    def eof_received(self) -> bool:
        """No more input (a script's stdin ended, or the client is gone): the input is free
        for another; the output goes on until a write finds nobody there."""
        self.consoles.release(self)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.consoles.detach(self)


class _Input:
    """The writer's keys on their way to the guest, paced to ``INPUT_RATE``; while
    ``INPUT_HELD`` bytes wait (the guest reads slowly, or not at all), the writer's
    connection is not read, so its bytes wait in the kernel, not here."""

    def __init__(self, consoles: Consoles) -> None:
        self.consoles = consoles
        self.pending = bytearray()
        self.source: Session | None = None
        self._allowance = float(INPUT_HELD)
        self._stamp = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, session: Session, data: bytes) -> None:
        self.source = session
        self.pending += data
        self._flush()

    def drop(self) -> None:
        """The writer left or lost the input: what it typed and the guest did not take is lost."""
        self.pending.clear()
        self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        fd = self.consoles.input_fd()
        now = time.monotonic()
        self._allowance = min(self._allowance + (now - self._stamp) * INPUT_RATE, INPUT_HELD)
        self._stamp = now
        if self.pending and fd >= 0:
            allowed = min(len(self.pending), int(self._allowance))
            try:
                written = os.write(fd, self.pending[:allowed]) if allowed else 0
            except BlockingIOError:  # the guest reads slower than this: try again soon
                written = 0
                self._allowance = 0.0
            except OSError as e:  # QEMU gone: its exit ends everything soon
                if e.errno != errno.EPIPE:
                    log.warning("console input: %s", e)
                self.pending.clear()
                written = 0
            del self.pending[:written]
            self._allowance -= written
            if self.pending:
                delay = max(min(len(self.pending), INPUT_HELD) - self._allowance, 1) / INPUT_RATE
                self._timer = asyncio.get_running_loop().call_later(delay, self._flush)
        source = self.source
        if source is not None and not source.transport.is_closing():
            if len(self.pending) > INPUT_HELD:
                source.transport.pause_reading()
            else:
                source.transport.resume_reading()


def _peer(transport: asyncio.Transport) -> str:
    """Who is on the other end, from the kernel's SO_PEERCRED: ``root (pid 1234)``."""
    sock = cast(socket.socket | None, transport.get_extra_info("socket"))
    if sock is None or sock.family != socket.AF_UNIX:
        return "a client"
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid {uid}"
    return f"{user} (pid {pid})"
