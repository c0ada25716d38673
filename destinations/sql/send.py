"""`ctx.send.sql(...)`: the rules of a SQL send, and `SqlRow`, what it becomes.

Owns `validate_sql` (registered for `ctx.send.sql` in `destinations/registry.py`),
which checks the table name and the payload's keys against what Postgres can
hold and snapshots the values (`rows.snapshot_row`) into the typed payload the
SQL actor loads (`SqlRow`), and the table and column rules. Pure: no I/O.
Must not import the runtime or another destination.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outbound.destinations.payloads import quick_init
from outbound.destinations.sql.rows import NotJsonValue, snapshot_row
from outbound.destinations.sql.schema import MAX_COLUMNS, RESERVED_TABLE_PREFIX, SYSTEM_COLUMNS
from outbound.destinations.sql.settings import SqlSettings
from outbound.destinations.validation import REPLAY_MAX_BYTES, SendError, check_size

MAX_IDENTIFIER_BYTES = 63  # Postgres truncates longer identifiers
# The key tuples of SQL payloads already found valid, each kept once: rows of
# one shape share it (one tuple, not one per row), and a batch of them turns
# into columns with one zip.
_VALID_SQL_SHAPES: dict[tuple[str, ...], tuple[str, ...]] = {}
_VALID_SQL_TABLES: dict[str, str] = {}  # SQL table names already found valid -> lower case


@quick_init  # a faster __init__: one payload per send (destinations/payloads.py)
@dataclass(frozen=True, slots=True)
class SqlRow:
    """A validated `ctx.send.sql(...)` call: one row for `table`.

    Two tuples, not a dict: its keys (one tuple shared by every row of the same
    shape) and its values as `rows.snapshot_row` copied them.
    """

    table: str  # as stored: lower case
    keys: tuple[str, ...]
    values: tuple[Any, ...]


def validate_sql(
    config: SqlSettings,  # every send takes its settings; a row needs none of them
    max_bytes: int,
    table: str,
    payload: Mapping[str, Any],
) -> tuple[SqlRow, int]:
    """`ctx.send.sql(...)` as a `SqlRow` (one JSON object) for `table`, and its size."""
    kind = "sql"
    lowered = _VALID_SQL_TABLES.get(table) if type(table) is str else None
    if lowered is None:
        lowered = _check_table(table)
        if len(_VALID_SQL_TABLES) < 4096:
            _VALID_SQL_TABLES[table] = lowered
    if type(payload) is not dict and not isinstance(payload, Mapping):
        raise SendError(kind, "payload", "must be a JSON object (a dict)")
    keys = tuple(payload)
    shape = _VALID_SQL_SHAPES.get(keys)  # the same keys come again and again
    if shape is None:
        _check_columns(keys)
        shape = keys
        if len(_VALID_SQL_SHAPES) < 4096:
            _VALID_SQL_SHAPES[keys] = keys
    try:
        values, size = snapshot_row(payload)
    except NotJsonValue as error:
        raise SendError(
            kind, f"payload[{error.key!r}]", f"must be JSON-serializable ({error.reason})"
        ) from None
    check_size(kind, "payload", size, max_bytes)
    return SqlRow(lowered, shape, values), size


# Table names are ASCII only: with Unicode case rules, "\u212a" (the Kelvin sign)
# would match [a-z] and fold to "k", and "\u0130" would grow when lowercased.
_SQL_TABLE = re.compile(r"(?!_)[a-z0-9_]+", re.ASCII | re.IGNORECASE)


def _check_table(table: Any) -> str:
    """The table's name as stored (lowercase), or SendError for one Postgres cannot take."""
    # fullmatch: `$` alone would let a trailing newline through.
    if not isinstance(table, str) or not _SQL_TABLE.fullmatch(table):
        raise SendError(
            "sql", "table", "must match ^(?!_)[a-z0-9_]+$ (ASCII letters, digits, underscore)"
        )
    if len(table) > MAX_IDENTIFIER_BYTES:  # ASCII: one byte a character
        raise SendError("sql", "table", f"must be at most {MAX_IDENTIFIER_BYTES} bytes")
    lowered = table.lower()
    if lowered.startswith(RESERVED_TABLE_PREFIX):
        raise SendError(
            "sql",
            "table",
            f"must not start with {RESERVED_TABLE_PREFIX!r}: Postgres finds its catalogs "
            "(pg_class, ...) by those names before any table of ours",
        )
    return lowered


def _check_columns(keys: tuple[Any, ...]) -> None:
    """The keys of one payload, as the columns of one row."""
    if len(keys) > MAX_COLUMNS - 2:
        raise SendError(
            "sql",
            "payload",
            f"has {len(keys)} keys; a Postgres table has at most {MAX_COLUMNS} columns, "
            "two of them _event_id and _received_at",
        )
    for key in keys:
        _check_column(key)


def _check_column(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise SendError("sql", "payload", f"keys must be non-empty strings, got {key!r}")
    field = f"payload[{key!r}]"
    if key.startswith("_"):
        raise SendError("sql", field, "keys starting with '_' are reserved")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise SendError("sql", field, "keys must be valid Unicode (no lone surrogates)") from None
    if size > MAX_IDENTIFIER_BYTES:
        raise SendError("sql", field, f"keys must be at most {MAX_IDENTIFIER_BYTES} bytes")
    if "\x00" in key:
        raise SendError("sql", field, "keys must not contain NUL")
    if key in SYSTEM_COLUMNS:
        raise SendError(
            "sql",
            field,
            f"is a Postgres system column ({', '.join(sorted(SYSTEM_COLUMNS))}) that every "
            "table already has; rename the key",
        )


def from_dead_letter(fields: Mapping[str, Any]) -> tuple[SqlRow, int]:
    """A dead-letter line's fields (`SqlDestination.dead_letter_fields`) as the row again.

    Its `_event_id` is the send's delivery id, which a replay keeps.
    """
    return validate_sql(None, REPLAY_MAX_BYTES, fields["table"], fields["payload"])  # type: ignore[arg-type]
