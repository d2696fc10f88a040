"""The control server over real unix sockets: answers, framing, bad input, limits.

Every test runs on uvloop (what ``vmhost serve`` uses) and on the stdlib loop (serving.py).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from conftest import FakeController
from serving import STATUS, STOPPING, ask, event_loop_policy, exchange

import vmhost
from vmhost.control import wire
from vmhost.control.connection import Limits
from vmhost.control.server import Server
from vmhost.control.wire import Request
from vmhost.vm.state import VMState

__all__ = ["event_loop_policy"]  # a fixture, used by name
pytestmark = pytest.mark.filterwarnings("ignore:Overriding the .event_loop_policy. fixture")


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        (b'{"method":"status"}\n', STATUS),
        (
            b'{"method":"info"}\n',
            b'{"ok":true,"state":"running","ssh_port":2222,"backend":"qemu"}\n',
        ),
        (b'{"Method":"status"}\n', STATUS),
        (b'{"method":"reboot"}\n', b'{"ok":false,"error":"unknown method: reboot"}\n'),
        (b"{}\n", b'{"ok":false,"error":"unknown method: "}\n'),
        (b'{"method":"status"}', STATUS),
        (
            b'{"method":"status","detail":true}\n',
            b'{"ok":true,"state":"running","vm_state":"running","pid":4242,"version":"%s"}\n'
            % vmhost.__version__.encode(),
        ),
        (b'{\n  "method": "status"\n}\n', STATUS),
        (b'{"method":"status"}garbage', STATUS),
        (b'{"method":"<&>"}\n', b'{"ok":false,"error":"unknown method: \\u003c\\u0026\\u003e"}\n'),
    ],
)
async def test_answers(server: Server, sock_path: Path, line: bytes, answer: bytes) -> None:
    """Each request gets the Go server's exact bytes: newline or not, over several lines,
    followed by anything, with Go's escapes in the answer."""
    assert await ask(sock_path, line) == answer


async def test_state_changes_are_seen(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    """A cached answer follows the controller's state."""
    assert await ask(sock_path) == STATUS
    controller.state = VMState.CRASHED
    assert await ask(sock_path) == b'{"ok":true,"state":"error"}\n'


async def test_stop_and_force_stop(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    """stop answers stopping and has started when the answer arrives; no timeout (or 0) leaves
    it to the controller: the config's [stop] timeout_seconds."""
    assert await ask(sock_path, b'{"method":"stop","timeout_seconds":10}\n') == STOPPING
    assert controller.stops == [10]
    assert await ask(sock_path) == b'{"ok":true,"state":"stopping"}\n'
    assert await ask(sock_path, b'{"method":"stop"}\n') == STOPPING
    assert await ask(sock_path, b'{"method":"stop","timeout_seconds":0}\n') == STOPPING
    assert await ask(sock_path, b'{"method":"force_stop"}\n') == STOPPING
    assert controller.stops == [10, None, None]
    assert controller.force_stops == 1


async def test_pipelined_requests(server: Server, sock_path: Path) -> None:
    """Several requests on one connection, with or without newlines, answered in order."""
    answer = await exchange(
        sock_path,
        b'{"method":"status"}\n{"method":"bogus"}{"method":"status"}\n',
        close_write=True,
    )
    assert answer == STATUS + b'{"ok":false,"error":"unknown method: bogus"}\n' + STATUS


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"{bad json\n", b"invalid character 'b' looking for beginning of object key string"),
        (b'\xff\xfe{"method":"status"}\n', b"invalid character '\xc3\xbf' looking for beginning"),
        (
            b'{"method":7}\n',
            b"json: cannot unmarshal number into Go struct field Request.method of type",
        ),
        (b'["status"]\n', b"json: cannot unmarshal array into Go value of type vmhost.Request"),
        (b"[" * 10_001, b"invalid character '[' exceeded max depth"),
        (b'{"method":"status"' + b" " * 70000 + b"}\n", b"request too large"),
        (b" " * 70000 + b'{"method":"status"}', b"request too large"),
    ],
)
async def test_bad_input_is_answered_and_closed(
    server: Server, sock_path: Path, data: bytes, error: bytes
) -> None:
    """Bad input gets one `invalid request` answer in Go's words (or, past the size limit, a
    refusal), then the server closes the connection."""
    answer = await exchange(sock_path, data + b'{"method":"status"}\n')
    assert answer.startswith(b'{"ok":false,"error":"invalid request: ' + error)
    assert answer.count(b"\n") == 1


@pytest.mark.parametrize(
    ("data", "answer"),
    [
        (b"", b'{"ok":false,"error":"invalid request: EOF"}\n'),
        (b" \n\t ", b'{"ok":false,"error":"invalid request: EOF"}\n'),
        (b'{"method":"sta', b'{"ok":false,"error":"invalid request: unexpected EOF"}\n'),
        (b'{"method":"status"}\n  ', STATUS),
        (b"null", b'{"ok":false,"error":"unknown method: "}\n'),
    ],
)
async def test_half_close(server: Server, sock_path: Path, data: bytes, answer: bytes) -> None:
    """After a half-close, Go's answer: EOF before any value, or the value EOF completed."""
    assert await exchange(sock_path, data, close_write=True) == answer


async def test_request_split_into_many_reads(server: Server, sock_path: Path) -> None:
    """A request dribbled a byte at a time is answered once it is whole, not before."""
    reader, writer = await asyncio.open_unix_connection(sock_path)
    wire = b'{"method":\n"info"  }'
    for byte in wire[:-1]:
        writer.write(bytes([byte]))
        await writer.drain()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await reader.readline()
    writer.write(wire[-1:])
    async with asyncio.timeout(10):
        assert (await reader.readline()).startswith(b'{"ok":true,"state":"running","ssh_port"')
    writer.close()


async def test_silent_client_is_closed(server: Server, sock_path: Path) -> None:
    """A client that sends nothing is dropped after the request timeout, without an answer."""
    start = time.monotonic()
    assert await exchange(sock_path, b"") == b""
    assert time.monotonic() - start >= server.limits.request_timeout


async def test_stalled_half_line_times_out(server: Server, sock_path: Path) -> None:
    """Half a request and a stall gets a timeout error, then the connection is closed."""
    answer = await exchange(sock_path, b'{"method":"sta')
    assert answer == (
        b'{"ok":false,"error":"invalid request: timed out waiting for the rest of the request"}\n'
    )


async def test_many_connections_at_once(server: Server, sock_path: Path) -> None:
    """200 clients at once all get answers while idle ones are still open."""
    idle = [await asyncio.open_unix_connection(sock_path) for _ in range(50)]
    answers = await asyncio.gather(*(ask(sock_path) for _ in range(200)))
    assert answers == [STATUS] * 200
    for _, writer in idle:
        writer.close()


async def test_cap_evicts_idle_not_the_newcomer(server: Server, sock_path: Path) -> None:
    """Past max_connections the oldest idle connection goes, and a new client is still served."""
    idle = [
        await asyncio.open_unix_connection(sock_path) for _ in range(server.limits.max_connections)
    ]
    assert await ask(sock_path) == STATUS
    assert await idle[0][0].read() == b""
    for _, writer in idle:
        writer.close()


async def test_abusers_do_not_slow_a_good_client(server: Server, sock_path: Path) -> None:
    """A good client's answers keep coming while others stall, flood and send junk: none of
    its requests waits for the stalled clients' timeout (the figures are in the bench)."""
    stalled = []
    for _ in range(100):
        _, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"method":')
        stalled.append(writer)
    junk = [exchange(sock_path, b"\x00" * 5000 + b"\n") for _ in range(50)]
    latencies = []

    async def good() -> None:
        for _ in range(200):
            start = time.perf_counter()
            assert await ask(sock_path) == STATUS
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(good(), *junk)
    assert max(latencies) < server.limits.request_timeout / 2
    for writer in stalled:
        writer.close()


async def test_a_failing_turn_does_not_wedge_the_others(
    server: Server, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in one pipelining client's turn costs that client, not the others'."""
    lines = wire.encode_request(Request(method="stop", timeout_seconds=5)) * 200
    real = server.answer
    calls = 0

    def answer(request: Request) -> bytes | None:
        nonlocal calls
        calls += 1
        if calls == 100:  # inside the second turn of the first client
            raise RuntimeError("boom")
        return real(request)

    monkeypatch.setattr(server, "answer", answer)
    first = await exchange(sock_path, lines, close_write=True)
    answered = first.count(b"\n")  # its first turn at least; never the failed one's
    assert first == STOPPING * answered and 64 <= answered < 100
    second = await exchange(sock_path, lines, close_write=True)
    assert second == STOPPING * 200


async def test_default_request_limit(tmp_path: Path, controller: FakeController) -> None:
    """With the default limits, a 64 KiB request is served and one byte more is refused."""
    path = tmp_path / "s.sock"
    request = b'{"method":"status"' + b" " * (wire.MAX_REQUEST_BYTES - 19) + b"}"
    assert len(request) == Limits().max_request
    async with Server(controller, path):
        assert await ask(path, request) == STATUS
        refused = await exchange(path, b" " + request)
    assert refused == wire.invalid_request("request too large")


async def test_stop_detail_says_what_was_granted(server: Server, sock_path: Path) -> None:
    """A stop asking for detail learns its timeout and that it was clamped; a Go one does not."""
    plain = await ask(sock_path, b'{"method":"stop","timeout_seconds":900}\n')
    assert plain == STOPPING
    detailed = wire.decode_response(
        await ask(sock_path, b'{"method":"stop","timeout_seconds":900,"detail":true}\n')
    )
    assert (detailed.state, detailed.vm_state) == ("stopping", "stopping")
    assert detailed.message == (
        "stop timeout 600 s (asked 900 s: clamped to [stop] max_timeout_seconds)"
    )


async def test_migrate_is_started_or_refused_with_the_reason(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    """migrate: a bad URI and a VM already migrating are refused; a stop meanwhile too."""
    bad = b'{"method":"migrate","uri":"exec:sh"}\n'
    assert await ask(sock_path, bad) == (
        b'{"ok":false,"error":"cannot migrate: not a tcp:HOST:PORT URI: \'exec:sh\'"}\n'
    )
    good = b'{"method":"migrate","uri":"tcp:host2:49152"}\n'
    assert await ask(sock_path, good) == b'{"ok":true,"state":"running","vm_state":"migrating"}\n'
    assert controller.migrations == ["tcp:host2:49152"]
    again = await ask(sock_path, good)
    assert again == b'{"ok":false,"error":"cannot migrate: the VM is migrating"}\n'
    refused = await ask(sock_path, b'{"method":"stop"}\n')
    assert b'"ok":false' in refused and b"migrating" in refused
    assert controller.stops == []
