"""The wire against Go's own encoding/json: the same bytes, in the same writes, to the Go
oracle (tests/goracle: the seed's types and the Go server's per-connection logic, standard
library only) and to a real vmhost server; the first answer line must match byte for byte, or as
a Go client reads it, and so must whether each side closes."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Final

import pytest
from conftest import CACHE, FakeController, prerequisite_missing
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from serving import served_in_thread
from wire_inputs import mutated, recase

from vmhost.control import wire

GO_QUICK: Final = 300
GO_SOAK: Final = 20_000
GORACLE: Final = Path(__file__).with_name("goracle")
_SIZE_LIMIT: Final = wire.MAX_REQUEST_BYTES // 2
"""Inputs stay well inside the size limit: past it vmhost refuses on purpose (README)."""


@pytest.fixture(scope="session")
def goracle() -> Path:
    """tests/goracle built once (standard library only, no network), cached by source hash."""
    go = shutil.which("go")
    if go is None:
        prerequisite_missing(
            "no `go` on PATH: the Go oracle needs golang-go (scripts/setup installs it)"
        )
    sources = [*sorted(GORACLE.rglob("*.go")), GORACLE / "go.mod"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    build = CACHE / "goracle"
    binary = build / digest / "goracle"
    if not binary.exists():
        env = {
            **os.environ,
            "GOCACHE": str(build / "gocache"),
            "GOPATH": str(build / "gopath"),
            "GOTOOLCHAIN": "local",
            "GOFLAGS": "",
            "CGO_ENABLED": "0",
        }
        subprocess.run([go, "build", "-o", str(binary), "."], cwd=GORACLE, env=env, check=True)
    return binary


class StaysRunning(FakeController):
    """The oracle's VM never changes state, so neither may vmhost's: stops are only counted."""

    def stop(self, timeout: float | None = None) -> Awaitable[None]:
        self.stops.append(timeout)
        return self.wait()

    def force_stop(self) -> Awaitable[None]:
        self.force_stops += 1
        return self.wait()


@pytest.fixture(scope="module")
def peers(goracle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the Go oracle's socket, vmhost's socket), both serving a running VM."""
    directory = tmp_path_factory.mktemp("wire")
    go_sock = directory / "go.sock"
    oracle = subprocess.Popen(
        [str(goracle), str(go_sock), "running", str(FakeController.ssh_port), "qemu"],
        stdout=subprocess.PIPE,
    )
    try:
        assert oracle.stdout is not None and oracle.stdout.readline() == b"serving\n"
        with served_in_thread(directory / "vmhost.sock", StaysRunning()) as py_sock:
            yield go_sock, py_sock
    finally:
        oracle.kill()
        oracle.wait()


# Values as a Go peer could spell them: keys in any case and order, duplicates, nulls, unknown
# fields of every JSON type, numbers at the int64 edges and as floats, escapes (lone surrogates
# too), invalid UTF-8, white space anywhere.
_SPACE = st.sampled_from([b"", b"", b" ", b"\n", b"\t", b"\r\n", b"  \n "])
_INTS = st.sampled_from([0, 1, -1, 10, 2**31, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 10**30])
_NUMBERS = (
    _INTS.map(lambda n: str(n).encode())
    | st.sampled_from([b"1.5", b"1e3", b"1E+2", b"-0", b"0.0", b"5e-1", b"-1.0e1", b"01", b"1."])
    | st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode())
)
_ODD_TEXT = st.sampled_from(
    [
        b"\\ud800",
        b"\\udc00",
        b"\\ud800\\udc00",
        b"\\ud83d\\ude00x",
        b"\xff",
        b"\xc3",
        b"\xed\xa0\x80",
        b"\\u0041",
        b'\\"',
        b"\\\\",
        b"<&>",
        "\u2028".encode(),
        "\u017f".encode(),
        "\u212a".encode(),
        b"\\n",
        b"\\x",
        b"\x01",
        b"\\u12",
        b"\\/",
        "é".encode(),
    ]
)


_METHODS: Final = st.sampled_from(
    [b'"status"', b'"info"', b'"stop"', b'"force_stop"', b'"logs"', b'"STATUS"', b'"\\u0073tatus"']
)


@st.composite
def _string(draw: st.DrawFn, text: bytes | None = None) -> bytes:
    """A JSON string token: ``text`` (or random text) with escapes and odd bytes mixed in."""
    if text is None:
        text = draw(st.text(max_size=8)).encode("utf-8", "surrogatepass")
    parts = [text]
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(parts[0])))
        parts[0] = parts[0][:pos] + draw(_ODD_TEXT) + parts[0][pos:]
    if draw(st.booleans()) and text:  # a letter as a \u escape
        i = draw(st.integers(0, len(text) - 1))
        if text[i : i + 1].isalpha():
            parts[0] = parts[0].replace(text[i : i + 1], b"\\u%04x" % text[i], 1)
    return b'"' + parts[0].replace(b'"', b"") + b'"'


def _key(name: str) -> st.SearchStrategy[bytes]:
    spelled = recase(name).map(str.encode) | st.just(name.replace("s", "\u017f").encode())
    return spelled.flatmap(lambda k: _string(k) | st.just(b'"' + k + b'"'))


@st.composite
def _value(draw: st.DrawFn, depth: int = 0) -> bytes:
    kind = draw(st.integers(0, 6 if depth < 2 else 4))
    if kind == 0:
        return draw(_NUMBERS)
    if kind == 1:
        return draw(st.sampled_from([b"true", b"false", b"null"]))
    if kind in (2, 3):
        return draw(_string())
    if kind == 4:
        return draw(_METHODS)
    items = draw(st.lists(_value(depth + 1), max_size=3))
    if kind == 5:
        return b"[" + b",".join(items) + b"]"
    return b"{" + b",".join(draw(_string()) + b":" + v for v in items) + b"}"


@st.composite
def _object(draw: st.DrawFn) -> bytes:
    """A request-shaped object: fields Go knows and vmhost's own, unknown ones, in any order."""
    pairs = []
    for name in ("method", "timeout_seconds", "detail", "lines", "follow", "x", "method"):
        if draw(st.integers(0, 3)) == 0 and name != "method":
            continue
        key = draw(_key(name)) if name != "x" else draw(_string())
        value = _METHODS | _string() if name == "method" and draw(st.booleans()) else _value()
        pairs.append((key, draw(value)))
    if draw(st.integers(0, 9)) == 0:  # deep nesting in a field Go skips: its limit is 10,000
        depth = draw(st.sampled_from([100, 9_999, 10_000, 10_001]))
        pairs.append((b'"deep"', b"[" * depth + b"]" * depth))
    order = draw(st.permutations(range(len(pairs))))
    space = draw(_SPACE)
    body = (b"," + space).join(pairs[i][0] + space + b":" + space + pairs[i][1] for i in order)
    return b"{" + space + body + space + b"}"


_TRAILERS = st.sampled_from(
    [b"", b"\n", b"garbage", b'\n{"method":"info"}\n', b'{"method":"bogus"}', b" 1", b"]", b"\x00"]
)


@st.composite
def wire_inputs(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """What one connection sends (in chunks, as written) and whether it then half-closes."""
    kind = draw(st.integers(0, 9))
    if kind < 6:
        data = draw(_object())
    elif kind == 6:
        data = draw(_value())
    elif kind == 7:
        data = draw(mutated())
    elif kind == 8:
        data = draw(st.sampled_from([b"", b" ", b"\n\t ", b"\xef\xbb\xbf{}"]))
    else:
        data = draw(st.binary(max_size=40))
    data = draw(_SPACE) + data + draw(_TRAILERS)
    assume(len(data) < _SIZE_LIMIT)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return chunks, draw(st.sampled_from([True, True, True, True, False]))


class _Exchange:
    """One connection to one server: the input written as given, then its first answer line."""

    def __init__(self, path: Path, chunks: list[bytes], half_close: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.received = bytearray()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for chunk in chunks:
                self.sock.sendall(chunk)
                time.sleep(0.001)  # a read per chunk, mostly
            if half_close:
                self.sock.shutdown(socket.SHUT_WR)

    def line(self, wait: float) -> bytes | None:
        """The first answer line, if it comes within ``wait`` seconds."""
        self.sock.settimeout(wait)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while b"\n" not in self.received and (chunk := self.sock.recv(65536)):
                self.received += chunk
        if b"\n" not in self.received:
            return None
        return bytes(self.received[: self.received.index(b"\n") + 1])

    def closes(self, wait: float) -> bool:
        """Whether the server closes within ``wait`` (reading whatever else it sends)."""
        self.sock.settimeout(wait)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass  # closed with our input unread: the kernel resets instead
        finally:
            self.sock.close()
        return True


def _as_go_client_sees(line: bytes) -> tuple[object, ...]:
    r = wire.decode_response(line)
    return r.ok, bool(r.error), r.state, r.ssh_port, r.backend


_pool = concurrent.futures.ThreadPoolExecutor(2)
_PATIENCE: Final = 10.0
"""How long an answer that must come may take on a loaded machine."""


def differ(peers: tuple[Path, Path], chunks: list[bytes], half_close: bool) -> None:
    """Both servers get the same input; the first answers must match as Go's client reads them,
    and each must close after it where Go does."""
    go, py = _pool.map(lambda p: _Exchange(p, chunks, half_close), peers)
    # Without a half-close an incomplete value gets no answer: a short look, then, if only
    # one side answered, time for the other to.
    lines = list(_pool.map(lambda e: e.line(_PATIENCE if half_close else 0.1), (go, py)))
    if not half_close and lines.count(None) == 1:
        lines = [line or e.line(_PATIENCE) for line, e in zip(lines, (go, py), strict=True)]
    go_line, py_line = lines
    data = b"".join(chunks)
    context = (data[:300], half_close, go_line, py_line)
    assert (go_line is None) == (py_line is None), context
    if go_line is None or py_line is None:
        for e in (go, py):
            e.sock.close()
        return  # nothing yet on either side: the value is not complete without more input
    if go_line != py_line:
        # vmhost's extension fields (asked for with "detail") are the only allowed difference.
        assert _as_go_client_sees(go_line) == _as_go_client_sees(py_line), context
        assert b'"vm_state"' in py_line, context
    # Go closes at once; vmhost then too, or it serves more (pipelining, README).
    must_close = half_close or py_line.startswith(b'{"ok":false,"error":"invalid request: ')
    go_closed, py_closed = _pool.map(
        lambda e: e.closes(_PATIENCE if e is go or must_close else 0.05), (go, py)
    )
    assert go_closed, context
    assert py_closed or not must_close, context


@settings(max_examples=GO_QUICK, deadline=None, suppress_health_check=list(HealthCheck))
@given(wire_inputs())
def test_answers_match_go(peers: tuple[Path, Path], sent: tuple[list[bytes], bool]) -> None:
    """The Go server's own encoding/json and vmhost answer the same inputs alike."""
    differ(peers, *sent)


@pytest.mark.soak
def test_soak_answers_match_go(peers: tuple[Path, Path]) -> None:
    """At least 20,000 inputs through both servers."""
    seen = 0

    @settings(max_examples=GO_SOAK, deadline=None, suppress_health_check=list(HealthCheck))
    @given(wire_inputs())
    def one(sent: tuple[list[bytes], bool]) -> None:
        nonlocal seen
        seen += 1
        differ(peers, *sent)

    one()
    print(f"\ninputs compared with Go: {seen}")
    assert seen >= GO_SOAK
