"""Go's ``encoding/json`` scanner over a stream, and Go's way of decoding a ``Request``.

:class:`Scanner` finds where the next value ends as the bytes arrive and words a
syntax error as Go does; :meth:`Scanner.request` then has msgspec decode only
the pieces Go would look at: keys matched by simple case folding, ``null``
leaving a field as it was, the last duplicate winning, invalid UTF-8 read as
U+FFFD, unknown fields of any shape skipped, and a wrong type refused with Go's
own message.
"""

from __future__ import annotations

import codecs
import re
from typing import Any, Final

import msgspec

from . import wire
from .wire import Buffer, Request

_str: Final = msgspec.json.Decoder(str)
_int: Final = msgspec.json.Decoder(wire.GoInt)
_bool: Final = msgspec.json.Decoder(bool)

MAX_DEPTH: Final = 10_000
_SPACE: Final = re.compile(rb"[ \t\n\r]*")
_PLAIN: Final = re.compile(rb'[^"\\\x00-\x1f]*')  # inside a string, what needs no look
_DIGITS: Final = re.compile(rb"[0-9]*")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES: Final = frozenset(b'"\\/bfnrtu')
_LITERALS: Final = {ord("t"): b"true", ord("f"): b"false", ord("n"): b"null"}
_KINDS: Final = dict(
    zip(b'{["tfn', ("object", "array", "string", "bool", "bool", "null"), strict=True)
)
_OBJECT, _ARRAY = ord("{"), ord("[")
# States between bytes: what may come next.
_VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE, _COLON, _AFTER = range(6)
_STRING, _KEY_STRING, _NUMBER, _LITERAL = range(6, 10)  # inside a token: from _STRING on
# Inside a number, as Go's states: after -, 0, 1-9..., ., .digits, e, e+/-, e digits.
_NEG, _ZERO, _INT, _DOT, _FRAC, _E, _ESIGN, _EXP = range(8)
_NUMBER_ENDS: Final = frozenset({_ZERO, _INT, _FRAC, _EXP})
_NUMBER_ERRORS: Final = {
    _NEG: "in numeric literal",
    _DOT: "after decimal point in numeric literal",
    _E: "in exponent of numeric literal",
    _ESIGN: "in exponent of numeric literal",
}
_SHORT: Final = {7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r"}


def skip_space(buf: Buffer, pos: int) -> int:
    """Past the white space at ``pos``: where a value may begin."""
    return _SPACE.match(buf, pos).end()  # type: ignore[union-attr]


def _quote_char(c: int) -> str:
    """A byte as Go's scanner names it in an error: ``'x'``, ``'\\x01'``, ``'ÿ'``."""
    if c == 0x27:
        return "'\\''"
    char = chr(c)
    if char == "\\":
        text = "\\\\"
    elif char.isprintable():
        text = char
    else:
        text = _SHORT.get(c) or (f"\\x{c:02x}" if c < 0x80 else f"\\u{c:04x}")
    return f"'{text}'"


def _syntax_error(c: int, context: str) -> msgspec.DecodeError:
    return msgspec.DecodeError(f"invalid character {_quote_char(c)} {context}")


class Scanner:
    """Go's scanner over a stream: where the next value ends, fed as the bytes arrive.

    State is kept between calls, so each byte is looked at once however the
    value is split into reads.  The top-level object's key and value spans
    are kept for :meth:`request`, which decodes only those with msgspec.
    """

    __slots__ = (
        "_key",
        "_lit",
        "_stack",
        "_state",
        "_sub",
        "_vstart",
        "first_byte",
        "pairs",
        "pos",
    )

    def __init__(self, pos: int = 0) -> None:
        self.pos = pos
        """How far the buffer has been scanned."""
        self.first_byte = 0
        """The value's first byte; 0 while only white space was seen."""
        self.pairs: list[tuple[int, int, int, int]] = []
        """Key and value spans of the top-level object, in order."""
        self._stack = bytearray()
        self._state = _VALUE
        self._sub = 0
        self._lit = b""
        self._key = (0, 0)
        self._vstart = 0

    def scan(self, buf: Buffer, stop: int) -> int:
        """Where the value ends in ``buf``, looking no further than ``stop``; -1 while it is
        incomplete.  A syntax error raises ``msgspec.DecodeError`` in Go's words."""
        data = buf
        stack, state, sub, pos = self._stack, self._state, self._sub, self.pos
        try:
            while pos < stop:
                if state == _AFTER and not stack:
                    return pos  # a top-level string, number or literal ends at any next byte
                if state >= _STRING:
                    if state == _NUMBER:
                        state, sub, pos = self._number(data, buf, state, sub, pos, stop)
                    elif state == _LITERAL:
                        c, want = data[pos], self._lit[sub]
                        if c != want:
                            name = self._lit.decode()
                            raise _syntax_error(
                                c, f"in literal {name} (expecting {_quote_char(want)})"
                            )
                        pos += 1
                        sub += 1
                        if sub == len(self._lit):
                            state, sub = self._done(pos), 0
                    elif sub:  # in a string escape: -1 after the backslash, else hex digits to go
                        c = data[pos]
                        if sub < 0:
                            if c not in _ESCAPES:
                                raise _syntax_error(c, "in string escape code")
                            sub = 4 if c == 0x75 else 0
                        elif c in _HEX:
                            sub -= 1
                        else:
                            raise _syntax_error(c, "in \\u hexadecimal character escape")
                        pos += 1
                    else:
                        pos = _PLAIN.match(buf, pos, stop).end()  # type: ignore[union-attr]
                        if pos == stop:
                            break
                        c = data[pos]
                        pos += 1
                        if c == 0x22:
                            if state == _KEY_STRING:
                                if len(stack) == 1:
                                    self._key = (self._key[0], pos)
                                state = _COLON
                            else:
                                state = self._done(pos)
                        elif c == 0x5C:
                            sub = -1
                        else:
                            raise _syntax_error(c, "in string literal")
                    continue
                pos = _SPACE.match(buf, pos, stop).end()  # type: ignore[union-attr]
                if pos == stop:
                    break
                c = data[pos]
                if state == _AFTER:
                    if c == 0x2C:
                        state = _KEY if stack[-1] == _OBJECT else _VALUE
                    elif c == stack[-1] + 2:  # { + 2 is }, [ + 2 is ]
                        stack.pop()
                        if not stack:
                            return pos + 1  # Go ends a top-level object or array at once
                        state = self._done(pos + 1)
                    elif stack[-1] == _OBJECT:
                        raise _syntax_error(c, "after object key:value pair")
                    else:
                        raise _syntax_error(c, "after array element")
                elif state == _COLON:
                    if c != 0x3A:
                        raise _syntax_error(c, "after object key")
                    state = _VALUE
                elif (state == _KEY_OR_CLOSE and c == 0x7D) or (
                    state == _VALUE_OR_CLOSE and c == 0x5D
                ):
                    state = _AFTER
                    continue  # the close of an empty object or array
                elif state in (_KEY, _KEY_OR_CLOSE):
                    if c != 0x22:
                        raise _syntax_error(c, "looking for beginning of object key string")
                    if len(stack) == 1:
                        self._key = (pos, 0)
                    state, sub = _KEY_STRING, 0
                else:
                    state, sub = self._begin(c, pos)
                pos += 1
        finally:
            self._state, self._sub, self.pos = state, sub, pos
        return -1

    def _number(
        self, data: Buffer, buf: Buffer, state: int, sub: int, pos: int, stop: int
    ) -> tuple[int, int, int]:
        """One step inside a number: Go's number states, digit runs at once."""
        if sub in (_INT, _FRAC, _EXP):
            pos = _DIGITS.match(buf, pos, stop).end()  # type: ignore[union-attr]
            if pos == stop:
                return state, sub, pos
        c = data[pos]
        if sub in _NUMBER_ENDS:
            if c == 0x2E and sub in (_ZERO, _INT):
                sub = _DOT
            elif c in b"eE" and sub != _EXP:
                sub = _E
            else:
                return self._done(pos), 0, pos  # the byte after a number is not its own
        elif 0x30 <= c <= 0x39:
            sub = _EXP if sub >= _E else _FRAC if sub == _DOT else _ZERO if c == 0x30 else _INT
        elif sub == _E and c in b"+-":
            sub = _ESIGN
        else:
            raise _syntax_error(c, _NUMBER_ERRORS[sub])
        return state, sub, pos + 1

    def _begin(self, c: int, pos: int) -> tuple[int, int]:
        """The first byte of a value: the state it leads to."""
        stack = self._stack
        if not stack:
            self.first_byte = c
        elif len(stack) == 1:
            self._vstart = pos
        if c in (_OBJECT, _ARRAY):
            stack.append(c)
            if len(stack) > MAX_DEPTH:
                raise _syntax_error(c, "exceeded max depth")
            return (_KEY_OR_CLOSE if c == _OBJECT else _VALUE_OR_CLOSE), 0
        if c == 0x22:
            return _STRING, 0
        if c == 0x2D:
            return _NUMBER, _NEG
        if 0x30 <= c <= 0x39:
            return _NUMBER, _ZERO if c == 0x30 else _INT
        if c in _LITERALS:
            self._lit = _LITERALS[c]
            return _LITERAL, 1
        raise _syntax_error(c, "looking for beginning of value")

    def _done(self, end: int) -> int:
        """A value ended at ``end``: a pair of the top-level object is complete."""
        if len(self._stack) == 1 and self._stack[0] == _OBJECT:
            self.pairs.append((*self._key, self._vstart, end))
        return _AFTER

    def at_eof(self) -> int:
        """The input ended: the end of a value that this completes, or Go's EOF error."""
        if not self._stack and (
            self._state == _AFTER or (self._state == _NUMBER and self._sub in _NUMBER_ENDS)
        ):
            return self.pos
        raise msgspec.DecodeError("unexpected EOF" if self.first_byte else "EOF")

    def request(self, buf: Buffer) -> Request:
        """The scanned value as Go unmarshals it into the seed's ``vmhost.Request``."""
        if self.first_byte != _OBJECT:
            if self.first_byte == ord("n"):
                return Request()
            kind = _KINDS.get(self.first_byte, "number")
            raise msgspec.DecodeError(
                f"json: cannot unmarshal {kind} into Go value of type vmhost.Request"
            )
        data = buf
        fields: dict[str, object] = {}
        for ks, ke, vs, ve in self.pairs:
            name = _go_string(data[ks:ke]).translate(_FOLD)
            if name not in _FIELDS or data[vs] == ord("n"):
                continue  # unknown, or null: Go leaves the field as it was
            value = data[vs:ve]
            if name in _GO_FIELDS:
                fields[name] = _go_field(name, value)
            elif (extension := _extension(name, value)) is not None:
                fields[name] = extension  # of the wrong type it is ignored, as Go ignores it
        return Request(**fields)  # type: ignore[arg-type]


_FOLD: Final = str.maketrans(
    {chr(c): chr(c + 32) for c in range(ord("A"), ord("Z") + 1)} | {"\u017f": "s", "\u212a": "k"}
)
"""Go's simple case folding where it can meet an ASCII field name: U+017F is s, U+212A k."""
_GO_FIELDS: Final = {"method": ("vmhost.Method", _str), "timeout_seconds": ("int", _int)}
_FIELDS: Final = frozenset(
    {*_GO_FIELDS, "detail", "lines", "follow", "read_only", "force", "since"}
)
_EXTENSIONS: Final[dict[str, msgspec.json.Decoder[Any]]] = {"lines": _int, "since": _str}
"""Extension fields that are not booleans, with their decoders."""


def _go_field(name: str, value: Buffer) -> object:
    gotype, decoder = _GO_FIELDS[name]
    first = value[0]
    try:
        if first == 0x22 and decoder is _str:
            return _go_string(value)
        if first not in _KINDS and decoder is _int:
            return _int.decode(value)
    except msgspec.DecodeError:
        pass  # a number Go's ParseInt refuses too
    kind = _KINDS.get(first) or ("number" if decoder is _str else f"number {bytes(value).decode()}")
    raise msgspec.DecodeError(
        f"json: cannot unmarshal {kind} into Go struct field Request.{name} of type {gotype}"
    )


def _extension(name: str, value: Buffer) -> object:
    try:
        return _EXTENSIONS.get(name, _bool).decode(value)
    except msgspec.DecodeError:
        return None


_SURROGATE: Final = re.compile(
    r"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)


def _per_byte(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    return "\ufffd", error.start + 1


codecs.register_error("vmhost-go", _per_byte)


def _go_string(token: Buffer) -> str:
    """A JSON string as Go unquotes it: invalid UTF-8 and lone surrogates become U+FFFD."""
    try:
        return _str.decode(token)
    except msgspec.DecodeError:
        # Byte by byte as Go's utf8.DecodeRune, then the escapes of unpaired surrogates.
        text = bytes(token).decode("utf-8", "vmhost-go")
        text = _SURROGATE.sub(lambda m: m.group() if len(m.group()) != 6 else "\\ufffd", text)
        return _str.decode(text.encode())


def decode_request(data: Buffer) -> Request:
    """The first value of ``data`` as the Go server decodes it (the rest is not looked at);
    raises ``msgspec.DecodeError`` with the text Go's decoder gives."""
    request = wire.decode_plain(data)
    if request is not None:
        return request
    scanner = Scanner()
    end = scanner.scan(data, len(data))
    if end < 0:
        scanner.at_eof()
    return scanner.request(data)
