"""SQL rows as a send holds them: a snapshot of the JSON object, taken at the call.

Owns `snapshot_row`, which takes the values of the row `ctx.send.sql` queues
(`send.py`'s `SqlRow`: the table, the row's keys and its values), checks
that they are JSON (valid Unicode, finite numbers, integers Python can print) and copies
them without a full JSON round trip: strings, numbers,
booleans and nulls are immutable and kept as they are; nested arrays and
objects are encoded once, as UTF-8 JSON `bytes` (no JSON value is bytes, so
the type says what it is). That both snapshots them (the workflow may change
them after the send) and is the very text a `jsonb` column takes.

A row holds two tuples, not a dict: its keys (one tuple shared by every row
of the same shape, see `send.py`) and its values. Tuples of plain values are
dropped by the cyclic garbage collector after one look, where a dict would be
walked at every collection, and batches hold many thousands; a batch of rows
of one shape is turned into columns by one `zip`.

Typing the values (and finding what Postgres cannot store) is left to the
batch, which does it a column at a time (`columns.py`): far cheaper than
value by value here. Must not touch actors or I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from outbound.destinations.json_encoding import json_encoder

# The separators of Postgres's own jsonb text output, so a nested value widened
# to a text column reads the same whichever way it got there.
_encode_json = json_encoder(compact=False)
_NONE = type(None)


class NotJsonValue(ValueError):
    """A payload value that is not JSON (or not valid Unicode); `key` is whose value."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key!r}: {reason}")
        self.key = key
        self.reason = reason


def snapshot_row(payload: Mapping[str, Any]) -> tuple[tuple[Any, ...], int]:
    """A private copy of `payload`'s values (in its key order) fit for a row, and its
    approximate JSON size in bytes. The keys must be strings.

    Raises `NotJsonValue` naming the key whose value is not JSON (or not valid Unicode).
    """
    size = 2 + 4 * len(payload) + sum(map(len, payload))  # braces; quotes, colon, comma; keys
    values: list[Any] = []
    append = values.append
    for key, value in payload.items():
        kind = type(value)
        if kind is str:
            size += len(value) if value.isascii() else _utf8_length(key, value)
        elif kind is int:
            size += 5 if -_BIG_INT < value < _BIG_INT else _int_length(key, value)
        elif kind is bool or kind is _NONE:
            size += 5
        elif kind is float:
            if not math.isfinite(value):
                raise NotJsonValue(key, f"{value!r} is not a JSON number")
            size += 12
        else:
            value = _nested(key, value)
            size += len(value) if type(value) is bytes else len(str(value))
        append(value)
    return tuple(values), size


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
        raise NotJsonValue(key, f"the string is not valid Unicode ({error.reason})") from None


_BIG_INT = 10**15  # integers below this have at most 16 characters as JSON


def _int_length(key: str, value: int) -> int:
    """The JSON length of a large integer: refused when Python cannot print it as JSON
    (more digits than `sys.get_int_max_str_digits()`), as `json.dumps` would be."""
    try:
        return len(repr(value))
    except ValueError as error:
        raise NotJsonValue(key, str(error)) from None


def _nested(key: str, value: Any) -> Any:
    try:
        text = _encode_json(value)
        data = text.encode("utf-8")  # refuses lone surrogates, which cannot be stored
    except (TypeError, ValueError) as error:
        raise NotJsonValue(key, str(error)) from None
    except RecursionError:
        raise NotJsonValue(key, "nested too deeply") from None
    kind = type(value)
    if kind is list or kind is dict or isinstance(value, Mapping | list | tuple):
        return data
    return json.loads(text)  # str/int/float subclasses (enums...) become plain JSON values


def row_as_json(keys: tuple[str, ...], values: tuple[Any, ...]) -> dict[str, Any]:
    """The row as a JSON object of plain JSON values again (dead-letter files, messages)."""
    return {
        key: json.loads(value) if type(value) is bytes else value
        for key, value in zip(keys, values, strict=True)
    }
