"""The control-socket wire, byte-compatible with the Go vmhost daemon and client.

Go's ``encoding/json`` decides the shape: fields in declaration order, zero
values omitted (``omit_defaults``), one value per line.  Go's decoder ignores
unknown keys, matches keys case-insensitively and leaves a field untouched on
``null``; the slow path of :func:`decode_request` does the same, so a request
the Go server accepts is accepted here.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final

import msgspec

MAX_REQUEST_BYTES: Final = 64 * 1024
DEFAULT_STOP_TIMEOUT: Final = 30

STATUS: Final = "status"
INFO: Final = "info"
STOP: Final = "stop"
FORCE_STOP: Final = "force_stop"
LOGS: Final = "logs"
METHODS: Final = frozenset({STATUS, INFO, STOP, FORCE_STOP, LOGS})

_GoInt = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class VMState(enum.Enum):
    """The VM's lifecycle state; ``wire`` is the Go daemon's coarser word for it."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    UNRESPONSIVE = "unresponsive"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"
    ERROR = "error"

    @property
    def wire(self) -> str:
        return _WIRE[self]

    @property
    def ended(self) -> bool:
        return self in (VMState.STOPPED, VMState.CRASHED, VMState.ERROR)


_WIRE: Final = {
    VMState.STARTING: "running",
    VMState.RUNNING: "running",
    VMState.PAUSED: "running",
    VMState.UNRESPONSIVE: "running",
    VMState.STOPPING: "stopping",
    VMState.STOPPED: "stopped",
    VMState.CRASHED: "error",
    VMState.ERROR: "error",
}


class Request(msgspec.Struct, omit_defaults=True):
    """``{"method": ..., "timeout_seconds": ...}``; the rest are vmhost extensions.

    ``detail`` asks for the extension fields of :class:`Response`; ``lines`` and
    ``follow`` belong to the ``logs`` extension method.  A Go peer sends none.
    """

    method: str = ""
    timeout_seconds: _GoInt = 0
    detail: bool = False
    lines: _GoInt = 0
    follow: bool = False


class Response(msgspec.Struct, omit_defaults=True):
    """The Go ``Response``; fields after ``backend`` are only sent to a peer that asks."""

    ok: bool
    error: str = ""
    state: str = ""
    ssh_port: _GoInt = 0
    backend: str = ""
    vm_state: str = ""
    pid: int = 0
    message: str = ""
    version: str = ""
    """Of the vmhost answering (detail): after an upgrade, which VMs run the new code."""


_encoder: Final = msgspec.json.Encoder()
_request_decoder: Final = msgspec.json.Decoder(Request)
_any_decoder: Final = msgspec.json.Decoder()


def encode_request(request: Request) -> bytes:
    """One request line as Go's ``json.Encoder`` writes it."""
    return _encoder.encode(request) + b"\n"


def encode_response(response: Response) -> bytes:
    """One response line as Go's ``json.Encoder`` writes it."""
    return _encoder.encode(response) + b"\n"


def error_response(text: str) -> bytes:
    return encode_response(Response(ok=False, error=text))


def invalid_request(reason: str) -> bytes:
    return error_response(f"invalid request: {reason}")


def decode_request(data: bytes) -> Request:
    """Decode one request as the Go server would, or raise ``msgspec.DecodeError``."""
    try:
        return _decode_request(data)
    except RecursionError as e:  # msgspec raises it outside its own error tree
        raise msgspec.DecodeError("JSON is nested too deeply") from e
    except UnicodeDecodeError as e:  # likewise, for a string that is not UTF-8
        raise msgspec.DecodeError(f"invalid UTF-8 in a string: {e.reason}") from e


def _decode_request(data: bytes) -> Request:
    """A lower-case ASCII request (what every Go client sends) takes one typed
    decode; anything else goes through a dict so keys can be case-folded and
    ``null`` values dropped, as Go's decoder does.
    """
    if data.isascii() and data.islower():
        try:
            return _request_decoder.decode(data)
        except msgspec.ValidationError:
            pass
    raw = _any_decoder.decode(data)
    if not isinstance(raw, dict):
        raise msgspec.ValidationError(f"cannot decode {_json_kind(raw)} into a request object")
    folded = {k.casefold(): v for k, v in raw.items() if v is not None}
    return msgspec.convert(folded, Request)


def decode_response(data: bytes | memoryview) -> Response:
    return msgspec.json.decode(data, type=Response)


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "null"
