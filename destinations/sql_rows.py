"""SQL rows as a send holds them: a snapshot of the JSON object, taken at the call.

Owns `snapshot_row`, which checks that a payload is a JSON object and copies it
without a full JSON round trip: strings, numbers, booleans and nulls are
immutable and kept as they are; nested arrays and objects are encoded once, as
UTF-8 JSON `bytes` (no JSON value is bytes, so the type says what it is). That
both snapshots them (the workflow may change them after the send) and is the
very text a `jsonb` column takes. A snapshot holds only such plain values, so
the cyclic garbage collector never walks it: batches hold many thousands.

The snapshot also records the row's `Shape`: its keys and the column type
each value asks for. The values are at hand (and in the CPU's cache) at the
send; typing them again in the batcher cost more than twice as much. Rows of
the same shape share one shape object, so the batcher merges the types of a
batch once per distinct shape, not once per row. Must not touch actors or I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from destinations.json_encoding import json_encoder
from destinations.sql_schema import BOOLEAN, DOUBLE, JSONB, infer_type, string_type

# The separators of Postgres's own jsonb text output, so a nested value widened
# to a text column reads the same whichever way it got there.
_encode_json = json_encoder(compact=False)

#: A row's keys, and the column type each of its values asks for (None: null).
Shape = tuple[tuple[str, ...], tuple[str | None, ...]]
_SHAPES: dict[Shape, Shape] = {}  # one object per distinct shape (bounded)
MAX_SHAPES = 4096


def snapshot_row(payload: Mapping[str, Any]) -> tuple[dict[str, Any], int, Shape, bool]:
    """(a private copy of `payload` fit for a row, its approximate JSON size in
    bytes, its shape, whether a string in it holds U+0000, which Postgres
    cannot store).

    Raises ValueError naming the key whose value is not JSON.
    """
    # Filled one key at a time, not copied with dict(): a copy of a dict that
    # holds a list or dict is tracked by the cyclic garbage collector, even
    # once those values are replaced by bytes; one filled with plain values is not.
    row: dict[str, Any] = {}
    size = 2 + 4 * len(payload) + sum(map(len, payload))  # braces; quotes, colon, comma; keys
    holds_nul = False
    kinds: list[str | None] = []
    add_kind = kinds.append
    for key, value in payload.items():
        kind = type(value)
        if kind is str:
            size += len(value) if value.isascii() else _utf8_length(key, value)
            if "\x00" in value:
                holds_nul = True
            add_kind(string_type(value))
        elif kind is int:
            size += 5
            add_kind(DOUBLE)
        elif kind is bool:
            size += 5
            add_kind(BOOLEAN)
        elif value is None:
            size += 4
            add_kind(None)
        elif kind is float:
            if not math.isfinite(value):
                raise ValueError(f"{key!r}: {value!r} is not a JSON number")
            size += 12
            add_kind(DOUBLE)
        else:
            value = _nested(key, value)
            if type(value) is bytes:
                size += len(value)
                if b"\\u0000" in value and has_nul(json.loads(value)):
                    holds_nul = True
                add_kind(JSONB)
            else:
                size += len(str(value))
                holds_nul = holds_nul or has_nul(value)
                add_kind(infer_type(value))
        row[key] = value
    shape = (tuple(row), tuple(kinds))
    shared = _SHAPES.get(shape)
    if shared is None:
        if len(_SHAPES) < MAX_SHAPES:
            _SHAPES[shape] = shape
    else:
        shape = shared
    return row, size, shape, holds_nul


def has_nul(value: Any) -> bool:
    """Does a string anywhere in a JSON value (keys included) hold U+0000?"""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in key or has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(has_nul(item) for item in value)
    return False


def _utf8_length(key: str, value: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise ValueError(f"{key!r}: the string is not valid Unicode ({error.reason})") from None


def _nested(key: str, value: Any) -> Any:
    try:
        text = _encode_json(value)
        data = text.encode("utf-8")  # refuses lone surrogates, which cannot be stored
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key!r}: {error}") from None
    except RecursionError:
        raise ValueError(f"{key!r}: nested too deeply") from None
    kind = type(value)
    if kind is list or kind is dict or isinstance(value, Mapping | list | tuple):
        return data
    return json.loads(text)  # str/int/float subclasses (enums...) become plain JSON values


def row_as_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row as plain JSON values again (dead-letter files, error messages)."""
    return {key: json.loads(value) if type(value) is bytes else value for key, value in row.items()}
