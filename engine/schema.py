"""Typed config sections: dataclasses checked key by key, with messages that name the key.

Every config table — the engine's own sections, each model's options and each
method's options — is a dataclass. :func:`parse` turns a TOML table into an
instance and refuses unknown keys (with a close-match suggestion), wrong types
and impossible values. Constraints live in field metadata::

    @dataclass
    class Options:
        m: int = field(default=64, metadata={"ge": 1, "help": "pairs per image"})
        mode: Literal["abs", "signed"] = "abs"

Supported annotations: ``bool``, ``int``, ``float`` (ints accepted), ``str``,
``Literal[...]``, ``list[T]`` of those, ``X | None`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, get_args, get_origin

from .errors import ConfigError

#: TOML integers are 64-bit signed (the spec refuses any other); so are batchkin's.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

#: The deepest nesting of tables and arrays a config may have (batchkin's own is 3).
MAX_DEPTH = 32

#: The longest ``repr`` of a value echoed in a message (a longer one is cut, with its length).
SHOWN_CHARS = 80

_NUMERIC_BOUNDS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}


def suggest(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "nothing"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def shown(value, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for a message, at most about ``limit`` characters: a config value can be
    megabytes, and echoing it whole would bury the message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > limit:
        unit = "characters" if isinstance(value, str) else "bytes" if isinstance(value, bytes) else "items"
        return f"{repr(value[:limit])[:limit]}... ({len(value)} {unit})"  # never the repr of all of it
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_depth(value, where: str = "config", limit: int = MAX_DEPTH) -> None:
    """Refuse tables and arrays nested deeper than ``limit`` (they would exhaust the recursion of
    every function that walks a config); iterative, so it works on any depth."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth > limit:
            raise ConfigError(f"{where} nests tables or arrays more than {limit} levels deep")
        stack.extend((child, depth + 1) for child in children)


def _describe(value) -> str:
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {shown(value)}"


def _coerce(value, tp, key: str):
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed or type(value) is not type(allowed[0]):
            hint = suggest(str(value), [str(a) for a in allowed]) if isinstance(value, str) else ""
            raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in allowed)}; got {shown(value)}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a {_type_name(tp)}, got {_describe(value)}")
        (inner, *_) = get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {_describe(value)}")
        return parse(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {_describe(value)}")
        if not INT_MIN <= value <= INT_MAX:
            raise ConfigError(f"{key} must fit in a 64-bit signed integer (TOML's integers); got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be finite, got {shown(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {_describe(value)}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a programming error


def _check_bounds(value, meta, key: str) -> None:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        for name, (ok, symbol) in _NUMERIC_BOUNDS.items():
            if name in meta and not ok(item, meta[name]):
                raise ConfigError(f"{key} must be {symbol} {meta[name]}; got {shown(item)}")


def field_help(cls) -> dict[str, str]:
    """``{field: help text}`` for a schema dataclass (used by the README config reference)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def parse(cls, data: dict | None, where: str = ""):
    """Build a ``cls`` instance from a TOML table, checking every key.

    ``where`` is the table's dotted path, used in messages (``data.batch_size``).
    After field checks, a ``validate()`` method on the class (if any) runs and may
    raise :class:`ConfigError` for constraints between fields.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {_describe(data)}")
    prefix = f"{where}." if where else ""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key}{suggest(key, fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = prefix + name
        value = _coerce(data[name], hints[name], key)
        _check_bounds(value, f.metadata, key)
        kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            if where and not str(exc).startswith(where):
                raise ConfigError(f"{prefix}{exc}") from None
            raise
    return obj


def to_dict(obj) -> dict:
    """A dataclass instance as plain TOML-able data (None values dropped).

    A field marked ``metadata={"inline": True}`` holds a table whose keys belong to
    the enclosing table (``[data]`` holds the selected dataset's own options next
    to the engine's keys): its keys are written into the parent, not as a sub-table.
    """
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        if f.metadata.get("inline"):
            out.update({k: v for k, v in (value or {}).items() if v is not None})
        elif value is not None:
            out[f.name] = value
    return out


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(data: dict, _prefix: str = "") -> str:
    """Write nested dicts of scalars and lists as TOML (enough for batchkin's configs)."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict)]
    lines = [f"{k} = {_toml_value(v)}" for k, v in scalars if v is not None]
    for key, table in tables:
        name = f"{_prefix}{key}"
        body = dump_toml(table, f"{name}.")
        lines.append("")
        lines.append(f"[{name}]")
        if body:
            lines.append(body)
    return "\n".join(lines).strip("\n") + ("\n" if not _prefix else "")
