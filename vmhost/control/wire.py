"""The control-socket wire types and encoding, byte-compatible with the Go vmhost daemon.

Go's ``encoding/json`` decides everything here.  Answers: fields in
declaration order, zero values omitted (``omit_defaults``), one value per
line, strings escaped as Go's encoder escapes them.  Requests: Go's server
decodes ONE value from the stream (``json.NewDecoder(conn).Decode``): what
clients send decodes here in one typed step (:func:`decode_plain`); anything
else goes through :mod:`vmhost.control.goscan`, Go's scanner and its words.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

import msgspec

MAX_REQUEST_BYTES: Final = 64 * 1024
MAX_LOG_LINES: Final = 10_000

STATUS: Final = "status"
INFO: Final = "info"
STOP: Final = "stop"
FORCE_STOP: Final = "force_stop"
LOGS: Final = "logs"
WATCH: Final = "watch"
CONSOLE: Final = "console"
MIGRATE: Final = "migrate"
METHODS: Final = frozenset({STATUS, INFO, STOP, FORCE_STOP, LOGS, WATCH, CONSOLE, MIGRATE})
STREAMS: Final = frozenset({LOGS, WATCH, CONSOLE})
"""Methods answered with many lines, until the server closes."""
READ_WRITE: Final = "read-write"
READ_ONLY: Final = "read-only"

Buffer = bytes | bytearray | memoryview
GoInt = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
"""Go's ``int`` on a 64-bit host: a number outside it is refused as Go refuses it."""


class Request(msgspec.Struct, omit_defaults=True):
    """``{"method": ..., "timeout_seconds": ...}``; the rest are vmhost extensions.

    ``detail`` asks for the extension fields of :class:`Response`; ``lines`` and
    ``follow`` belong to the ``logs`` extension method, ``lines``, ``read_only``,
    ``force`` and ``since`` to ``console`` (:mod:`vmhost.control.attach`), ``uri`` (the
    target's ``tcp:HOST:PORT``) to ``migrate``.  A Go peer sends none.
    """

    method: str = ""
    timeout_seconds: GoInt = 0
    detail: bool = False
    lines: GoInt = 0
    follow: bool = False
    read_only: bool = False
    force: bool = False
    since: str = ""
    uri: str = ""


class Response(msgspec.Struct, omit_defaults=True):
    """The Go ``Response``; fields after ``backend`` are only sent to a peer that asks.

    ``event`` (the QMP event or stop step behind a change) is only ever sent to a watcher.
    """

    ok: bool
    error: str = ""
    state: str = ""
    ssh_port: GoInt = 0
    backend: str = ""
    vm_state: str = ""
    pid: int = 0
    message: str = ""
    version: str = ""
    """Of the vmhost answering (detail): after an upgrade, which VMs run the new code."""
    event: str = ""


class ConsoleLine(msgspec.Struct, omit_defaults=True):
    """What vmhost sends an attached console (the ``console`` extension), one JSON line
    each; ``ok`` and ``error`` as in :class:`Response`, so a refusal reads the same."""

    ok: bool
    error: str = ""
    message: str = ""
    """For the person: who has the input, a takeover, why the console ended."""
    mode: str = ""
    """``read-write`` or ``read-only``: on the first line, and whenever it changes."""
    output: bytes = b""
    """The console's bytes as the guest wrote them."""
    resume: str = ""
    """On the last line of a reload: where the next attach's ``since`` picks up."""


_encoder: Final = msgspec.json.Encoder()
_request_decoder: Final = msgspec.json.Decoder(Request)

# What Go's encoder writes differently from msgspec's: <, >, & and U+2028/9 as \u escapes, and
# \b, \f in their \u form (Go 1.19).  An escaped backslash is matched whole, so never split.
_GO_ESCAPE: Final = re.compile(rb"\\\\|\\[bf]|[<>&]|\xe2\x80[\xa8\xa9]")
_GO_FORM: Final = {
    b"\\\\": b"\\\\",
    b"\\b": b"\\u0008",
    b"\\f": b"\\u000c",
    b"<": b"\\u003c",
    b">": b"\\u003e",
    b"&": b"\\u0026",
    "\u2028".encode(): b"\\u2028",
    "\u2029".encode(): b"\\u2029",
}


def encode_request(request: Request) -> bytes:
    """One request line as Go's ``json.Encoder`` writes it."""
    return _encoder.encode(request) + b"\n"


def encode_response(response: Response) -> bytes:
    """One response line as Go's ``json.Encoder`` writes it."""
    data = _encoder.encode(response)
    if response.error or response.message:  # only free text can need Go's escapes
        data = _GO_ESCAPE.sub(lambda m: _GO_FORM[m.group()], data)
    return data + b"\n"


def encode_console(line: ConsoleLine) -> bytes:
    return _encoder.encode(line) + b"\n"


def error_response(text: str) -> bytes:
    return encode_response(Response(ok=False, error=text))


def invalid_request(reason: str) -> bytes:
    return error_response(f"invalid request: {reason}")


def decode_response(data: bytes | memoryview) -> Response:
    return msgspec.json.decode(data, type=Response)


def decode_plain(data: Buffer) -> Request | None:
    """What clients send (lower-case ASCII, no escapes, one value) in one typed decode;
    ``None`` where Go's rules need :class:`~vmhost.control.goscan.Scanner`: then msgspec and Go
    could differ."""
    raw = bytes(data)
    if not (raw.isascii() and raw.islower()) or b"\\" in raw:
        return None
    try:
        return _request_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
