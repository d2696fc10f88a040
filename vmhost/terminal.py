"""``vmhostctl console NAME``: the guest's serial console on this terminal.

On a terminal: raw mode, every key to the guest but the escape key (Ctrl-]
as in virsh), which detaches and gives the terminal back exactly as it was.
Otherwise (a pipe, a script) the console's output is streamed like ``logs -f``
and stdin's bytes are typed to the guest unless ``--read-only``.  A reload of
vmhost ends the connection with the place the output had reached: the console
attaches again from there, in the same mode, and nothing is lost or repeated.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import sys
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Final

import msgspec

from .control import wire
from .control.wire import READ_WRITE, ConsoleLine
from .errors import ClientError, NotListeningError, ServerError, UsageError

DEFAULT_ESCAPE: Final = "^]"
DEFAULT_LINES: Final = 100
"""Of history on attach: a panic's trace, or the end of the boot."""
_MAX_LINE: Final = 4 * 1024 * 1024
_UNSENT_MAX: Final = 64 * 1024
"""Typed bytes waiting for vmhost to take them; beyond this the guest is not reading."""
_REATTACH_SECONDS: Final = 10.0
_decode: Final = msgspec.json.Decoder(ConsoleLine).decode


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """``vmhostctl console``'s command line."""
    parser = commands.add_parser(
        "console",
        parents=[common],
        help="attach this terminal to the guest's serial console (Ctrl-] detaches)",
    )
    parser.add_argument("name", nargs="?", help="VM name (instance of vmhost@NAME)")
    parser.add_argument(
        "-n",
        "--lines",
        type=int,
        default=DEFAULT_LINES,
        help=f"lines of history shown first (default {DEFAULT_LINES})",
    )
    parser.add_argument("--read-only", action="store_true", help="never type to the guest")
    parser.add_argument(
        "--force", action="store_true", help="take the input over from whoever has it"
    )
    parser.add_argument(
        "--escape", default=DEFAULT_ESCAPE, help=f"the detach key (default {DEFAULT_ESCAPE})"
    )


def escape_byte(spec: str) -> int:
    """``^]``, ``^A`` ... (caret notation) or one ASCII character, as the byte the key sends."""
    if (
        len(spec) == 2
        and spec[0] == "^"
        and (spec[1] == "?" or 0x40 <= ord(spec[1].upper()) < 0x60)
    ):
        return 0x7F if spec[1] == "?" else ord(spec[1].upper()) ^ 0x40
    if len(spec) == 1 and spec.isascii():
        return ord(spec)
    raise UsageError(f"--escape {spec!r}: give one character or ^X (caret notation)")


def console(path: Path, label: str, args: argparse.Namespace) -> int:
    """Attach until detached or the console ends; the exit code."""
    escape = escape_byte(args.escape)
    interactive = os.isatty(0)
    request = wire.Request(
        method=wire.CONSOLE, lines=args.lines, read_only=args.read_only, force=args.force
    )
    session = _Session(path, request, typing=interactive or not args.read_only)
    first = session.attach()
    if interactive:
        key = args.escape if args.escape != DEFAULT_ESCAPE else "Ctrl-]"
        note = f": {first.message}" if first.message else ""
        print(
            f"Connected to {label}'s console, {first.mode}{note}. {key} detaches.", file=sys.stderr
        )
    elif first.message:
        print(f"vmhostctl: {first.message}", file=sys.stderr)
    with _raw(0 if interactive else -1), _terminating():
        return session.run(escape if interactive else -1)


class _Session:
    """One attachment, and the next after a reload."""

    def __init__(self, path: Path, request: wire.Request, *, typing: bool) -> None:
        self.path = path
        self.request = request
        self.typing = typing
        """Whether stdin is read: on a terminal for the escape key, else for the guest unless
        --read-only; not after its EOF.  What is read is sent only while we have the input."""
        self.writing = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buffer = bytearray()
        self.unsent = bytearray()
        self.farewell: ConsoleLine | None = None
        """The line vmhost ends a console with: why, and where to resume after a reload."""
        self.crlf = "\r\n" if os.isatty(0) else "\n"

    def attach(self) -> ConsoleLine:
        """Connect and send the request; the first line, which says what we got."""
        try:
            self.sock.settimeout(5.0)
            self.sock.connect(str(self.path))
            self.sock.sendall(wire.encode_request(self.request))
            self.sock.settimeout(30.0)  # a reload may keep us in the backlog a moment
            while b"\n" not in self.buffer and (data := self.sock.recv(1 << 16)):
                self.buffer += data
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NotListeningError(f"{self.path}: {e.strerror}") from e
        except OSError as e:
            raise ClientError(f"{self.path}: {e.strerror or e}") from e
        first = next(self._lines(), None)
        if first is None:
            raise ClientError(f"{self.path}: closed without an answer")
        if not first.ok:
            raise ServerError(first.error or "console refused")
        self.sock.setblocking(False)
        self._mode(first.mode)
        return first

    def run(self, escape: int) -> int:
        """Until detached, or the console ends; attached again after each reload."""
        while True:
            if self._attached(escape):
                return 0
            farewell, self.farewell = self.farewell, None
            if farewell is None:
                raise ClientError(
                    f"{self.path}: the console ended without a word "
                    "(vmhost dropped this reader for falling behind, or vmhost is gone)"
                )
            if not farewell.resume:
                self._notice(farewell.message)
                return 0
            self._reattach(farewell.resume)

    def _attached(self, escape: int) -> bool:
        """Pass bytes both ways until the escape key (True) or the connection's end."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            if self.typing:
                selector.register(0, selectors.EVENT_READ)
            self._show()  # what came with the first line
            while True:
                for key, _ in selector.select():
                    if key.fd == 0:
                        if self._typed(os.read(0, 4096), escape):
                            return True
                        if not self.typing:
                            selector.unregister(0)
                    elif not self._received():
                        return False
                    self._show()
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.unsent else 0)
                selector.modify(self.sock, events)

    def _reattach(self, resume: str) -> None:
        """After a reload: from where the output had reached, in the same mode."""
        self.request = wire.Request(
            method=wire.CONSOLE, since=resume, read_only=not self.writing, force=self.writing
        )
        deadline = time.monotonic() + _REATTACH_SECONDS
        while True:
            self.sock.close()
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.buffer.clear()
            try:
                first = self.attach()
            except NotListeningError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
                continue
            self._notice(f"vmhost reloaded; attached again, {first.mode}")
            return

    def _typed(self, data: bytes, escape: int) -> bool:
        """Keys (or stdin's bytes) for the guest; True on the escape key."""
        if not data:  # stdin ended: no more input, the output goes on
            self.typing = False
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            return False
        cut = data.find(escape) if escape >= 0 else -1
        if cut >= 0:
            data = data[:cut]
        if self.writing and len(self.unsent) < _UNSENT_MAX:
            self.unsent += data
            self._send()
        return cut >= 0

    def _send(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            del self.unsent[: self.sock.send(self.unsent)]

    def _received(self) -> bool:
        """Send what waits, read what came; False at the end of the connection."""
        try:
            if self.unsent:
                self._send()
            data = self.sock.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        self.buffer += data
        return bool(data)

    def _lines(self) -> Iterator[ConsoleLine]:
        """The complete lines in the buffer."""
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[: end + 1])
            del self.buffer[: end + 1]
            try:
                yield _decode(line)
            except msgspec.DecodeError as e:
                raise ClientError(f"{self.path}: malformed answer: {e}") from e
        if len(self.buffer) > _MAX_LINE:
            raise ClientError(f"{self.path}: an answer line over {_MAX_LINE} bytes")

    def _show(self) -> None:
        for line in self._lines():
            if line.output:
                _write_all(1, line.output)
            elif line.mode:  # the input was taken over
                self._mode(line.mode)
                self._notice(line.message)
            elif line.message:
                self.farewell = line

    def _mode(self, mode: str) -> None:
        self.writing = mode == READ_WRITE
        if not self.writing:
            self.unsent.clear()

    def _notice(self, text: str) -> None:
        sys.stderr.write(f"{self.crlf}[vmhostctl console: {text}]{self.crlf}")
        sys.stderr.flush()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        raise SystemExit(0) from None  # whoever read our output went away


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """The terminal in raw mode, given back as it was whatever happens; -1: no terminal."""
    if fd < 0:
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _terminating() -> Iterator[None]:
    """SIGTERM and SIGHUP end the console as a detach does (the terminal is restored)."""

    def leave(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
