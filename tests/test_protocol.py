"""Golden bytes of the control wire, as Go's encoding/json writes and reads them."""

from __future__ import annotations

import msgspec
import pytest

from vmhost.control import goscan, wire
from vmhost.control.wire import Request, Response
from vmhost.vm.state import VMState

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


@pytest.mark.parametrize(("response", "line"), GOLDEN_RESPONSES)
def test_response_bytes(response: Response, line: bytes) -> None:
    """Responses encode byte for byte as the Go server writes them."""
    assert wire.encode_response(response) == line
    assert wire.decode_response(line) == response


@pytest.mark.parametrize(("request_", "line"), GOLDEN_REQUESTS)
def test_request_bytes(request_: Request, line: bytes) -> None:
    """Requests encode as the Go client writes them and decode back."""
    assert wire.encode_request(request_) == line
    assert goscan.decode_request(line.rstrip(b"\n")) == request_


@pytest.mark.parametrize(
    ("line", "method", "timeout"),
    [
        (b'{"Method":"status"}', "status", 0),
        (b'{"METHOD":"stop","Timeout_Seconds":5}', "stop", 5),
        (b'{"method":"info","unknown":[1,{"x":2}]}', "info", 0),
        (b'{"method":null}', "", 0),
        (b"{}", "", 0),
        (b"null", "", 0),
        (b' {"method" : "status"} ', "status", 0),
        (b'{"method":"stop","method":"status"}', "status", 0),
        (b'{"method":"a","Method":"b","method":"stop"}', "stop", 0),
        (b'{"method":"stop","method":null}', "stop", 0),
        (b'{"\\u006dethod":"status"}', "status", 0),
        (b'{"method":"stop","timeout_\xc5\xbfeconds":7}', "stop", 7),
        (b'{"method":"st\xffatus"}', "st\ufffdatus", 0),
        (b'{"method":"\\ud800\\u0041\\udc00"}', "\ufffdA\ufffd", 0),
        (b'{"method":"status"}garbage', "status", 0),
        (b'{"method":"status","x":' + b"[" * 9999 + b"]" * 9999 + b"}", "status", 0),
        (b'{"method":"info","timeout_seconds":-0,"detail":"yes"}', "info", 0),
    ],
)
def test_go_decoder_compatibility(line: bytes, method: str, timeout: int) -> None:
    """What Go's decoder accepts (folded keys, unknown keys, null, last key wins, U+FFFD for
    bad UTF-8, deep nesting, trailing bytes) decodes as it does there."""
    request = goscan.decode_request(line)
    assert (request.method, request.timeout_seconds) == (method, timeout)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{bad", "invalid character 'b' looking for beginning of object key string"),
        (b"\xff\xfe", "invalid character '\xff' looking for beginning of value"),
        (b"[]", "json: cannot unmarshal array into Go value of type vmhost.Request"),
        (b'"status"', "json: cannot unmarshal string into Go value of type vmhost.Request"),
        (
            b'{"method":5}',
            "json: cannot unmarshal number into Go struct field Request.method"
            " of type vmhost.Method",
        ),
        (
            b'{"method":"stop","timeout_seconds":1.5}',
            "json: cannot unmarshal number 1.5 into Go struct field Request.timeout_seconds"
            " of type int",
        ),
        (
            b'{"method":"stop","timeout_seconds":9223372036854775808}',
            "json: cannot unmarshal number 9223372036854775808 into Go struct field "
            "Request.timeout_seconds of type int",
        ),
        (b'{"method":"status"', "unexpected EOF"),
        (b" \n", "EOF"),
        (b"[" * 10_001, "invalid character '[' exceeded max depth"),
        (b'{"a":tru}', "invalid character '}' in literal true (expecting 'e')"),
        (b'{"a":1.}', "invalid character '}' after decimal point in numeric literal"),
        (b'{"a":"\\q"}', "invalid character 'q' in string escape code"),
        (b'{"a":"\x01"}', "invalid character '\\x01' in string literal"),
        (b'{"a" 1}', "invalid character '1' after object key"),
        (b'{"a":1 2}', "invalid character '2' after object key:value pair"),
        (b"[1 2]", "invalid character '2' after array element"),
        (b"{'a':1}", "invalid character '\\'' looking for beginning of object key string"),
    ],
)
def test_undecodable_requests(line: bytes, reason: str) -> None:
    """Requests Go rejects are rejected here too, in the words of Go's decoder."""
    with pytest.raises(msgspec.DecodeError) as raised:
        goscan.decode_request(line)
    assert str(raised.value) == reason


@pytest.mark.parametrize("cut", range(1, 40))
def test_scanner_resumes_between_reads(cut: int) -> None:
    """However a value is split into reads, the scanner ends it at the same byte."""
    line = b'{"method":"stop","x":[1.5e3,"\\u00e9",true,null],"timeout_seconds":10} '
    scanner = goscan.Scanner()
    assert scanner.scan(line, min(cut, len(line))) == -1 or cut >= len(line) - 1
    assert scanner.scan(line, len(line)) == len(line) - 1
    assert scanner.request(line) == Request(method="stop", timeout_seconds=10)


def test_go_escapes_in_answers() -> None:
    """An echoed method comes out as Go's encoder writes it: <, >, &, U+2028/9, \\b, \\f."""
    answer = wire.error_response("unknown method: <a&b>\u2028\u2029\b\f\\b")
    assert answer == (
        b'{"ok":false,"error":"unknown method: \\u003ca\\u0026b\\u003e'
        b'\\u2028\\u2029\\u0008\\u000c\\\\b"}\n'
    )


def test_invalid_request_text() -> None:
    """Decoder errors travel as `invalid request: ...`."""
    assert wire.invalid_request("x") == b'{"ok":false,"error":"invalid request: x"}\n'


def test_wire_states_are_the_go_vocabulary() -> None:
    """Every fine state maps onto a word the Go daemon knows."""
    assert {s.wire for s in VMState} == {"running", "stopping", "stopped", "error"}
    assert VMState.CRASHED.wire == "error" and VMState.CRASHED.ended


def test_extensions_are_invisible_unless_set() -> None:
    """Extension fields are omitted when empty, so a Go peer never sees them."""
    response = Response(ok=True, state="running", vm_state="", pid=0, message="")
    assert wire.encode_response(response) == b'{"ok":true,"state":"running"}\n'
