"""msgspec's validation errors of a TOML file, said in the file's own words: the dotted key,
what was expected, and the value as the user wrote it."""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

_AT: Final = " - at `$"
_SEGMENT: Final = re.compile(r"\.(\w+)|\[(\d+|\.\.\.)\]")


def explain(message: str, raw: dict[str, Any], schema: type) -> str:
    """Rewrite msgspec's ``Expected ... - at `$.a.b``` as ``a.b: expected ..., got VALUE``."""
    text, _, where = message.partition(_AT)
    segments: list[str | int] = [
        name if name else (int(index) if index.isdigit() else "...")
        for name, index in _SEGMENT.findall(where.rstrip("`"))
    ]
    if m := re.fullmatch(r"Object contains unknown field `(.+)`", text):
        return f"{_dotted([*segments, m[1]])}: unknown key"
    if m := re.fullmatch(r"Object missing required field `(.+)`", text):
        return f"{_dotted([*segments, m[1]])}: required"
    field = _dotted(segments)
    value = _lookup(raw, segments)
    if text.startswith("Invalid enum value"):
        choices = ", ".join(_toml(v) for v in _choices(schema, segments))
        return f"{field}: expected one of {choices}, got {_toml(value)}"
    if m := re.fullmatch(r"Expected `(\w+)(?: \| null)?`, got `(\w+)`", text):  # null: optional
        expected = "table" if m[1] == "object" else m[1]
        return f"{field}: expected {expected}, got {m[2] if value is None else _toml(value)}"
    if m := re.fullmatch(r"Invalid (\w+)", text):  # a string of a typed format: "Invalid UUID"
        return f"{field}: expected a {m[1]}, got {_toml(value)}"
    if m := re.fullmatch(r"Expected `\w+` (.+)", text):  # a constraint: ">= 1"
        return f"{field}: expected {m[1]}, got {_toml(value)}"
    return f"{field}: {text}"


def _dotted(segments: list[str | int]) -> str:
    out = ""
    for s in segments:
        out += f"[{s}]" if isinstance(s, int) or s == "..." else f".{s}" if out else s
    return out


def _lookup(raw: Any, segments: list[str | int]) -> Any:
    """The offending value in the parsed TOML; None (never a TOML value) if not addressable."""
    for s in segments:
        try:
            raw = raw[s]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _choices(schema: type, segments: list[str | int]) -> tuple[Any, ...]:
    """The allowed values of the Literal field at ``segments``, from the Struct types."""
    info: msgspec.inspect.Type = msgspec.inspect.type_info(schema)
    for s in segments:
        if isinstance(info, msgspec.inspect.UnionType):
            info = next(t for t in info.types if isinstance(t, msgspec.inspect.StructType))
        if isinstance(info, msgspec.inspect.StructType):
            info = next(f.type for f in info.fields if f.name == s)
        elif isinstance(info, msgspec.inspect.ListType):
            info = info.item_type
    return info.values if isinstance(info, msgspec.inspect.LiteralType) else ()


def _toml(value: Any) -> str:
    """A value as it would be written in TOML, so the message quotes what the user wrote."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__
