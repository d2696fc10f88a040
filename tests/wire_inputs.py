"""What a control-socket client may send, as Hypothesis strategies: request-shaped objects as a
Go client might spell them, real requests mangled, extremes, and pipelines of them."""

from __future__ import annotations

import json
from typing import Any, Final

from hypothesis import strategies as st

FIELDS: Final = ("method", "timeout_seconds", "detail", "lines", "follow")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
# Two levels, spelled out: st.recursive costs ~5x more per example, and deep nesting
# has its own generator below.  Pairs, not st.dictionaries, whose unique-key filter is slow.
_flat = st.lists(json_scalars, max_size=4) | st.lists(
    st.tuples(st.text(max_size=8), json_scalars), max_size=4
).map(dict)
json_values = json_scalars | _flat | st.lists(_flat, max_size=3)
methods = st.sampled_from(["status", "info", "stop", "force_stop", "logs", "reboot", ""]) | st.text(
    max_size=12
)


def recase(key: str) -> st.SearchStrategy[str]:
    """The key as a Go client might spell it: any mix of upper and lower case."""
    return st.integers(0, 2 ** len(key) - 1).map(
        lambda upper: "".join(c.upper() if upper >> i & 1 else c for i, c in enumerate(key))
    )


@st.composite
def request_objects(draw: st.DrawFn) -> dict[str, Any]:
    """Request-shaped objects: a method, maybe the other fields, maybe unknown keys."""
    obj: dict[str, Any] = {draw(recase("method")): draw(methods | json_scalars)}
    for field in FIELDS[1:]:
        if draw(st.booleans()):
            obj[draw(recase(field))] = draw(json_scalars | _flat)
    obj.update(draw(st.lists(st.tuples(st.text(max_size=10), json_values), max_size=2)))
    return obj


def encode(obj: object, ascii_only: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


encoded_requests = st.builds(encode, request_objects(), st.booleans())


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real request with bytes flipped, inserted, dropped or the end cut off."""
    data = bytearray(draw(encoded_requests))
    nasty = st.sampled_from(b'\x00\xff\xc3\xed\n\r "{}[]:,\\') | st.integers(0, 255)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "repeat"]))
        pos = draw(st.integers(0, len(data)))
        if op == "insert":
            data.insert(pos, draw(nasty))
        elif not data:
            continue
        elif op == "flip":
            data[min(pos, len(data) - 1)] = draw(nasty)
        elif op == "delete":
            del data[min(pos, len(data) - 1)]
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 40))] * draw(st.integers(1, 50))
    return bytes(data)


@st.composite
def extremes(draw: st.DrawFn) -> bytes:
    """Deep nesting, huge numbers, long lines, NUL bytes, invalid UTF-8, lone surrogates."""
    kind = draw(st.integers(0, 7))
    if kind == 0:
        depth = draw(st.integers(1, 70_000))
        opener = draw(st.sampled_from([b"[", b'{"a":', b'{"method":"status","x":[']))
        return opener * depth + draw(st.sampled_from([b"", b"1", b"]" * depth]))
    if kind == 1:
        digits = b"9" * draw(st.integers(1, 5000))
        field = draw(st.sampled_from([b"timeout_seconds", b"lines", b"x"]))
        number = draw(st.sampled_from([digits, b"-" + digits, b"1e" + digits, b"0." + digits]))
        return b'{"method":"stop","' + field + b'":' + number + b"}"
    if kind == 2:
        filler = draw(st.sampled_from([b"x", b" ", b"\\u0000", b"\x00", b"\xff"]))
        size = draw(st.integers(60_000, 200_000)) // len(filler)
        return b'{"method":"' + filler * size + b'"}'
    if kind == 3:
        return draw(st.binary(max_size=64)).replace(b"\n", b"")
    if kind == 4:
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\\ud800", b"\\udc00x"]))
        return b'{"method":"stat' + bad + b'us"}'
    if kind == 5:
        return draw(st.sampled_from([b"null", b"[]", b'"status"', b"true", b"-0", b"1e999"]))
    if kind == 6:
        return b"\x00" * draw(st.integers(1, 70_000))
    return b'{"method":"status"}' * draw(st.integers(2, 5000))


single_inputs = encoded_requests | mutated() | extremes() | st.binary(max_size=300)
# Long pipelines too: past 64 lines the server makes a client wait its turn.
pipelines = st.builds(
    lambda count, last: [b'{"method":"status"}'] * count + [last],
    st.integers(60, 300),
    single_inputs,
)
streams = (
    st.lists(single_inputs, min_size=1, max_size=3).map(b"\n".join)
    | pipelines.map(b"\n".join)
    | st.binary(max_size=2000)
)
