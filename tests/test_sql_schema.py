"""The SQL typing rules (pure functions), and the DDL they produce run on a real Postgres."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import random
import time
from typing import Any

import asyncpg
import pytest
from sql_typing_oracle import infer_batch, infer_type, merge_types

from outbound.actors.ids import new_id
from outbound.destinations.sql.columns import (
    NUL_REFUSED,
    PG_EPOCH_UTC,
    RowColumns,
    pg_timestamps_utc,
)
from outbound.destinations.sql.rows import has_nul, snapshot_row
from outbound.destinations.sql.schema import (
    BOOLEAN,
    DATE,
    DOUBLE,
    JSONB,
    NUMERIC,
    TEXT,
    TIMESTAMP,
    RowError,
    SchemaChange,
    as_text,
    change_ddl,
    plan_change,
    quote_ident,
)

MICROSECOND = datetime.timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text", TEXT),
        ("", TEXT),
        (0, DOUBLE),
        (-3, DOUBLE),
        (2.5, DOUBLE),
        (2**53, DOUBLE),
        (-(2**53), DOUBLE),
        (2**53 + 1, NUMERIC),  # beyond what a double holds exactly
        (-(2**53) - 1, NUMERIC),
        (10**30, NUMERIC),
        (1e300, DOUBLE),  # a float is a double already
        (True, BOOLEAN),
        (False, BOOLEAN),
        ([], JSONB),
        ([1, "a"], JSONB),
        ({}, JSONB),
        ({"a": {"b": 1}}, JSONB),
        (None, None),
        ("2024-02-29", DATE),
        ("0001-01-01", DATE),
        ("2023-02-29", TEXT),  # not a leap year
        ("2024-13-01", TEXT),
        ("0000-01-01", TEXT),
        ("2024-1-01", TEXT),
        ("2024-01-01 ", TEXT),
        (" 2024-01-01", TEXT),
        ("2024/01/01", TEXT),
        ("2024-01-01 00:00:00", TIMESTAMP),
        ("2024-01-01 23:59:59.9", TIMESTAMP),
        ("2024-01-01 23:59:59.123456", TIMESTAMP),
        ("2024-01-01 23:59:59.1234567", TEXT),
        ("2024-01-01 23:59:59.", TEXT),
        ("2024-01-01 24:00:00", TEXT),
        ("2024-01-01 23:60:00", TEXT),
        ("2024-01-01T23:59:59", TEXT),
        ("2024-01-01 23:59:59Z", TEXT),
        ("2024-01-01 23:59:59+00:00", TEXT),
        ("2024-01-01 23:59", TEXT),
        ("2024-01-01 23:59:59\n", TEXT),
        ("2024-01-01\n", TEXT),
        ("2024-01-01 23:59:59.5+01", TEXT),  # shaped like one, but with a time zone
        ("2024-01-01 23:59:59,5", TEXT),
        ("2024-01-01T23:59:59.5", TEXT),
        ("2024-W01-1", TEXT),  # an ISO week date
        ("20240101xx", TEXT),
        ("2024-01-0١", TEXT),  # not an ASCII digit
        ("2024-01-01 1١:00:00", TEXT),
    ],
)
def test_infer_type_follows_the_reference_mapping(value: Any, expected: str | None) -> None:
    assert infer_type(value) == expected


def test_infer_type_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(RowError):
        infer_type(object())


def test_merge_types_keeps_equal_types_lets_null_fit_and_widens_the_rest() -> None:
    assert merge_types(None, None) is None
    assert merge_types(None, DOUBLE) == DOUBLE
    assert merge_types(DOUBLE, None) == DOUBLE
    assert merge_types(DATE, DATE) == DATE
    for a, b in [(DOUBLE, TEXT), (DATE, TIMESTAMP), (BOOLEAN, DOUBLE), (JSONB, TEXT)]:
        assert merge_types(a, b) == TEXT
        assert merge_types(b, a) == TEXT
    assert merge_types(DOUBLE, NUMERIC) == merge_types(NUMERIC, DOUBLE) == NUMERIC
    assert merge_types(NUMERIC, BOOLEAN) == merge_types(TEXT, NUMERIC) == TEXT


def test_infer_batch_is_the_union_of_fields_with_merged_types() -> None:
    rows = [{"a": 1, "b": None}, {"b": "x", "c": True}, {"a": "2024-01-01"}, {"a": 5}]
    assert infer_batch(rows) == {"a": TEXT, "b": TEXT, "c": BOOLEAN}
    assert infer_batch([{"only_null": None}, {"only_null": None}]) == {"only_null": None}
    assert infer_batch([{"d": "2024-01-01"}, {"d": None}, {"d": "2024-01-02"}]) == {"d": DATE}
    assert infer_batch([{"d": "2024-01-01"}, {"d": "2024-01-01 00:00:00"}]) == {"d": TEXT}
    assert infer_batch([{"n": 1}, {"n": 2.5}, {"n": True}]) == {"n": TEXT}
    with pytest.raises(RowError):
        infer_batch([{"x": object()}])


def test_plan_change_creates_adds_and_widens() -> None:
    created = plan_change(None, {"a": DOUBLE, "n": None})
    assert created.create and created.add == {"a": DOUBLE, "n": TEXT}
    existing = {"_event_id": "uuid", "_received_at": "timestamp with time zone", "a": DOUBLE}
    assert not plan_change(existing, {"a": DOUBLE})
    assert not plan_change(existing, {"a": None})
    change = plan_change(existing, {"a": TEXT, "b": DATE, "c": None})
    assert change.add == {"b": DATE, "c": TEXT} and change.widen == {"a": TEXT}
    text_column = {**existing, "a": TEXT}
    for kind in (DOUBLE, BOOLEAN, JSONB, DATE, TIMESTAMP, NUMERIC):
        assert not plan_change(text_column, {"a": kind})  # anything fits in text
    assert change.apply(existing) == {**existing, "a": TEXT, "b": DATE, "c": TEXT}
    # A big integer widens a double column to numeric, which then takes doubles too.
    to_numeric = plan_change(existing, {"a": NUMERIC})
    assert to_numeric.widen == {"a": NUMERIC}
    assert to_numeric.apply(existing)["a"] == NUMERIC
    assert not plan_change({**existing, "a": NUMERIC}, {"a": DOUBLE})
    assert plan_change({**existing, "a": NUMERIC}, {"a": BOOLEAN}).widen == {"a": TEXT}


def test_quote_ident_doubles_quotes_and_refuses_nul() -> None:
    assert quote_ident("plain") == '"plain"'
    assert quote_ident('a"; drop table x; --') == '"a""; drop table x; --"'
    with pytest.raises(ValueError):
        quote_ident("a\x00b")


def test_values_for_text_columns_read_like_postgres_casts() -> None:
    assert as_text("s") == "s"
    assert as_text(2.0) == "2"
    assert as_text(2.5) == "2.5"
    assert as_text(7) == "7"
    assert as_text(True) == "true"
    assert as_text({"a": [1]}) == '{"a": [1]}'


def columns_of(rows: list[dict[str, Any]]) -> RowColumns:
    """Rows as a send snapshots them, then as the batch holds them."""
    return RowColumns.of(
        [new_id() for _ in rows],
        [time.time()] * len(rows),
        [tuple(row) for row in rows],
        [snapshot_row(row)[0] for row in rows],
    )


def test_records_carry_values_as_the_driver_writes_them_for_each_column() -> None:
    batch = columns_of(
        [
            {"d": "2024-01-02", "t": "2024-01-02 03:04:05.5", "n": 1, "j": [1], "m": "x"},
            {"d": None, "t": "2024-01-02 03:04:06", "n": 2.5, "j": {"k": None}, "m": 7.0},
        ]
    )
    assert batch.types == {"d": DATE, "t": TIMESTAMP, "n": DOUBLE, "j": JSONB, "m": TEXT}
    names = list(batch.types)
    records = list(batch.records(names, batch.types))

    def since_2000(moment: datetime.datetime) -> tuple[int]:  # Postgres's own count
        return ((moment - datetime.datetime(2000, 1, 1)) // datetime.timedelta(microseconds=1),)

    assert [record[2:] for record in records] == [
        (
            datetime.date(2024, 1, 2),
            since_2000(datetime.datetime(2024, 1, 2, 3, 4, 5, 500000)),
            1,
            b"[1]",
            "x",
        ),
        (None, since_2000(datetime.datetime(2024, 1, 2, 3, 4, 6)), 2.5, b'{"k": null}', "7"),
    ]
    assert [record[0] for record in records] == batch.ids
    received = [datetime.datetime.fromtimestamp(at, datetime.UTC) for at in batch.received_at]
    assert [record[1] for record in records] == [
        since_2000(moment.replace(tzinfo=None)) for moment in received
    ]
    widened = list(batch.records(names, dict.fromkeys(names, TEXT)))
    assert [record[2:] for record in widened] == [
        ("2024-01-02", "2024-01-02 03:04:05.5", "1", "[1]", "x"),
        (None, "2024-01-02 03:04:06", "2.5", '{"k": null}', "7"),
    ]


def test_integers_beyond_a_double_make_a_numeric_column_and_keep_their_value() -> None:
    big = 1152921504606846977  # 2**60 + 1: as a double it would read back ...976
    batch = columns_of([{"n": 1}, {"n": None}, {"n": big}, {"n": 0.1 + 0.2}, {"n": 2.0}])
    assert batch.types == {"n": NUMERIC}
    values = [record[2] for record in batch.records(["n"], batch.types)]
    # floats by their shortest text, as `double precision::text::numeric` reads them
    assert values == [1, None, big, decimal.Decimal("0.30000000000000004"), 2]
    assert [type(value) for value in values] == [int, type(None), int, decimal.Decimal, int]
    as_text = [record[2] for record in batch.records(["n"], {"n": TEXT})]
    assert as_text == ["1", None, str(big), "0.30000000000000004", "2"]
    # Within +-2**53 a double holds every integer exactly: the column stays a double.
    small = columns_of([{"n": 2**53}, {"n": -(2**53)}, {"n": 1.5}, {"n": 1e300}])
    assert small.types == {"n": DOUBLE}
    # A double batch written to a column that is numeric already (another batch widened it).
    assert [record[2] for record in small.records(["n"], {"n": NUMERIC})] == [
        2**53,
        -(2**53),
        decimal.Decimal("1.5"),
        decimal.Decimal("1e300"),
    ]
    # Booleans are not numbers here (bool is an int subclass in Python).
    assert columns_of([{"b": True}, {"b": big}]).types == {"b": TEXT}
    assert columns_of([{"b": True}, {"b": False}]).types == {"b": BOOLEAN}


def test_halves_leave_out_the_fields_their_rows_lack() -> None:
    batch = columns_of([{"a": 1}, {"a": 2}, {"a": 3, "odd": "x"}, {"a": 4, "odd": None}])
    first, second = batch.halves()
    assert first.types == {"a": DOUBLE}  # so a column Postgres refuses cannot fail these
    assert second.types == {"a": DOUBLE, "odd": TEXT}
    assert (first.ids, second.ids) == (batch.ids[:2], batch.ids[2:])
    # Typed again by their own rows: a number and a word make text, each alone does not.
    mixed = columns_of([{"n": 2}, {"n": "2024-01-02"}])
    assert mixed.types == {"n": TEXT}
    assert [half.types for half in mixed.halves()] == [{"n": DOUBLE}, {"n": DATE}]
    assert [list(half.records(["n"], {"n": TEXT}))[0][2] for half in mixed.halves()] == [
        "2",
        "2024-01-02",
    ]
    assert RowColumns.empty().types == {} and len(RowColumns.empty()) == 0


def test_has_nul_looks_everywhere() -> None:
    assert has_nul("a\x00")
    assert has_nul({"k": ["fine", {"deep": "\x00"}]})
    assert has_nul({"bad\x00key": 1})
    assert not has_nul({"k": ["fine", 1, None, True, "\\u0000 as text"]})


@pytest.mark.parametrize(
    ("payload", "holds_nul"),
    [
        ({"a": "fine", "b": ["\\u0000 as text"], "c": 1.5}, False),
        ({"a": "x\x00y"}, True),
        ({"a": 1, "b": {"deep": ["\x00"]}}, True),
        ({"b": [{"bad\x00key": 1}]}, True),
        ({"a": ["mixed"], "b": "x\x00y"}, True),
    ],
)
def test_a_batch_refuses_rows_that_hold_nul_and_keeps_the_rest(
    payload: dict[str, Any], holds_nul: bool
) -> None:
    fine = {"a": "fine", "z": 1}
    ids = ["first", "suspect", "last"]
    rows = (fine, payload, fine)
    shapes = [tuple(row) for row in rows]
    batch = RowColumns.of(ids, [time.time()] * 3, shapes, [snapshot_row(row)[0] for row in rows])
    if holds_nul:
        assert batch.refused == {"suspect": NUL_REFUSED}
        assert batch.ids == ["first", "last"]
        assert batch.columns["z"].values == [1, 1]
    else:
        assert batch.refused == {} and batch.ids == ids


def test_a_row_snapshot_is_a_private_copy_with_nested_values_as_json() -> None:
    nested = {"k": [1, 2]}
    values, size = snapshot_row({"a": "x", "b": nested, "c": None})
    nested["k"].append(3)
    assert values == ("x", b'{"k": [1, 2]}', None)
    assert size >= len('{"a": "x", "b": {"k": [1, 2]}, "c": null}') - 8


MIXED_ROWS: list[dict[str, Any]] = [
    {"a": 1, "b": "x", "c": None},
    {"a": 2, "b": "y", "c": None},
    {"a": 2.5, "b": "2024-01-02", "d": [1]},
    {"b": "2024-01-02", "a": True},  # same keys in another order
    {"d": {"k": "v"}, "e": "2024-01-02 03:04:05", "c": "now text"},
    {"e": "2024-01-02 03:04:05.123456", "f": None},
]


def test_received_at_is_the_send_time_to_the_microsecond_as_datetime_rounds_it() -> None:
    rng = random.Random(5)
    now = time.time()
    times = [now + rng.random() * 1e6 for _ in range(20_000)]
    times += [1_700_000_000.0000005, 1_700_000_000.0000015, 1_700_000_000.9999995]
    expected = [
        ((datetime.datetime.fromtimestamp(at, datetime.UTC) - PG_EPOCH_UTC) // MICROSECOND,)
        for at in times
    ]
    assert pg_timestamps_utc(times) == expected


def test_column_types_equal_the_types_merged_value_by_value() -> None:
    batch = columns_of(MIXED_ROWS)
    assert batch.types == infer_batch(MIXED_ROWS)
    assert batch.types == {
        "a": TEXT,  # number, then boolean
        "b": TEXT,  # text, then a date
        "c": TEXT,
        "d": JSONB,
        "e": TIMESTAMP,
        "f": None,
    }


def test_column_types_equal_the_reference_rules_on_random_batches() -> None:
    values = [
        None, "text", "", "2024-02-29", "2023-02-29", "2024-02-29 10:11:12",
        "2024-02-29 10:11:12.5", "2024-02-29 25:00:00", 0, 1.5, True, False, [1], {"k": 1},
        2**53 + 1, -(10**20), 1e300,
    ]  # fmt: skip
    rng = random.Random(7)
    for _ in range(500):
        keys = rng.sample("abcde", rng.randint(1, 5))
        palette = {key: rng.sample(values, rng.randint(1, 3)) for key in keys}
        rows = [
            {key: rng.choice(palette[key]) for key in keys if rng.random() < 0.8}
            for _ in range(rng.randint(1, 6))
        ]
        assert columns_of(rows).types == infer_batch(rows), rows


def test_generated_ddl_runs_on_postgres_with_hostile_names(postgres_url: str) -> None:
    table = f"ddl_{new_id()[:12]}"
    hostile = 'a"; drop table x; --'
    statements = change_ddl(table, plan_change(None, {hostile: DOUBLE, "select": None}))
    statements += change_ddl(table, SchemaChange(add={"from": JSONB}, widen={hostile: TEXT}))

    async def main() -> dict[str, str]:
        conn = await asyncpg.connect(postgres_url)
        try:
            for statement in statements:
                await conn.execute(statement)
            rows = await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = $1",
                table,
            )
            return {row["column_name"]: row["data_type"] for row in rows}
        finally:
            await conn.close()

    assert asyncio.run(main()) == {
        "_event_id": "uuid",
        "_received_at": "timestamp with time zone",
        hostile: "text",
        "select": "text",
        "from": "jsonb",
    }
