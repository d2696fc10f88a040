"""Decoder fuzzing: whatever bytes arrive, the server answers well-formed lines and never hangs.

Three layers, each with Hypothesis: ``decode_request`` alone (only
``msgspec.DecodeError`` may come out), the server's per-connection protocol
object fed in arbitrary chunks (every answer a valid ``Response`` line, the
connection closed after EOF), and a live server on a real socket.  The default
run is a quick slice; ``-m soak`` pushes at least 100,000 inputs through.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import msgspec
import pytest
from conftest import FakeController
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import served_in_thread
from wire_inputs import FIELDS, encode, request_objects, single_inputs, streams

from vmhost.control import goscan, wire
from vmhost.control.connection import Connection
from vmhost.control.server import Server
from vmhost.control.wire import Request, Response

QUICK: Final = 500
SOAK: Final = 100_000
LIVE_QUICK: Final = 150
LIVE_SOAK: Final = 5_000
_KNOWN_STATES: Final = {"running", "stopping", "stopped", "error"}
_ERROR_PREFIXES: Final = ("invalid request: ", "unknown method: ")

# -- layer 1: the decoder --------------------------------------------------------


def decodes_or_rejects(data: bytes) -> Request | None:
    """``decode_request``'s contract: a Request, or ``msgspec.DecodeError``, nothing else."""
    try:
        return goscan.decode_request(data)
    except msgspec.DecodeError:
        return None


@settings(max_examples=QUICK, deadline=None)
@given(single_inputs)
def test_decoder_raises_only_decode_error(data: bytes) -> None:
    """Any bytes decode to a Request or raise msgspec.DecodeError; no other exception escapes."""
    decodes_or_rejects(data)


@settings(max_examples=QUICK, deadline=None)
@given(request_objects(), st.booleans())
def test_decoder_agrees_with_go_semantics(obj: dict[str, Any], ascii_only: bool) -> None:
    """Unknown keys are ignored, key case does not matter, the last non-null duplicate wins, a
    wrong type for a Go field is refused and for a vmhost extension ignored (Go ignores those)."""
    data = encode(obj, ascii_only)
    folded = {k.casefold(): v for k, v in obj.items() if v is not None}
    known = {k: folded[k] for k in FIELDS if k in folded}
    types = {"method": str, "timeout_seconds": int, "detail": bool, "lines": int, "follow": bool}
    typed: dict[str, Any] = {
        k: v
        for k, v in known.items()
        if isinstance(v, types[k])
        and (types[k] is bool) == isinstance(v, bool)
        and (not isinstance(v, int) or -(2**63) <= v < 2**63)
    }
    request = decodes_or_rejects(data)
    if any(k not in typed for k in ("method", "timeout_seconds") if k in known):
        assert request is None
        return
    assert request == Request(**typed)


# -- layer 2: the connection protocol object, chunk by chunk -----------------------


class RecordingTransport(asyncio.Transport):
    """Collects what the server writes; a unit-test stand-in for the socket transport only."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True
        self.writes_after_close = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            self.writes_after_close += 1
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def responses(raw: bytes | bytearray) -> list[Response]:
    """Parse the server's output: complete lines, each a valid Response of the known shapes."""
    assert not raw or raw.endswith(b"\n"), f"partial answer {bytes(raw[-80:])!r}"
    answers = [wire.decode_response(line) for line in bytes(raw).splitlines()]
    for answer in answers:
        if answer.ok:
            assert answer.state in _KNOWN_STATES and not answer.error
        else:
            assert answer.error.startswith(_ERROR_PREFIXES), answer.error
    return answers


async def feed(
    chunks: list[bytes], *, eof: bool = True
) -> tuple[list[Response], RecordingTransport]:
    """One connection's life: connect, the chunks, then EOF; returns the answers.

    Like a real transport, nothing is delivered while the server has paused
    reading (it does so to let other connections have their turn).
    """
    server = Server(FakeController(), Path("/nonexistent"))
    conn = Connection(server)
    transport = RecordingTransport()
    conn.connection_made(transport)

    async def readable() -> None:
        for _ in range(100_000):
            if transport.reading or transport.closed:
                return
            await asyncio.sleep(0)
        raise AssertionError("the server never resumed reading")

    for chunk in chunks:
        await readable()
        if transport.closed:
            break
        conn.data_received(chunk)
    await readable()
    if eof and not transport.closed:
        conn.eof_received()
    await asyncio.sleep(0)  # let stop/force_stop tasks run: they must not fail either
    return responses(transport.written), transport


@st.composite
def chunked(draw: st.DrawFn) -> list[bytes]:
    data = draw(streams)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """stop/force_stop answers start a task: each exchange runs inside this loop."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def check_stream(loop: asyncio.AbstractEventLoop, chunks: list[bytes]) -> None:
    answers, transport = loop.run_until_complete(feed(chunks))
    data = b"".join(chunks)
    assert transport.closed, "connection left open after EOF"
    assert transport.writes_after_close == 0
    if data.strip():
        assert answers, f"no answer to {data[:80]!r}"
    invalid = [i for i, a in enumerate(answers) if a.error.startswith("invalid request: ")]
    assert invalid in ([], [len(answers) - 1]), "answers after an invalid request"


@settings(max_examples=QUICK, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked())
def test_connection_answers_every_chunking(
    loop: asyncio.AbstractEventLoop, chunks: list[bytes]
) -> None:
    """Any input, split anywhere, gets well-formed answers and a close after EOF, never an error."""
    check_stream(loop, chunks)


@settings(max_examples=QUICK, deadline=None)
@given(st.sampled_from(["status", "info", "stop", "force_stop"]), st.data())
def test_split_request_gets_the_same_answer(
    loop: asyncio.AbstractEventLoop, method: str, data: st.DataObject
) -> None:
    """A valid request answers the same however its bytes are split into reads."""
    line = wire.encode_request(Request(method=method))
    cuts = sorted(data.draw(st.lists(st.integers(1, len(line) - 1), max_size=len(line))))
    chunks = [line[a:b] for a, b in zip([0, *cuts], [*cuts, len(line)], strict=True)]

    whole, _ = loop.run_until_complete(feed([line]))
    split, _ = loop.run_until_complete(feed(chunks))
    assert len(whole) == 1 and whole[0].ok
    assert split == whole


@settings(max_examples=QUICK // 5, deadline=None)
@given(st.lists(st.sampled_from(["status", "info"]), min_size=1, max_size=300), st.data())
def test_pipelined_requests_are_all_answered_in_order(
    loop: asyncio.AbstractEventLoop, methods: list[str], data: st.DataObject
) -> None:
    """Hundreds of pipelined requests, split anywhere: one answer each, in order, none lost."""
    line = b"".join(wire.encode_request(Request(method=m)) for m in methods)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(line)), max_size=6)))
    chunks = [line[a:b] for a, b in zip([0, *cuts], [*cuts, len(line)], strict=True)]
    answers, _ = loop.run_until_complete(feed(chunks))
    assert [a.backend == "qemu" for a in answers] == [m == "info" for m in methods]


def test_oversized_line_is_refused(loop: asyncio.AbstractEventLoop) -> None:
    """A value not complete within 64 KiB is answered 'request too large' and closed."""
    for data in (b" " * (wire.MAX_REQUEST_BYTES + 1) + b"\n", b'"' + b"x" * 200_000):
        answers, transport = loop.run_until_complete(feed([data], eof=False))
        assert answers == [Response(ok=False, error="invalid request: request too large")]
        assert transport.closed


def test_deep_nesting_is_an_invalid_request(loop: asyncio.AbstractEventLoop) -> None:
    """Nesting deeper than Go's 10,000 levels is an ordinary invalid request."""
    answers, transport = loop.run_until_complete(feed([b"[" * 60_000 + b"\n"], eof=False))
    assert len(answers) == 1 and answers[0].error.startswith("invalid request: ")
    assert transport.closed


def test_invalid_utf8_without_newline_is_answered(loop: asyncio.AbstractEventLoop) -> None:
    """Invalid UTF-8 in a request that lacks its newline is answered too, not raised."""
    answers, _ = loop.run_until_complete(feed([b'{"method":"st\xffatus"}'], eof=False))
    assert len(answers) == 1 and not answers[0].ok


@pytest.mark.soak
def test_soak_connection_fuzz(loop: asyncio.AbstractEventLoop) -> None:
    """At least 100,000 fuzzed inputs through the decoder and the connection object."""
    seen = 0

    @settings(max_examples=SOAK, deadline=None, suppress_health_check=list(HealthCheck))
    @given(chunked())
    def one(chunks: list[bytes]) -> None:
        nonlocal seen
        seen += 1
        decodes_or_rejects(b"".join(chunks))
        check_stream(loop, chunks)

    one()
    print(f"\nfuzzed inputs (connection layer): {seen}")
    assert seen >= SOAK


# -- layer 3: a live server on a real unix socket ---------------------------------


@pytest.fixture(scope="module")
def live_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with served_in_thread(tmp_path_factory.mktemp("live") / "vmhost.sock", FakeController()) as p:
        yield p


def exchange_live(path: Path, data: bytes, *, timeout: float = 3.0) -> bytes:
    """Send, half-close, read to EOF; a hang shows as a socket timeout."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
        return bytes(received)


def check_live(path: Path, data: bytes) -> None:
    answers = responses(exchange_live(path, data))
    if data.strip() and len(data) <= wire.MAX_REQUEST_BYTES:
        assert answers, f"no answer to {data[:80]!r}"


def fuzz_live(path: Path, examples: int) -> int:
    """Hypothesis inputs over the live socket; returns how many were sent."""
    seen = 0

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(streams)
    def one(data: bytes) -> None:
        nonlocal seen
        seen += 1
        check_live(path, data)

    one()
    assert wire.decode_response(exchange_live(path, b'{"method":"status"}\n')).ok
    return seen


def test_live_server_answers_fuzzed_input(live_socket: Path) -> None:
    """Over a real socket, each fuzzed input is answered well-formed and closed within 3 s."""
    assert fuzz_live(live_socket, LIVE_QUICK) >= LIVE_QUICK


@pytest.mark.soak
def test_soak_live_server(live_socket: Path) -> None:
    """5,000 fuzzed inputs over a real socket; the server still answers afterwards."""
    seen = fuzz_live(live_socket, LIVE_SOAK)
    print(f"\nfuzzed inputs (live socket): {seen}")
    assert seen >= LIVE_SOAK
