"""``console`` (issue 25), the server's side: history, many readers and one writer, input
bounds, slow readers, the reload's last line; over a real socket, input into a real pipe.

The person's side, ``vmhostctl console`` in a pseudo-terminal on a real guest, is in
tests/test_console_guest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from conftest import FakeController
from fixtures import ENV

from vmhost.control import attach, wire
from vmhost.control.attach import ConsoleLog, Consoles
from vmhost.control.connection import Limits
from vmhost.control.server import Server
from vmhost.control.wire import ConsoleLine, Request
from vmhost.errors import UsageError
from vmhost.terminal import escape_byte

STATUS = b'{"ok":true,"state":"running"}\n'
VMHOSTCTL = "import sys; from vmhost.cli import vmhostctl_main; sys.exit(vmhostctl_main())"
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
def input_pipe() -> Iterator[tuple[int, int]]:
    """The console's input as QEMU has it: vmhost writes one end, the test reads the other."""
    read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    yield read, write
    os.close(read)
    os.close(write)


@contextlib.asynccontextmanager
async def served(
    sock_path: Path, log_dir: Path, input_fd: int
) -> AsyncIterator[tuple[Consoles, Server]]:
    """A server with consoles on ``sock_path``; ``input_fd`` -1: a QEMU without the input
    pipe (one an older vmhost started)."""
    hub = Consoles(log_dir / "console.log", lambda: input_fd)
    limits = Limits(request_timeout=1.0, max_connections=300)
    async with Server(FakeController(), sock_path, limits=limits, consoles=hub) as server:
        yield hub, server


@pytest.fixture
async def consoles(
    sock_path: Path, tmp_path: Path, input_pipe: tuple[int, int]
) -> AsyncIterator[Consoles]:
    async with served(sock_path, tmp_path, input_pipe[1]) as (hub, _):
        yield hub


async def attached(sock_path: Path, **fields: object) -> tuple[Stream, ConsoleLine]:
    reader, writer = await asyncio.open_unix_connection(sock_path, limit=1 << 22)
    writer.write(wire.encode_request(Request(method=wire.CONSOLE, **fields)))  # type: ignore[arg-type]
    return (reader, writer), await next_line(reader)


async def next_line(reader: asyncio.StreamReader) -> ConsoleLine:
    async with asyncio.timeout(5):
        return msgspec.json.decode(await reader.readline(), type=ConsoleLine)


async def ask_status(sock_path: Path) -> bytes:
    reader, writer = await asyncio.open_unix_connection(sock_path)
    writer.write(b'{"method":"status"}\n')
    async with asyncio.timeout(2):
        answer = await reader.readline()
    writer.close()
    return answer


def pipe_read(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


async def pipe_until(fd: int, size: int) -> bytes:
    got = b""
    async with asyncio.timeout(5):
        while len(got) < size:
            got += pipe_read(fd)
            await asyncio.sleep(0.01)
    return got


def test_tail_spans_the_rotated_file(tmp_path: Path) -> None:
    """The last N lines come from console.log.1 and console.log, in order, the partial last
    line included."""
    (tmp_path / "console.log.1").write_bytes(b"".join(b"old %d\n" % n for n in range(50)))
    (tmp_path / "console.log").write_bytes(b"new 0\nnew 1\nprompt# ")
    log = ConsoleLog(tmp_path / "console.log")
    assert log.tail(3) == b"old 49\nnew 0\nnew 1\nprompt# "
    assert log.tail(1) == b"new 1\nprompt# "
    assert log.tail(1000).startswith(b"old 0\n")
    assert ConsoleLog(tmp_path / "none.log").tail(10) == b""


def test_tail_is_bounded_in_bytes(tmp_path: Path) -> None:
    """However many lines are asked for, at most MAX_HISTORY bytes are read and sent."""
    (tmp_path / "console.log").write_bytes(b"x" * (3 * attach.MAX_HISTORY) + b"\nend\n")
    assert len(ConsoleLog(tmp_path / "console.log").tail(10_000)) == attach.MAX_HISTORY


def test_since_follows_a_rotation(tmp_path: Path) -> None:
    """A position in console.log still finds its bytes once the file was rotated away."""
    path = tmp_path / "console.log"
    path.write_bytes(b"seen\n")
    log = ConsoleLog(path)
    position = log.position()
    with path.open("ab") as f:
        f.write(b"unseen 1\n")
    path.rename(tmp_path / "console.log.1")
    path.write_bytes(b"unseen 2\n")
    assert log.since(position) == b"unseen 1\nunseen 2\n"
    assert log.since("1:0") is None  # a file that is gone: the caller falls back to lines
    assert log.since("garbage") is None


@pytest.mark.parametrize(
    ("spec", "byte"), [("^]", 0x1D), ("^a", 0x01), ("^?", 0x7F), ("~", ord("~"))]
)
def test_escape_key_spellings(spec: str, byte: int) -> None:
    """--escape takes caret notation or one ASCII character."""
    assert escape_byte(spec) == byte


@pytest.mark.parametrize("spec", ["", "ab", "^1", "é"])
def test_escape_key_refused(spec: str) -> None:
    """Anything else is a usage error, before the terminal is touched."""
    with pytest.raises(UsageError):
        escape_byte(spec)


async def test_history_then_live_output(consoles: Consoles, sock_path: Path) -> None:
    """An attach sees the last lines, then what the guest prints, with nothing in between
    lost or doubled; the first line says it has the input."""
    consoles.log.path.write_bytes(b"boot 1\nboot 2\nboot 3\n")
    (reader, writer), first = await attached(sock_path, lines=2)
    assert (first.ok, first.mode, first.message) == (True, wire.READ_WRITE, "")
    assert (await next_line(reader)).output == b"boot 2\nboot 3\n"
    consoles.publish(b"live \xff\x00 bytes")
    assert (await next_line(reader)).output == b"live \xff\x00 bytes"
    writer.close()


async def test_one_writer_many_readers(
    consoles: Consoles, sock_path: Path, input_pipe: tuple[int, int]
) -> None:
    """The first interactive attach types; a second is read-only and told who has the input;
    --read-only never types; every reader sees the output."""
    (r1, w1), first = await attached(sock_path)
    (r2, w2), second = await attached(sock_path)
    (r3, w3), third = await attached(sock_path, read_only=True)
    assert first.mode == wire.READ_WRITE
    assert second.mode == wire.READ_ONLY
    assert "has the input" in second.message and "--force" in second.message
    assert (third.mode, third.message) == (wire.READ_ONLY, "")
    for w, text in ((w2, b"second"), (w3, b"third"), (w1, b"first")):
        w.write(text)
        await w.drain()
    assert await pipe_until(input_pipe[0], 5) == b"first"
    await asyncio.sleep(0.1)
    assert pipe_read(input_pipe[0]) == b"", "a read-only console typed"
    consoles.publish(b"to all")
    for r in (r1, r2, r3):
        assert (await next_line(r)).output == b"to all"
    for w in (w1, w2, w3):
        w.close()


async def test_force_takes_the_input_over(
    consoles: Consoles, sock_path: Path, input_pipe: tuple[int, int]
) -> None:
    """--force makes the new console the writer; the previous one is told, becomes
    read-only (its keys go nowhere) and still sees the output."""
    (r1, w1), _ = await attached(sock_path)
    (_, w2), taker = await attached(sock_path, force=True)
    assert taker.mode == wire.READ_WRITE
    told = await next_line(r1)
    assert told.mode == wire.READ_ONLY
    assert "took over the input" in told.message
    w1.write(b"old")
    w2.write(b"new")
    assert await pipe_until(input_pipe[0], 3) == b"new"
    await asyncio.sleep(0.1)
    assert pipe_read(input_pipe[0]) == b""
    consoles.publish(b"out")
    assert (await next_line(r1)).output == b"out"
    w1.close()
    w2.close()


async def test_input_free_again_once_the_writer_leaves(consoles: Consoles, sock_path: Path) -> None:
    """The writer's end (or its stdin's EOF) frees the input for the next attach."""
    (_, w1), _ = await attached(sock_path)
    w1.write_eof()
    async with asyncio.timeout(3):
        while consoles.writer is not None:
            await asyncio.sleep(0.01)
    (_, w2), second = await attached(sock_path)
    assert second.mode == wire.READ_WRITE
    w1.close()
    w2.close()


async def test_no_input_without_the_pipe(sock_path: Path, tmp_path: Path) -> None:
    """A QEMU without the input pipe (started by an older vmhost): read-only, and said why."""
    async with served(sock_path, tmp_path, -1):
        (_, writer), first = await attached(sock_path)
        assert first.mode == wire.READ_ONLY
        assert "takes no input" in first.message
        writer.close()


async def test_input_is_paced_and_bounded(
    consoles: Consoles, sock_path: Path, input_pipe: tuple[int, int]
) -> None:
    """A writer pasting far more than the guest takes: it reaches the pipe no faster than
    INPUT_RATE, vmhost holds a few KiB of it at most, and status is answered meanwhile."""
    (_, writer), _ = await attached(sock_path)
    started = time.monotonic()
    writer.write(b"k" * (256 * 1024))  # the kernel and the transport hold it; no await
    got = 0
    while time.monotonic() - started < 1.0:
        got += len(pipe_read(input_pipe[0]))
        assert len(consoles._input.pending) <= attach.INPUT_HELD + 256 * 1024
        assert await ask_status(sock_path) == STATUS
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - started
    assert got <= attach.INPUT_HELD + attach.INPUT_RATE * elapsed * 1.1
    assert got >= attach.INPUT_RATE * 0.5  # and it does flow
    writer.close()


async def test_guest_not_reading_stops_the_writer_alone(
    consoles: Consoles, sock_path: Path
) -> None:
    """Nobody drains the input (a guest without a reader): the pipe fills, vmhost stops
    reading the writer, its memory stays bounded, and the other consoles are served."""
    (_, writer), _ = await attached(sock_path)
    (reader2, w2), _ = await attached(sock_path, read_only=True)
    for _ in range(20):
        writer.write(b"z" * 65536)
        await asyncio.sleep(0.05)
    assert len(consoles._input.pending) <= attach.INPUT_HELD + 256 * 1024
    consoles.publish(b"still here")
    assert (await next_line(reader2)).output == b"still here"
    assert await ask_status(sock_path) == STATUS
    writer.transport.abort()
    w2.close()


async def test_reader_that_does_not_keep_up_is_dropped_alone(
    consoles: Consoles, sock_path: Path
) -> None:
    """A reader that stops reading during a flood is dropped; a reading one gets every
    chunk, and status answers throughout."""
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.connect(str(sock_path))
    deaf.sendall(wire.encode_request(Request(method=wire.CONSOLE, read_only=True)))
    (reader, writer), _ = await attached(sock_path, read_only=True)
    await asyncio.sleep(0.1)
    assert len(consoles.sessions) == 2
    chunk = b"flood " * 2730  # 16 KiB, a full read of the console
    for n in range(100):
        consoles.publish(chunk)
        assert (await next_line(reader)).output == chunk
        if n % 20 == 0:
            assert await ask_status(sock_path) == STATUS
    assert len(consoles.sessions) == 1, "the deaf reader is still attached"
    deaf.close()
    writer.close()


async def test_others_are_refused_by_the_kernel(consoles: Consoles, sock_path: Path) -> None:
    """The console is reached through the control socket (0660): a user outside its owner
    and group is refused at the connect, before vmhost reads a byte."""
    for directory in sock_path.parents:  # only the socket's own mode stands in the way
        directory.chmod(directory.stat().st_mode | 0o005)
    proc = await asyncio.create_subprocess_exec(
        *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"),
        # The system's python, without vmhost: a clone under /root is closed to this user.
        *("/usr/bin/python3", "-c", _CONNECT, str(sock_path)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ENV,
    )
    out, err = await proc.communicate()
    assert (proc.returncode, out) == (1, b"")
    assert b"PermissionError" in err
    assert not consoles.sessions


_CONNECT = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
    's.sendall(b\'{"method":"console"}\\n\'); print(s.recv(100))'
)


async def test_reload_ends_with_where_to_resume(
    sock_path: Path, tmp_path: Path, input_pipe: tuple[int, int]
) -> None:
    """A reload's drain ends each console with a last line that says where the output had
    reached; an attach from there gets what came after, and nothing before."""
    (tmp_path / "console.log").write_bytes(b"before\n")
    async with served(sock_path, tmp_path, input_pipe[1]) as (hub, server):
        (reader, writer), _ = await attached(sock_path, lines=1)
        assert (await next_line(reader)).output == b"before\n"
        await server.drain(1.0, "vmhost reloaded")
        last = await next_line(reader)
        assert last.message == "vmhost reloaded" and last.resume
        assert await reader.readline() == b""
        with hub.log.path.open("ab") as f:
            f.write(b"meanwhile\n")
        await server.resume()
        (again, w2), first = await attached(sock_path, since=last.resume, force=True)
        assert first.mode == wire.READ_WRITE
        assert (await next_line(again)).output == b"meanwhile\n"
        writer.close()
        w2.close()


async def test_exit_ends_with_a_last_line(sock_path: Path, tmp_path: Path) -> None:
    """vmhost exiting ends an attached console with a line that says so, then EOF."""
    async with served(sock_path, tmp_path, -1):
        (reader, writer), _ = await attached(sock_path)
    last = await next_line(reader)
    assert (last.message, last.resume) == ("vmhost is exiting", "")
    assert await reader.readline() == b""
    writer.close()
