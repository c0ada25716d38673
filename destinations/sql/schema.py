"""Typing rules of the SQL destination: JSON values to Postgres columns, and schema evolution.

Owns the pure functions (no I/O, no driver) that decide a column's type from
the values seen, how a known table must change to take a batch (new columns,
columns widened to numeric or text), the DDL text for those changes, and the text a
non-string value becomes in a text column. Also `quote_ident`:
every identifier (table or key) is quoted here; values are never formatted
into SQL. Must not import a database driver or touch actors.

The rules (README, "SQL (Postgres)"): string -> text, number -> double precision,
boolean -> boolean, array/object -> jsonb, null -> text; strings that are
valid `YYYY-MM-DD` dates -> date, `YYYY-MM-DD HH:MM:SS[.ffffff]` -> timestamp.
One exception keeps values exact: an integer beyond +-2**53 (which a double
cannot hold exactly) -> numeric, and numbers of both kinds make a numeric
column (a double column is widened to numeric). A field seen with two other
types is widened to text. A null says nothing about a field's type: it fits
every column, and a column seen only with nulls is text. The names Postgres
keeps for itself (system columns, `pg_` tables) are listed here too.
`columns.py` applies them to whole batches, a column at a time
(tests/sql_typing_oracle.py states them value by value, as the tests' oracle).
"""

from __future__ import annotations

import datetime
import json
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from outbound.destinations.bulk import chars_at_places

TEXT = "text"
DOUBLE = "double precision"
BOOLEAN = "boolean"
JSONB = "jsonb"
DATE = "date"
TIMESTAMP = "timestamp"
NUMERIC = "numeric"
TYPES = frozenset({TEXT, DOUBLE, BOOLEAN, JSONB, DATE, TIMESTAMP, NUMERIC})

#: Integers up to this size (either sign) are doubles exactly; beyond it a column is numeric.
EXACT_INT = 2**53

#: Column names every Postgres table already has (since Postgres 12 `oid` is no longer one).
SYSTEM_COLUMNS = frozenset({"tableoid", "xmin", "cmin", "xmax", "cmax", "ctid"})
#: A Postgres table has at most this many columns (two of them `_event_id`, `_received_at`).
MAX_COLUMNS = 1600
#: Table names starting with this are Postgres's catalogs (`pg_class`...), found before ours.
RESERVED_TABLE_PREFIX = "pg_"

EVENT_ID = "_event_id"
RECEIVED_AT = "_received_at"


#: information_schema.columns.data_type -> our type names (others are kept as they are).
_INFORMATION_SCHEMA_TYPES = {"timestamp without time zone": TIMESTAMP}


class RowError(ValueError):
    """A value of one row cannot be stored (the row fails alone, not its batch)."""


# -- inference ------------------------------------------------------------------------


def temporal_type(strings: list[str]) -> tuple[str, list[Any]] | None:
    """(date or timestamp, the parsed values) when every string is one; else None (text).

    A date is `YYYY-MM-DD`, a timestamp `YYYY-MM-DD HH:MM:SS[.f to .ffffff]`,
    both with ASCII digits and valid on the calendar and the clock. Checked a
    batch at a time, with loops in C: the lengths, the separators in their
    places (`bulk.chars_at_places`), then the digits and the
    values by `fromisoformat` (which takes only ASCII digits where the shape
    puts them), then no time zone.
    """
    lengths = set(map(len, strings))
    try:
        if lengths == {10} and _shaped(strings, lengths, _DATE_SHAPE):
            return DATE, list(map(datetime.date.fromisoformat, strings))
        if lengths <= _TIMESTAMP_LENGTHS and _shaped(strings, lengths, _TIMESTAMP_SHAPE):
            parsed = list(map(datetime.datetime.fromisoformat, strings))
            if set(map(_TIME_ZONE, parsed)) == {None}:
                return TIMESTAMP, parsed
    except ValueError:  # not on the calendar or the clock, or not digits where digits go
        pass
    return None


def _shaped(strings: list[str], lengths: set[int], shape: dict[int, str]) -> bool:
    """Does every string have `shape`'s characters at its places (those within its length)?"""
    groups: dict[int, list[str]] = {length: [] for length in lengths}
    if len(groups) == 1:
        groups[next(iter(lengths))] = strings
    else:  # timestamps with fractions of several lengths
        for text in strings:
            groups[len(text)].append(text)
    for length, group in groups.items():
        places = {place: char for place, char in shape.items() if place < length}
        if not chars_at_places(group, length, places):
            return False
    return True


_DATE_SHAPE = {4: "-", 7: "-"}
_TIMESTAMP_SHAPE = {4: "-", 7: "-", 10: " ", 13: ":", 16: ":", 19: "."}
_TIME_ZONE = operator.attrgetter("tzinfo")
_TIMESTAMP_LENGTHS = frozenset({19, *range(21, 27)})  # no fraction, or 1 to 6 digits


# -- schema evolution -------------------------------------------------------------------


def column_type(data_type: str) -> str:
    """Our name for an `information_schema.columns.data_type`."""
    return _INFORMATION_SCHEMA_TYPES.get(data_type, data_type)


def fits(column: str, value_type: str | None) -> bool:
    """Can values of `value_type` be written to a column of type `column` (converted where
    needed: anything to text, doubles to numeric)?"""
    return (
        value_type is None
        or column in (value_type, TEXT)
        or (column == NUMERIC and value_type == DOUBLE)
    )


def widened_type(column: str, value_type: str | None) -> str:
    """What a column that cannot take `value_type` becomes: numeric for numbers, else text."""
    return NUMERIC if column == DOUBLE and value_type == NUMERIC else TEXT


@dataclass(frozen=True)
class SchemaChange:
    """What a table needs before a batch can load: columns to add, columns to widen."""

    create: bool = False
    add: dict[str, str] = field(default_factory=dict)
    widen: dict[str, str] = field(default_factory=dict)  # column -> its wider type

    def __bool__(self) -> bool:
        return self.create or bool(self.add) or bool(self.widen)

    def apply(self, columns: Mapping[str, str]) -> dict[str, str]:
        """The table's columns after the change."""
        after = dict(columns)
        if self.create:
            after = {EVENT_ID: "uuid", RECEIVED_AT: "timestamp with time zone"}
        after.update(self.add)
        after.update(self.widen)
        return after


def plan_change(columns: Mapping[str, str] | None, batch: Mapping[str, str | None]) -> SchemaChange:
    """How a table with `columns` (None: no such table) must change to take `batch` types."""
    if columns is None:
        return SchemaChange(create=True, add={k: t or TEXT for k, t in batch.items()})
    add: dict[str, str] = {}
    widen: dict[str, str] = {}
    for key, kind in batch.items():
        existing = columns.get(key)
        if existing is None:
            add[key] = kind or TEXT
        elif not fits(existing, kind):
            widen[key] = widened_type(existing, kind)
    return SchemaChange(add=add, widen=widen)


def quote_ident(name: str) -> str:
    """A Postgres identifier, always quoted (so keys may hold spaces, quotes, keywords)."""
    if "\x00" in name:
        raise ValueError("identifiers cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


def change_ddl(table: str, change: SchemaChange) -> list[str]:
    """The statements that apply `change` to `table`, in order."""
    target = quote_ident(table)
    statements: list[str] = []
    if change.create:
        columns = [f"{quote_ident(EVENT_ID)} uuid PRIMARY KEY"]
        columns.append(f"{quote_ident(RECEIVED_AT)} timestamptz NOT NULL")
        columns += [f"{quote_ident(key)} {kind}" for key, kind in change.add.items()]
        statements.append(f"CREATE TABLE IF NOT EXISTS {target} ({', '.join(columns)})")
        # Append-only and time-ordered: a BRIN index keeps retention cheap at little cost.
        statements.append(f"CREATE INDEX ON {target} USING brin ({quote_ident(RECEIVED_AT)})")
        return statements
    # One ALTER TABLE for every change: one round trip, and one rewrite of the table
    # however many columns are widened.
    actions = [
        f"ADD COLUMN IF NOT EXISTS {quote_ident(key)} {kind}" for key, kind in change.add.items()
    ]
    for key, kind in change.widen.items():
        column = quote_ident(key)
        # double -> numeric through text: a direct cast keeps only 15 digits, the text
        # of a double (the shortest that reads back the same) keeps its exact value.
        via = "::text" if kind == NUMERIC else ""
        actions.append(f"ALTER COLUMN {column} TYPE {kind} USING {column}{via}::{kind}")
    if actions:
        statements.append(f"ALTER TABLE {target} {', '.join(actions)}")
    return statements


# -- values -------------------------------------------------------------------------------


def as_text(value: Any) -> str:
    """A non-string value written to a text column: its JSON text, like `jsonb::text`."""
    if isinstance(value, str):
        return value
    if type(value) is bytes:  # a snapshot's nested JSON
        return value.decode("utf-8")
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # 2.0 -> "2", as double precision::text prints it
    return json.dumps(value, ensure_ascii=False)
