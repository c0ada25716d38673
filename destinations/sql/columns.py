"""A batch of SQL rows turned column-wise: each field's values, type and driver form.

Owns `RowColumns`, what the SQL destination loads: the rows' event ids and
receive times, and per field (the union of the rows' keys) its values, the
type the batch asks for and the values converted for that type. It also finds
the rows Postgres could not store (a NUL character in a string), which fail
alone, and splits a batch in halves (to find the rows Postgres refuses). All
of it works a column at a time: a column's type from the set of its values'
types, rows turned into columns by `zip`, dates checked by `schema.temporal_type`
(typing value by value in Python cost several times more, per row, than the
COPY itself); conversions a plain loop does as fast (timestamps) are plain loops.

The typing rules are `schema.py`'s (the tests check that a column's type here
is what the rules merge value by value, tests/sql_typing_oracle.py). Timestamps go
to the driver as Postgres has them, `(microseconds since 2000-01-01,)`, which
the store's codecs take as they are: asyncpg's own encoding of a datetime cost
more than every other column of a row together (measured). Must not import a
database driver or touch actors.
"""

from __future__ import annotations

import datetime
import decimal
import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from outbound.destinations.sql.rows import has_nul
from outbound.destinations.sql.schema import (
    BOOLEAN,
    DOUBLE,
    EXACT_INT,
    JSONB,
    NUMERIC,
    TEXT,
    TIMESTAMP,
    RowError,
    as_text,
    temporal_type,
)

NUL_REFUSED = "a string holds a NUL character (\\u0000), which Postgres text and jsonb cannot store"

_NONE = type(None)
_JUST_NULL = frozenset({_NONE})
_NUMBERS = frozenset({int, float})
_SINGLE_TYPES: dict[type, str] = {bool: BOOLEAN, float: DOUBLE, bytes: JSONB}  # int: see below
_TEXT_OR_NULL = frozenset({str, _NONE})
_JSON_OR_NULL = frozenset({bytes, _NONE})

#: Postgres counts timestamps in microseconds from here.
PG_EPOCH = datetime.datetime(2000, 1, 1)
PG_EPOCH_UTC = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_PG_EPOCH_UNIX = int(PG_EPOCH_UTC.timestamp())
_MICROSECOND = datetime.timedelta(microseconds=1)


def pg_timestamps(moments: list[datetime.datetime]) -> list[tuple[int]]:
    """Naive datetimes as `(microseconds since 2000-01-01,)`, exactly (integer arithmetic)."""
    return [((moment - PG_EPOCH) // _MICROSECOND,) for moment in moments]


def pg_timestamps_utc(seconds: list[float]) -> list[tuple[int]]:
    """`time.time()` values as `(microseconds since 2000-01-01 UTC,)`.

    Rounded as `datetime.fromtimestamp` rounds (the fraction of a second, half
    to even), so a row's `_received_at` is its send's `accepted_at` to the
    microsecond: scaling the whole count instead loses the last bit of it.
    """
    stamps = []
    for at in seconds:
        whole = int(at)
        fraction = at - whole  # exact
        stamps.append(((whole - _PG_EPOCH_UNIX) * 1_000_000 + round(fraction * 1e6),))
    return stamps


@dataclass(slots=True)
class Column:
    """One field of a batch: its values in row order (None where null or missing)."""

    type: str | None  # the merged type of the values; None when every value is null
    values: list[Any]
    typed: list[Any] | None = None  # converted for `type` (dates, timestamps, mixed text)
    all_text: bool = True  # every non-null value is a string: a text column takes them as they are

    def for_column(self, column_type: str) -> list[Any]:
        """The values as the driver writes them into a column of `column_type`."""
        if column_type == self.type:
            return self.values if self.typed is None else self.typed
        if column_type == TEXT:  # the table widened it to text
            return self.values if self.all_text else _as_texts(self.values)
        if column_type == NUMERIC and self.type == DOUBLE:  # the table widened it to numeric
            return _as_numerics(self.values)
        raise RowError(f"a {self.type} value cannot be written to a {column_type} column")


@dataclass(slots=True)
class RowColumns:
    """Rows ready to load: `_event_id`s, `_received_at`s and the fields, column by column."""

    ids: list[str]
    received_at: list[float]  # time.time() of each send
    columns: dict[str, Column]
    refused: dict[str, str]  # event id -> why Postgres cannot store the row (not in the columns)

    @classmethod
    def of(
        cls,
        ids: Sequence[str],
        received_at: Sequence[float],
        shapes: Sequence[tuple[str, ...]],
        rows: Sequence[tuple[Any, ...]],
    ) -> RowColumns:
        """Type rows (each its keys in `shapes` and its values in `rows`: JSON values,
        nested ones as JSON bytes) column by column."""
        ids, received_at, shapes, rows = list(ids), list(received_at), list(shapes), list(rows)
        values = _fields(shapes, rows)
        kinds = {key: set(map(type, column)) for key, column in values.items()}
        refused = _rows_with_nul(values, kinds)
        if refused:  # rare: type the batch again without them
            kept = [index for index in range(len(rows)) if index not in refused]
            batch = cls.of(
                [ids[index] for index in kept],
                [received_at[index] for index in kept],
                [shapes[index] for index in kept],
                [rows[index] for index in kept],
            )
            batch.refused.update(dict.fromkeys((ids[index] for index in refused), NUL_REFUSED))
            return batch
        columns = {key: _typed_column(column, kinds[key]) for key, column in values.items()}
        return cls(ids, received_at, columns, {})

    @classmethod
    def empty(cls) -> RowColumns:
        """No rows and no fields: loading it only creates the table (or finds it refused)."""
        return cls([], [], {}, {})

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def types(self) -> dict[str, str | None]:
        """Field -> the type the batch asks for (None: only nulls): the rules merged value
        by value."""
        return {name: column.type for name, column in self.columns.items()}

    def halves(self) -> tuple[RowColumns, RowColumns]:
        """The first and second half of the rows (to find a row Postgres refuses)."""
        middle = len(self.ids) // 2
        first, second = slice(None, middle), slice(middle, None)
        return self._slice(first), self._slice(second)

    def _slice(self, rows: slice) -> RowColumns:
        """These rows alone, each field typed again by their own values: so a type
        change Postgres refuses (or a column it cannot add) fails only the rows that
        ask for it, and a field these rows lack is left out."""
        columns = {}
        for name, column in self.columns.items():
            values = column.values[rows]
            kinds = set(map(type, values))
            if kinds - _JUST_NULL:
                columns[name] = _typed_column(values, kinds)
        return RowColumns(self.ids[rows], self.received_at[rows], columns, {})

    def records(self, names: Sequence[str], column_types: Mapping[str, str]) -> Iterator[tuple]:
        """COPY records: `_event_id`, `_received_at`, then the fields `names` as typed
        by the table's `column_types`."""
        fields = [self.columns[name].for_column(column_types[name]) for name in names]
        return zip(self.ids, pg_timestamps_utc(self.received_at), *fields, strict=True)


def _fields(shapes: list[tuple[str, ...]], rows: list[tuple[Any, ...]]) -> dict[str, list[Any]]:
    """Each field's values in row order, None where a row lacks it; fields first seen first."""
    distinct = dict.fromkeys(shapes)  # in the order first seen
    if len(distinct) == 1:  # the usual batch: every row has the same keys; transposed in C
        (keys,) = distinct
        if not keys:
            return {}
        return dict(zip(keys, map(list, zip(*rows, strict=True)), strict=True))
    union = dict.fromkeys(itertools.chain.from_iterable(distinct))
    mappings = list(map(dict, map(zip, shapes, rows)))
    return {key: [mapping.get(key) for mapping in mappings] for key in union}


def _typed_column(values: list[Any], kinds: set[type]) -> Column:
    nullable = _NONE in kinds
    kinds = kinds - {_NONE}
    if not kinds:
        return Column(None, values)
    if kinds == {str}:
        strings = [value for value in values if value is not None] if nullable else values
        temporal = temporal_type(strings)
        if temporal is None:
            return Column(TEXT, values)
        kind, parsed = temporal
        if kind == TIMESTAMP:
            parsed = pg_timestamps(parsed)
        if nullable:
            found = iter(parsed)
            parsed = [None if value is None else next(found) for value in values]
        return Column(kind, values, parsed)
    if int in kinds and kinds <= _NUMBERS:
        return _number_column(values, kinds, nullable)
    if len(kinds) == 1:
        return Column(_SINGLE_TYPES[kinds.pop()], values, all_text=False)
    return Column(TEXT, values, _as_texts(values), all_text=False)


def _number_column(values: list[Any], kinds: set[type], nullable: bool) -> Column:
    """double precision, unless an integer is beyond what a double holds exactly: numeric."""
    numbers = [value for value in values if value is not None] if nullable else values
    if min(numbers) >= -EXACT_INT and max(numbers) <= EXACT_INT:  # the usual case, in C
        return Column(DOUBLE, values, all_text=False)
    if float in kinds and not any(map(_inexact_int, numbers)):  # only floats are that large
        return Column(DOUBLE, values, all_text=False)
    return Column(NUMERIC, values, _as_numerics(values) if float in kinds else None, False)


def _inexact_int(value: Any) -> bool:
    return type(value) is int and not -EXACT_INT <= value <= EXACT_INT


def _as_numerics(values: list[Any]) -> list[Any]:
    """Numbers for a numeric column: integers as they are, floats by their shortest text
    (what `double precision::text::numeric` gives, not the binary fraction's every digit)."""
    return [_float_as_numeric(value) if type(value) is float else value for value in values]


def _float_as_numeric(value: float) -> int | decimal.Decimal:
    if value.is_integer() and -EXACT_INT <= value <= EXACT_INT:
        return int(value)
    return decimal.Decimal(repr(value))


def _as_texts(values: list[Any]) -> list[Any]:
    return [value if value is None or type(value) is str else as_text(value) for value in values]


def _rows_with_nul(values: dict[str, list[Any]], kinds: dict[str, set[type]]) -> set[int]:
    """Indexes of rows with U+0000 in a string or nested value (Postgres stores neither)."""
    bad: set[int] = set()
    for key, column in values.items():
        kind = kinds[key]
        if str in kind:
            strings = column if kind <= _TEXT_OR_NULL else [_only(str, value) for value in column]
            if "\x00" in "".join(filter(None, strings)):
                bad.update(index for index, text in enumerate(strings) if text and "\x00" in text)
        if bytes in kind:
            nested = column if kind <= _JSON_OR_NULL else [_only(bytes, value) for value in column]
            # An escaped NUL, or a backslash before "u0000": look closer.
            if b"\\u0000" in b"".join(filter(None, nested)):
                bad.update(
                    index
                    for index, data in enumerate(nested)
                    if data and b"\\u0000" in data and has_nul(json.loads(data))
                )
    return bad


def _only(kind: type, value: Any) -> Any:
    return value if type(value) is kind else None
