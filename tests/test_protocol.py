"""Golden bytes of the control wire, as Go's encoding/json writes and reads them."""

from __future__ import annotations

import msgspec
import pytest

from vmhost import protocol
from vmhost.protocol import Request, Response, VMState

GOLDEN_RESPONSES = [
    (Response(ok=True, state="running"), b'{"ok":true,"state":"running"}\n'),
    (
        Response(ok=True, state="running", ssh_port=2222, backend="qemu"),
        b'{"ok":true,"state":"running","ssh_port":2222,"backend":"qemu"}\n',
    ),
    (Response(ok=True, state="stopping"), b'{"ok":true,"state":"stopping"}\n'),
    (
        Response(ok=False, error="unknown method: reboot"),
        b'{"ok":false,"error":"unknown method: reboot"}\n',
    ),
    (Response(ok=False), b'{"ok":false}\n'),
]

GOLDEN_REQUESTS = [
    (Request(method="status"), b'{"method":"status"}\n'),
    (Request(method="info"), b'{"method":"info"}\n'),
    (Request(method="force_stop"), b'{"method":"force_stop"}\n'),
    (Request(method="stop", timeout_seconds=10), b'{"method":"stop","timeout_seconds":10}\n'),
]


@pytest.mark.parametrize(("response", "wire"), GOLDEN_RESPONSES)
def test_response_bytes(response: Response, wire: bytes) -> None:
    """Responses encode byte for byte as the Go server writes them."""
    assert protocol.encode_response(response) == wire
    assert protocol.decode_response(wire) == response


@pytest.mark.parametrize(("request_", "wire"), GOLDEN_REQUESTS)
def test_request_bytes(request_: Request, wire: bytes) -> None:
    """Requests encode as the Go client writes them and decode back."""
    assert protocol.encode_request(request_) == wire
    assert protocol.decode_request(wire.rstrip(b"\n")) == request_


@pytest.mark.parametrize(
    ("wire", "method", "timeout"),
    [
        (b'{"Method":"status"}', "status", 0),
        (b'{"METHOD":"stop","Timeout_Seconds":5}', "stop", 5),
        (b'{"method":"info","unknown":[1,{"x":2}]}', "info", 0),
        (b'{"method":null}', "", 0),
        (b"{}", "", 0),
        (b' {"method" : "status"} ', "status", 0),
        (b'{"method":"stop","method":"status"}', "status", 0),
        (b'{"\\u006dethod":"status"}', "status", 0),
    ],
)
def test_go_decoder_compatibility(wire: bytes, method: str, timeout: int) -> None:
    """What Go's decoder accepts (case-folded keys, unknown keys, null, last key wins) decodes."""
    request = protocol.decode_request(wire)
    assert (request.method, request.timeout_seconds) == (method, timeout)


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"{bad", "malformed"),
        (b"\xff\xfe", "malformed"),
        (b"[]", "array"),
        (b'"status"', "string"),
        (b'{"method":5}', "Expected `str`, got `int`"),
        (b'{"method":"stop","timeout_seconds":1.5}', "Expected `int`, got `float`"),
        (b'{"method":"stop","timeout_seconds":9223372036854775808}', "<= 9223372036854775807"),
        (b'{"method":"status"', "truncated"),
    ],
)
def test_undecodable_requests(wire: bytes, reason: str) -> None:
    """Requests Go rejects are rejected here too, with a message that says why."""
    with pytest.raises(msgspec.DecodeError, match=reason):
        protocol.decode_request(wire)


def test_invalid_request_text() -> None:
    """Decoder errors travel as `invalid request: ...`."""
    assert protocol.invalid_request("x") == b'{"ok":false,"error":"invalid request: x"}\n'


def test_wire_states_are_the_go_vocabulary() -> None:
    """Every fine state maps onto a word the Go daemon knows."""
    assert {s.wire for s in VMState} == {"running", "stopping", "stopped", "error"}
    assert VMState.CRASHED.wire == "error" and VMState.CRASHED.ended


def test_extensions_are_invisible_unless_set() -> None:
    """Extension fields are omitted when empty, so a Go peer never sees them."""
    response = Response(ok=True, state="running", vm_state="", pid=0, message="")
    assert protocol.encode_response(response) == b'{"ok":true,"state":"running"}\n'
