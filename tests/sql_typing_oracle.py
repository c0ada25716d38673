"""The SQL typing rules stated value by value: the test oracle for `sql/columns.py`.

The SQL destination types a batch a column at a time (`RowColumns.of`, with
its loops in C); these functions say the same rules one value at a time, in
the plainest way, written apart from the destination's code (a regular
expression and `fromisoformat` for dates), so the tests can check that a
batch's column types are what the rules merge value by value. Only tests use
them. The rules are README's "SQL (Postgres)": string -> text (date or
timestamp when every string is a valid one), number -> double precision
(numeric beyond +-2**53, and numbers of both kinds), boolean -> boolean,
array/object -> jsonb, null -> no opinion; a field seen with two other types
is text.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping
from typing import Any

from outbound.destinations.sql.schema import (
    BOOLEAN,
    DATE,
    DOUBLE,
    EXACT_INT,
    JSONB,
    NUMERIC,
    TEXT,
    TIMESTAMP,
    RowError,
)

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?")
_NUMBER_TYPES = frozenset({DOUBLE, NUMERIC})


def infer_type(value: Any) -> str | None:
    """The column type a JSON value asks for on first sight; None for null (no opinion)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int):
        return DOUBLE if -EXACT_INT <= value <= EXACT_INT else NUMERIC
    if isinstance(value, float):
        return DOUBLE
    if isinstance(value, dict | list | bytes):  # bytes: a snapshot's nested JSON
        return JSONB
    if isinstance(value, str):
        return string_type(value)
    raise RowError(f"{type(value).__name__} is not a JSON value")


def string_type(text: str) -> str:
    """date, timestamp or text: only valid calendar dates and times count as dates."""
    try:
        if _DATE.fullmatch(text):
            datetime.date.fromisoformat(text)
            return DATE
        if _TIMESTAMP.fullmatch(text):
            datetime.datetime.fromisoformat(text)
            return TIMESTAMP
    except ValueError:  # not on the calendar or the clock
        pass
    return TEXT


def merge_types(seen: str | None, new: str | None) -> str | None:
    """Two sightings of one field: the same type stays, null fits anything, numbers of
    both kinds are numeric, else text."""
    if seen is None:
        return new
    if new is None or new == seen:
        return seen
    if seen in _NUMBER_TYPES and new in _NUMBER_TYPES:
        return NUMERIC
    return TEXT


def infer_batch(rows: Iterable[Mapping[str, Any]]) -> dict[str, str | None]:
    """The union of the fields of `rows`, each with its merged type (None: only nulls)."""
    merged: dict[str, str | None] = {}
    for row in rows:
        for key, value in row.items():
            new = infer_type(value)
            merged[key] = merge_types(merged[key], new) if key in merged else new
    return merged
