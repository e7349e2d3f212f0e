"""Checks for the JSON files bitalloc reads back (plans, error tables,
quantized folders' manifests, caches): each wrong field is one clear error
naming the file, the field, what it holds and what was expected."""

from __future__ import annotations

import math
from typing import Any

from bitalloc.errors import BitallocError

_KINDS = {
    "object": (dict, "an object"),
    "list": (list, "a list"),
    "string": (str, "a string"),
    "bool": (bool, "true or false"),
}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    name = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value))
    return name or f"{type(value).__name__} {value!r}"


def check_header(data: Any, fmt: str, version: int, where: str, what: str) -> dict:
    """The top level is an object with the right 'format' and 'version'."""
    if not isinstance(data, dict):
        raise BitallocError(f"{where} is not a bitalloc {what}: it holds {_describe(data)}, not an object.")
    if data.get("format") != fmt:
        raise BitallocError(f"{where} is not a bitalloc {what} (its 'format' is {data.get('format')!r}, expected "
                            f"{fmt!r}).")
    if data.get("version") != version:
        raise BitallocError(f"{where} is a {what} of version {data.get('version')!r}; this bitalloc reads version "
                            f"{version}. Make it again with this version.")
    return data


def need(data: dict, key: str, kind: str, where: str, *, optional: bool = False, default: Any = None) -> Any:
    """``data[key]`` checked to be of ``kind`` ('object', 'list', 'string',
    'bool', 'number', 'int'); a missing optional field gives ``default``."""
    if key not in data or (optional and data[key] is None):
        if optional:
            return default
        raise BitallocError(f"{where} lacks the field {key!r}.")
    value = data[key]
    if kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        expected = "a finite number"
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    else:
        typ, expected = _KINDS[kind]
        ok = isinstance(value, typ)
    if not ok:
        raise BitallocError(f"{where}: field {key!r} must be {expected}; it holds {_describe(value)}.")
    return value


def string_map(value: dict, where: str, field: str) -> dict[str, str]:
    """An object whose values are all strings (e.g. unit -> option name)."""
    for k, v in value.items():
        if not isinstance(v, str):
            raise BitallocError(f"{where}: {field}[{k!r}] must be a string; it holds {_describe(v)}.")
    return value


def number_list(value: Any, where: str, field: str, *, length: int | None = None, nullable: bool = False) -> list:
    """A list of finite numbers (or nulls where allowed), of ``length`` if given."""
    if not isinstance(value, list):
        raise BitallocError(f"{where}: {field} must be a list of numbers; it holds {_describe(value)}.")
    if length is not None and len(value) != length:
        raise BitallocError(f"{where}: {field} has {len(value)} entries; expected {length}.")
    for v in value:
        if v is None and nullable:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise BitallocError(f"{where}: {field} must hold finite numbers; it holds {_describe(v)}.")
    return value
