"""The SQL destination against a real Postgres on loopback.

Rows are read back with a plain asyncpg connection of the test's own (`Db`),
not through the code under test; `rt.sql_query` is tested on its own. Every
test loads its own tables, so tests share one server in any order.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sql_support import Db, load

from outbound import Runtime, SendError
from outbound.actors.ids import new_id
from outbound.destinations.sql.columns import RowColumns
from outbound.destinations.sql.store import PostgresStore, SqlQueryError
from outbound.embedded import EmbeddedPostgres, free_port

# -- typing rules -------------------------------------------------------------------------


def test_reference_example_then_a_string_widens_the_column_to_text(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    run_id = load(rt, table, [{"event_type": "click", "ts": 1558800000.5, "username": "ann"}])
    assert [d.status for d in rt.deliveries(run_id)] == ["delivered"]
    assert rt.deliveries(run_id)[0].detail["table"] == table
    assert db.columns(table) == {
        "_event_id": "uuid",
        "_received_at": "timestamp with time zone",
        "event_type": "text",
        "ts": "double precision",
        "username": "text",
    }

    load(rt, table, [{"event_type": "view", "ts": "2019-05-25T16:14:58Z", "username": "bob"}])
    assert db.columns(table)["ts"] == "text"
    rows = db.rows(table)
    assert [(r["event_type"], r["ts"], r["username"]) for r in rows] == [
        ("click", "1558800000.5", "ann"),
        ("view", "2019-05-25T16:14:58Z", "bob"),
    ]


def test_every_type_mapping_on_first_sight(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    payload = {
        "s": "hello",
        "i": 42,
        "f": 2.5,
        "yes": True,
        "no": False,
        "arr": [1, "two", {"three": 3}],
        "obj": {"k": "v", "n": [1, 2]},
        "nothing": None,
        "day": "2024-02-29",
        "moment": "2024-02-29 23:59:58",
        "precise": "2024-02-29 23:59:58.123456",
    }
    load(rt, table, [payload])
    assert db.columns(table) == {
        "_event_id": "uuid",
        "_received_at": "timestamp with time zone",
        "s": "text",
        "i": "double precision",
        "f": "double precision",
        "yes": "boolean",
        "no": "boolean",
        "arr": "jsonb",
        "obj": "jsonb",
        "nothing": "text",
        "day": "date",
        "moment": "timestamp without time zone",
        "precise": "timestamp without time zone",
    }
    [row] = db.rows(table)
    assert row["s"] == "hello" and row["i"] == 42.0 and row["f"] == 2.5
    assert row["yes"] is True and row["no"] is False
    assert row["arr"] == [1, "two", {"three": 3}]
    assert row["obj"] == {"k": "v", "n": [1, 2]}
    assert row["nothing"] is None
    assert row["day"] == datetime.date(2024, 2, 29)
    assert row["moment"] == datetime.datetime(2024, 2, 29, 23, 59, 58)
    assert row["precise"] == datetime.datetime(2024, 2, 29, 23, 59, 58, 123456)


def test_event_id_and_received_at_come_from_the_send(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    before = datetime.datetime.now(datetime.UTC)
    run_id = load(rt, table, [{"n": 1}, {"n": 2}])
    [first, second] = rt.deliveries(run_id)
    rows = {str(r["_event_id"]).replace("-", ""): r for r in db.rows(table)}
    assert set(rows) == {first.id, second.id}
    for delivery in (first, second):
        received = rows[delivery.id]["_received_at"]
        assert received == datetime.datetime.fromtimestamp(delivery.accepted_at, datetime.UTC)
        assert (
            before - datetime.timedelta(seconds=1)
            <= received
            <= before + datetime.timedelta(seconds=10)
        )


def test_nested_objects_are_queryable_with_arrow_operators(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    load(
        rt,
        table,
        [
            {"order": {"id": 7, "customer": {"name": "Ann", "tags": ["vip"]}}},
            {"order": {"id": 8, "customer": {"name": "Bob", "tags": []}}},
        ],
    )
    names = db.fetch(
        f"SELECT \"order\"->'customer'->>'name' AS name FROM \"{table}\" "
        "WHERE (\"order\"->>'id')::int = 7"
    )
    assert names == [{"name": "Ann"}]
    result = rt.sql_query(
        f"SELECT \"order\"->>'id' AS id, \"order\"->'customer'->'tags' AS tags "
        f'FROM "{table}" ORDER BY 1'
    )
    assert result["rows"] == [["7", ["vip"]], ["8", []]]


def test_only_valid_dates_and_timestamps_in_the_exact_format_are_detected(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    load(
        rt,
        table,
        [
            {
                "a_date": "2023-12-31",
                "a_timestamp": "2023-12-31 08:00:00",
                "fraction": "2023-12-31 08:00:00.5",
                "no_such_day": "2023-02-30",
                "t_separator": "2023-12-31T08:00:00",
                "seven_digits": "2023-12-31 08:00:00.1234567",
                "hour_25": "2023-12-31 25:00:00",
                "with_zone": "2023-12-31 08:00:00+02",
                "short": "2023-1-31",
            }
        ],
    )
    columns = db.columns(table)
    assert columns["a_date"] == "date"
    assert columns["a_timestamp"] == "timestamp without time zone"
    assert columns["fraction"] == "timestamp without time zone"
    for name in ("no_such_day", "t_separator", "seven_digits", "hour_25", "with_zone", "short"):
        assert columns[name] == "text", name
    [row] = db.rows(table)
    assert row["no_such_day"] == "2023-02-30"
    assert row["fraction"] == datetime.datetime(2023, 12, 31, 8, 0, 0, 500000)

    # A date column that later sees a timestamp (another type) widens to text.
    load(rt, table, [{"a_date": "2023-12-31 09:00:00"}])
    assert db.columns(table)["a_date"] == "text"
    assert sorted(r["a_date"] for r in db.rows(table)) == ["2023-12-31", "2023-12-31 09:00:00"]


def test_columns_are_the_union_of_fields_and_missing_fields_are_null(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    load(
        rt,
        table,
        [
            {"a": 1, "only_null": None},
            {"b": "x", "later_number": None},
            {"a": None, "later_number": 3},
        ],
    )
    columns = db.columns(table)
    assert columns["a"] == "double precision"
    assert columns["b"] == "text"
    assert columns["only_null"] == "text"  # null -> text when nothing else is known
    assert columns["later_number"] == "double precision"  # a null says nothing about type
    rows = db.rows(table)
    assert [(r["a"], r["b"], r["only_null"], r["later_number"]) for r in rows] == [
        (1.0, None, None, None),
        (None, "x", None, None),
        (None, None, None, 3.0),
    ]

    # A later batch adds a field; earlier rows read NULL in it.
    load(rt, table, [{"c": True}])
    assert db.columns(table)["c"] == "boolean"
    assert [r["c"] for r in db.rows(table)] == [None, None, None, True]


def test_every_pair_of_different_types_widens_to_text_with_readable_values(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    first = {"n": 2.0, "b": True, "j": {"k": [1]}, "d": "2024-01-02", "s": "x"}
    load(rt, table, [first])
    load(rt, table, [{"n": "two", "b": 1, "j": "plain", "d": 5, "s": 7}])
    assert {name: db.columns(table)[name] for name in first} == dict.fromkeys(first, "text")
    rows = db.rows(table)
    assert [rows[0][name] for name in first] == ["2", "true", '{"k": [1]}', "2024-01-02", "x"]
    assert [rows[1][name] for name in first] == ["two", "1", "plain", "5", "7"]


def test_hostile_keys_are_ordinary_columns(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    victim = f"{table}_x"
    db.execute(f'CREATE TABLE "{victim}" (a int)')
    hostile = {
        f'a"; drop table {victim}; --': "injected?",
        "select": 1,
        "with space": "s",
        "Mixed Case": "M",
        "mixed case": "m",
        "ünï©ode ✓": "u",
        "quote'single": "q",
        "semi;colon": True,
    }
    load(rt, table, [hostile])
    columns = db.columns(table)
    assert set(hostile) <= set(columns)
    [row] = db.rows(table)
    assert {key: row[key] for key in hostile} == {
        key: (float(value) if isinstance(value, int) and not isinstance(value, bool) else value)
        for key, value in hostile.items()
    }
    assert db.value(f'SELECT count(*) FROM "{victim}"') == 0  # still there


# -- failures -------------------------------------------------------------------------------


def test_a_nul_character_fails_only_its_own_row(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    run_id = load(
        rt,
        table,
        [
            {"n": 1, "s": "fine"},
            {"n": 2, "s": "bad\u0000byte"},
            {"n": 3, "nested": {"deep": ["also \u0000 bad"]}},
            {"n": 4, "s": "fine too"},
        ],
    )
    statuses = [(d.status, d.error) for d in rt.deliveries(run_id)]
    assert [status for status, _ in statuses] == ["delivered", "failed", "failed", "delivered"]
    assert "NUL" in (statuses[1][1] or "") and "NUL" in (statuses[2][1] or "")
    assert sorted(r["n"] for r in db.rows(table)) == [1.0, 4.0]


def test_a_row_postgres_refuses_is_found_and_fails_alone(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    """A table near Postgres's 1600 columns: a row with new keys passes our checks,
    Postgres refuses it (54011), and the batch is split to find it."""
    rt = make_sql_runtime()
    wide = {"k0": 0, **{f"k{i}": None for i in range(1, 1590)}}  # nulls: no row too big
    assert {d.status for d in rt.deliveries(load(rt, table, [wide]))} == {"delivered"}
    assert len(db.columns(table)) == 2 + 1590
    rows: list[dict[str, Any]] = [{"k0": i} for i in range(40)]
    rows[13] = {"k0": 13, **{f"new{i}": i for i in range(20)}}
    run_id = load(rt, table, rows)
    deliveries = rt.deliveries(run_id)
    failed = [i for i, d in enumerate(deliveries) if d.status == "failed"]
    assert failed == [13]
    assert "1600 columns" in (deliveries[13].error or "")
    assert db.count(table) == 1 + 39
    assert rt.stats()["destinations"]["sql"]["delivered"] == 1 + 39


def test_rows_postgres_refuses_for_their_keys_fail_alone(
    postgres_url: str, db: Db, table: str
) -> None:
    """The rule behind the checks at the call: a refusal tied to some rows (here a key
    named like a system column, which `ctx.send.sql` refuses) fails those rows only."""
    rows: list[dict[str, Any]] = [{"n": i} for i in range(10)]
    rows[3] = {"n": 3, "xmin": 5}
    rows[7] = {"n": 7, "ctid": "x"}
    ids = [new_id() for _ in rows]
    batch = RowColumns.of(
        ids, [time.time()] * 10, [tuple(row) for row in rows], [tuple(row.values()) for row in rows]
    )

    async def main() -> tuple[int, dict[str, str]]:
        store = PostgresStore(postgres_url)
        try:
            return await store.write(table, batch, direct=True)
        finally:
            await store.close()

    inserted, failed = asyncio.run(main())
    assert inserted == 8 and set(failed) == {ids[3], ids[7]}
    assert all("conflicts with a system column name" in error for error in failed.values())
    assert sorted(r["n"] for r in db.rows(table)) == [i for i in range(10) if i not in (3, 7)]


def test_a_table_postgres_refuses_fails_its_rows_and_others_load(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    """`<table>_pkey` is a valid name, but it is the index of `<table>`'s primary key."""
    rt = make_sql_runtime()
    load(rt, table, [{"n": 0}])
    index = f"{table}_pkey"

    @rt.workflow("two_tables")
    def two_tables(event: Any, ctx: Any) -> None:
        for n in range(1, 4):
            ctx.send.sql(table=index, payload={"n": n})
            ctx.send.sql(table=table, payload={"n": n})

    result = rt.run("two_tables", {}, timeout=10)
    assert rt.flush(timeout=20)
    deliveries = rt.deliveries(result.run_id)
    assert [d.status for d in deliveries] == ["failed", "delivered"] * 3
    assert all(index in (d.error or "") and "index" in (d.error or "") for d in deliveries[::2])
    assert [d.attempts for d in deliveries[::2]] == [1, 1, 1]  # failed for good at once
    assert sorted(r["n"] for r in db.rows(table)) == [0.0, 1.0, 2.0, 3.0]


def test_a_row_whose_type_change_a_view_blocks_fails_alone(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    """A user's view on a column stops Postgres from widening it (0A000): only the row
    that needs the wider type fails; the rest of its batch loads."""
    rt = make_sql_runtime()
    load(rt, table, [{"n": 1}])
    db.execute(f'CREATE VIEW "{table}_v" AS SELECT n FROM "{table}"')
    try:
        run_id = load(rt, table, [{"n": 2}, {"n": "three"}, {"n": 4}])
        deliveries = rt.deliveries(run_id)
        assert [d.status for d in deliveries] == ["delivered", "failed", "delivered"]
        assert "view" in (deliveries[1].error or "")
        assert sorted(r["n"] for r in db.rows(table)) == [1.0, 2.0, 4.0]
    finally:
        db.execute(f'DROP VIEW "{table}_v"')


ODD_TABLES = [
    "pg_class",  # would name the catalog
    "pg_events_x",
    "\u0130" * 31,  # 62 bytes, 93 lowercased
    "\u212aelvin_x",  # the Kelvin sign, "k" lowercased
    "\u017ftate_x",  # long s, "s" folded
    "select",  # a keyword: quoted, a table like any other
]


@pytest.mark.parametrize("odd_table", ODD_TABLES)
def test_an_odd_table_name_is_refused_at_the_call_or_loaded(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str, odd_table: str
) -> None:
    rt = make_sql_runtime()
    outcome: list[Any] = []

    @rt.workflow("odd")
    def odd(event: Any, ctx: Any) -> None:
        ctx.send.sql(table=table, payload={"n": 1})
        try:
            outcome.append(ctx.send.sql(table=odd_table, payload={"odd": True}))
        except SendError as error:
            outcome.append(error)
        ctx.send.sql(table=table, payload={"n": 2})

    result = rt.run("odd", {}, timeout=10)
    assert result.status == "succeeded", result.error
    assert rt.flush(timeout=20)
    [sent] = outcome
    statuses = [d.status for d in rt.deliveries(result.run_id)]
    if isinstance(sent, SendError):
        assert sent.field == "table" and statuses == ["delivered", "delivered"]
    else:
        assert statuses == ["delivered"] * 3
        assert [r["odd"] for r in db.rows(odd_table.lower())] == [True]
        db.execute(f'DROP TABLE "{odd_table.lower()}"')
    assert sorted(r["n"] for r in db.rows(table)) == [1.0, 2.0]


ODD_KEYS = ["xmin", "ctid", "tableoid", "xmax", "cmin", "cmax", "oid", "XMIN", "\u212a", "\u017f"]
ODD_KEYS += ["\u0130" * 31, "k", "s"]  # the last two beside the letters that fold to them


def test_keys_named_like_system_columns_are_refused_at_the_call_and_others_load(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    outcome: dict[str, Any] = {}

    @rt.workflow("odd")
    def odd(event: Any, ctx: Any) -> None:
        ctx.send.sql(table=table, payload={"n": 0})
        for n, key in enumerate(ODD_KEYS, 1):
            try:
                outcome[key] = ctx.send.sql(table=table, payload={"n": n, key: n})
            except SendError as error:
                outcome[key] = error

    result = rt.run("odd", {}, timeout=10)
    assert result.status == "succeeded", result.error
    assert rt.flush(timeout=20)
    refused = {key for key, sent in outcome.items() if isinstance(sent, SendError)}
    assert refused == {"xmin", "ctid", "tableoid", "xmax", "cmin", "cmax"}
    for key in refused:
        assert outcome[key].field == f"payload[{key!r}]" and "system column" in outcome[key].rule
    assert {d.status for d in rt.deliveries(result.run_id)} == {"delivered"}
    stored = {float(n): key for n, key in enumerate(ODD_KEYS, 1) if key not in refused}
    rows = db.rows(table)
    assert len(rows) == 1 + len(stored)
    for row in rows:  # each key its own column, holding its own row's number
        key = stored.get(row["n"])
        assert key is None or row[key] == row["n"]


# -- big integers ------------------------------------------------------------------------------


def test_integers_beyond_a_double_read_back_exactly(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    big = 1152921504606846977  # 2**60 + 1; a double would make it ...976
    run_id = load(rt, table, [{"id": big, "small": 5}, {"id": 7, "small": 6}])
    assert {d.status for d in rt.deliveries(run_id)} == {"delivered"}
    columns = db.columns(table)
    assert columns["id"] == "numeric" and columns["small"] == "double precision"
    assert [(r["id"], r["small"]) for r in db.rows(table, order="small")] == [(big, 5.0), (7, 6.0)]
    assert db.value(f'SELECT id::text FROM "{table}" WHERE small = 5') == str(big)


def test_a_double_column_widens_to_numeric_and_keeps_every_value(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    load(rt, table, [{"seq": 1, "n": 0.1 + 0.2}, {"seq": 2, "n": 2**53}, {"seq": 3, "n": -1.5}])
    assert db.columns(table)["n"] == "double precision"
    load(rt, table, [{"seq": 4, "n": -(2**60) - 1}, {"seq": 5, "n": 2.25}])
    assert db.columns(table)["n"] == "numeric"
    load(rt, table, [{"seq": 6, "n": 0.1}])  # a double batch into the numeric column
    texts = db.fetch(f'SELECT n::text AS n FROM "{table}" ORDER BY seq')
    assert [r["n"] for r in texts] == [
        "0.30000000000000004",  # a direct double -> numeric cast would keep 15 digits: 0.3
        str(2**53),
        "-1.5",
        str(-(2**60) - 1),
        "2.25",
        "0.1",
    ]


def test_a_big_integer_beside_booleans_or_text_reads_back_as_its_digits(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    big = 2**64 + 1
    load(rt, table, [{"seq": 1, "b": True, "s": "x"}, {"seq": 2, "b": big, "s": big}])
    assert db.columns(table)["b"] == db.columns(table)["s"] == "text"
    rows = db.rows(table, order="seq")
    assert [(r["b"], r["s"]) for r in rows] == [("true", "x"), (str(big), str(big))]


def test_rows_postgres_refuses_are_dead_lettered_at_once_in_one_write(
    make_sql_runtime: Callable[..., Runtime],
    table: str,
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt = make_sql_runtime()
    payloads = [{"n": n, "s": "bad\u0000byte" if n % 2 else "fine"} for n in range(6)]
    with caplog.at_level(logging.WARNING):
        run_id = load(rt, table, payloads)
    refused = [d for d in rt.deliveries(run_id) if d.status == "failed"]
    assert len(refused) == 3
    [path] = {Path(d.detail["dead_letter"]) for d in refused}
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(line["table"], line["payload"]) for line in lines] == [
        (table, payload) for payload in payloads[1::2]
    ]
    assert [line["event_id"] for line in lines] == [d.id for d in refused]
    assert all("NUL" in line["error"] for line in lines)
    written = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(written) == 1 and "3 failed 'sql' send(s)" in written[0].getMessage()


def test_two_runtimes_load_one_table_concurrently(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    first = make_sql_runtime(batch_max_events=50)
    second = make_sql_runtime(batch_max_events=50)
    per_runtime = 400

    def feed(rt: Runtime, name: str) -> None:
        futures = []
        for start in range(0, per_runtime, 20):
            rows = [
                # "shared" is a number here and a string there: it must end as text.
                {"who": name, "i": i, "shared": i if name == "one" else f"s{i}", name: True}
                for i in range(start, start + 20)
            ]
            futures.append(rt.submit("load", {"table": table, "rows": rows}))
        for future in futures:
            assert future.result(10).status == "succeeded"

    threads = [
        threading.Thread(target=feed, args=(first, "one")),
        threading.Thread(target=feed, args=(second, "two")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert first.flush(timeout=30) and second.flush(timeout=30)
    for rt in (first, second):
        assert rt.stats()["destinations"]["sql"]["delivered"] == per_runtime
    assert db.count(table) == 2 * per_runtime
    counts = db.fetch(f'SELECT who, count(*) AS n FROM "{table}" GROUP BY who ORDER BY who')
    assert counts == [{"who": "one", "n": per_runtime}, {"who": "two", "n": per_runtime}]
    columns = db.columns(table)
    assert columns["shared"] == "text"
    assert columns["one"] == columns["two"] == "boolean"
    assert columns["i"] == "double precision"


def test_postgres_restarting_mid_stream_loses_and_duplicates_nothing(
    make_runtime: Callable[..., Runtime],
) -> None:
    server = EmbeddedPostgres().start()
    try:
        db = Db(server.url)
        rt = make_runtime(
            database_url=server.url, batch_max_age=0.1, batch_max_events=25, retry_cap=0.3
        )

        @rt.workflow("load")
        def load_rows(event: dict[str, Any], ctx: Any) -> None:
            for payload in event["rows"]:
                ctx.send.sql(table="stream", payload=payload)

        run_ids = []
        sent = 0

        def send_some(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                rows = [{"seq": sent + k} for k in range(5)]
                sent += 5
                run_ids.append(rt.run("load", {"rows": rows}, timeout=10).run_id)
                time.sleep(0.01)

        send_some(20)
        server.stop()  # cuts the pool's connections while batches keep coming
        send_some(20)
        time.sleep(0.5)
        retrying = [d.status for run in run_ids[-20:] for d in rt.deliveries(run)]
        assert "retrying" in retrying or "pending" in retrying
        server.start()  # same data directory, same port
        send_some(20)
        assert rt.flush(timeout=30)
        statuses = {d.status for run in run_ids for d in rt.deliveries(run)}
        assert statuses == {"delivered"}
        assert db.count("stream") == sent == 300
        assert db.value('SELECT count(DISTINCT seq) FROM "stream"') == sent
        assert rt.stats()["destinations"]["sql"]["retries"] > 0
    finally:
        server.close()


def test_unreachable_postgres_keeps_batches_then_dead_letters_them_with_their_table(
    make_runtime: Callable[..., Runtime], data_dir: Path, table: str
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens
    rt = make_runtime(database_url=url, batch_max_age=0.1)

    @rt.workflow("load")
    def load_rows(event: dict[str, Any], ctx: Any) -> None:
        for payload in event["rows"]:
            ctx.send.sql(table=event["table"], payload=payload)

    payloads = [{"n": 1, "obj": {"a": [1]}}, {"n": 2, "s": "two"}]
    run_id = load(rt, table, payloads, flush=False)
    deadline = time.monotonic() + 10
    while rt.deliveries(run_id)[0].status != "retrying" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rt.deliveries(run_id)[0].status == "retrying"
    with pytest.raises(SqlQueryError, match="cannot query Postgres"):
        rt.sql_query("SELECT 1", timeout=2)
    report = rt.stop(drain=True, timeout=0.5)
    assert report.dead_lettered == 2 and report.per_destination == {"sql": 2}
    [path] = (data_dir / "dead-letter").glob("sql-*.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["table"], line["payload"]) for line in lines] == [(table, p) for p in payloads]
    deliveries = rt.deliveries(run_id)
    assert {line["event_id"] for line in lines} == {d.id for d in deliveries}
    assert all(d.status == "failed" and d.detail["dead_letter"] == str(path) for d in deliveries)


def test_a_table_not_made_by_outbound_fails_the_batch_with_a_clear_error(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    db.execute(f'CREATE TABLE "{table}" (id int)')
    rt = make_sql_runtime()
    run_id = load(rt, table, [{"n": 1}])
    [delivery] = rt.deliveries(run_id)
    assert delivery.status == "failed"
    assert "_event_id" in (delivery.error or "") and table in (delivery.error or "")


# -- retention --------------------------------------------------------------------------


def test_retention_deletes_rows_older_than_the_limit(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    keeper = f"{table}_kept"
    rt = make_sql_runtime(sql_retention_days=1, sql_retention_interval=0.2)
    load(rt, table, [{"n": i} for i in range(6)])
    load(rt, keeper, [{"n": 1}])
    db.execute(f"UPDATE \"{table}\" SET _received_at = now() - interval '2 days' WHERE n < 3")
    db.execute(f"UPDATE \"{keeper}\" SET _received_at = now() - interval '23 hours'")
    deadline = time.monotonic() + 10
    while db.count(table) > 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(r["n"] for r in db.rows(table)) == [3.0, 4.0, 5.0]
    assert db.count(keeper) == 1
    # The sweep counts what it deleted once Postgres has answered: a moment after
    # the rows are gone.
    while rt.stats()["destinations"]["sql"].get("rows_expired", 0) < 3:
        assert time.monotonic() < deadline, rt.stats()["destinations"]["sql"]
        time.sleep(0.05)


def test_retention_zero_keeps_rows_forever(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime(sql_retention_days=0, sql_retention_interval=0.1)
    load(rt, table, [{"n": 1}])
    db.execute(f"UPDATE \"{table}\" SET _received_at = now() - interval '3650 days'")
    time.sleep(0.5)
    assert db.count(table) == 1


# -- queries ------------------------------------------------------------------------------


def test_sql_query_returns_columns_and_json_friendly_rows(
    make_sql_runtime: Callable[..., Runtime], table: str
) -> None:
    rt = make_sql_runtime()
    load(
        rt,
        table,
        [
            {
                "name": "ann",
                "score": 1.5,
                "day": "2024-01-02",
                "at": "2024-01-02 03:04:05",
                "j": {"x": 1},
            }
        ],
    )
    result = rt.sql_query(
        f"SELECT _event_id, name, score, day, at, j, _received_at, count(*) OVER () AS n, "
        f"1.5::numeric AS num, 'infinity'::timestamptz AS forever, "
        f"'-infinity'::timestamp AS never, '1999-12-31 23:59:59.5'::timestamp AS before "
        f'FROM "{table}"'
    )
    assert [c["name"] for c in result["columns"]] == [
        "_event_id", "name", "score", "day", "at", "j", "_received_at", "n", "num",
        "forever", "never", "before",
    ]  # fmt: skip
    types = {c["name"]: c["type"] for c in result["columns"]}
    assert types["score"] == "double precision" and types["j"] == "jsonb"
    [row] = result["rows"]
    json.dumps(result)  # everything is JSON-serializable
    event_id, name, score, day, at, j, received, n, num, forever, never, before = row
    assert len(event_id) == 36 and name == "ann" and score == 1.5
    assert day == "2024-01-02" and at == "2024-01-02T03:04:05" and j == {"x": 1}
    received_at = datetime.datetime.fromisoformat(received)
    assert received_at.tzinfo is not None
    assert abs((received_at - datetime.datetime.now(datetime.UTC)).total_seconds()) < 60
    assert n == 1 and num == 1.5
    assert (forever, never, before) == ("infinity", "-infinity", "1999-12-31T23:59:59.500000")


@pytest.mark.parametrize(
    ("statement", "refusal"),
    [
        ('DELETE FROM "{table}"', "read-only transaction"),
        ('DROP TABLE "{table}"', "read-only transaction"),
        ("CREATE TABLE {table}_new (a int)", "read-only transaction"),
        (
            'INSERT INTO "{table}" (_event_id, _received_at) VALUES (gen_random_uuid(), now())',
            "read-only transaction",
        ),  # fmt: skip
        ('SELECT 1; DELETE FROM "{table}"', "multiple commands"),
        ("SET TRANSACTION READ WRITE", "read-write mode"),
        ("COPY \"{table}\" TO PROGRAM 'true'", "permission denied"),
    ],
)
def test_sql_query_refuses_writes_and_ddl_with_postgres_errors(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str, statement: str, refusal: str
) -> None:
    rt = make_sql_runtime()
    load(rt, table, [{"n": 1}])
    with pytest.raises(SqlQueryError) as caught:
        rt.sql_query(statement.format(table=table))
    assert refusal.lower() in str(caught.value).lower()
    assert db.count(table) == 1
    assert rt.sql_query(f'SELECT n FROM "{table}"')["rows"] == [[1.0]]  # the pool still works


def test_sql_query_timeout_cancels_a_slow_statement(
    make_sql_runtime: Callable[..., Runtime],
) -> None:
    rt = make_sql_runtime()
    started = time.monotonic()
    with pytest.raises(SqlQueryError, match="statement timeout"):
        rt.sql_query("SELECT pg_sleep(10)", timeout=0.3)
    assert time.monotonic() - started < 5
    with pytest.raises(SqlQueryError, match="syntax error"):
        rt.sql_query("SELEC 1")


def test_without_a_database_url_sql_says_what_to_set(
    make_runtime: Callable[..., Runtime],
) -> None:
    rt = make_runtime(database_url=None)
    with pytest.raises(RuntimeError, match="OUTBOUND_DATABASE_URL"):
        rt.sql_query("SELECT 1")

    @rt.workflow("w")
    def w(event: Any, ctx: Any) -> None:
        ctx.send.sql(table="t", payload={"a": 1})

    result = rt.run("w", {})
    assert result.status == "failed" and "OUTBOUND_DATABASE_URL" in (result.error or "")


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table_name", "payload", "field"),
    [
        ("_private", {"a": 1}, "table"),
        ("has-dash", {"a": 1}, "table"),
        ("has space", {"a": 1}, "table"),
        ("drop table x;--", {"a": 1}, "table"),
        ("", {"a": 1}, "table"),
        ("x" * 64, {"a": 1}, "table"),
        (7, {"a": 1}, "table"),
        (["unhashable"], {"a": 1}, "table"),
        ("trailing_newline\n", {"a": 1}, "table"),
        ("ok", [1, 2], "payload"),
        ("ok", "a string", "payload"),
        ("ok", None, "payload"),
        ("ok", {"": 1}, "payload"),
        ("ok", {"_reserved": 1}, "payload['_reserved']"),
        ("ok", {"_event_id": 1}, "payload['_event_id']"),
        ("ok", {"k" * 64: 1}, "payload"),
        ("ok", {1: "int key"}, "payload"),
        ("ok", {"a": float("nan")}, "payload"),
        ("ok", {"a": object()}, "payload"),
        ("ok", {"\ud800": 1}, "payload['\\ud800']"),
        ("ok", {"a": "\ud800"}, "payload['a']"),
        ("ok", {"a": ["\ud800"]}, "payload['a']"),
        ("t\ud800", {"a": 1}, "table"),
        ("pg_class", {"a": 1}, "table"),
        ("ok", {"xmin": 1}, "payload['xmin']"),
    ],
)
def test_bad_input_is_a_send_error_naming_the_field(
    make_sql_runtime: Callable[..., Runtime], table_name: Any, payload: Any, field: str
) -> None:
    rt = make_sql_runtime()
    caught: list[SendError] = []

    @rt.workflow("bad")
    def bad(event: Any, ctx: Any) -> None:
        try:
            ctx.send.sql(table=table_name, payload=payload)
        except SendError as error:
            caught.append(error)

    rt.run("bad", {}, timeout=10)
    [error] = caught
    assert error.field.startswith(field), error
    assert str(error).startswith("ctx.send.sql(): ")


def test_upper_case_table_names_are_folded_and_63_bytes_are_allowed(
    make_sql_runtime: Callable[..., Runtime], db: Db
) -> None:
    rt = make_sql_runtime()
    name = ("Up_" + new_id() + "_" * 63)[:63].upper()
    load(rt, name, [{"a": 1}])
    assert db.count(name.lower()) == 1


def test_a_batch_loaded_again_inserts_no_duplicates(postgres_url: str, db: Db, table: str) -> None:
    """What a retry after an ambiguous failure (committed, but no answer) does."""
    ids = [new_id() for _ in range(10)]
    rows = RowColumns.of(ids, [time.time()] * 10, [("n",)] * 10, [(i,) for i in range(10)])
    first_six = RowColumns.of(ids[:6], [time.time()] * 6, [("n",)] * 6, [(i,) for i in range(6)])

    async def main() -> list[tuple[int, dict[str, str]]]:
        store = PostgresStore(postgres_url)
        try:
            return [
                await store.write(table, first_six, direct=True),
                await store.write(table, rows, direct=True),  # 6 already there: falls back
                await store.write(table, rows, direct=False),
            ]
        finally:
            await store.close()

    assert asyncio.run(main()) == [(6, {}), (4, {}), (0, {})]
    assert db.count(table) == 10
    assert sorted(r["n"] for r in db.rows(table)) == [float(i) for i in range(10)]


def test_a_row_sent_without_ctx_send_sql_fails_alone(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()

    @rt.workflow("sneaky")
    def sneaky(event: Any, ctx: Any) -> None:
        ctx.send.to("sql", {"table": table, "a": 1})
        ctx.send.sql(table=table, payload={"a": 2})

    result = rt.run("sneaky", {}, timeout=10)
    assert rt.flush(timeout=10)
    foreign, proper = rt.deliveries(result.run_id)
    assert foreign.status == "failed" and "ctx.send.sql" in (foreign.error or "")
    assert proper.status == "delivered"
    assert [r["a"] for r in db.rows(table)] == [2.0]


def test_a_restarted_sql_actor_closes_the_crashed_ones_connections_and_loses_no_batch(
    make_sql_runtime: Callable[..., Runtime],
    db: Db,
    table: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pools are not carried over a crash: the next incarnation loads the open batch
    on connections of its own, and the crashed one's connections are closed."""
    from outbound.destinations.sql.actor import SqlDestination

    poison = f"{table}_crash"
    batch_keys = SqlDestination.batch_keys

    def crash_on_poison(self: SqlDestination, sends: list[Any]) -> list[Any]:
        keys = batch_keys(self, sends)
        if poison in keys:
            raise RuntimeError("injected crash")
        return keys

    monkeypatch.setattr(SqlDestination, "batch_keys", crash_on_poison)
    backends = "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
    before = {row["pid"] for row in db.fetch(backends)}
    rt = make_sql_runtime(batch_max_age=60)
    load(rt, table, [{"n": 1}])
    crashed_ones = {row["pid"] for row in db.fetch(backends)} - before
    assert crashed_ones  # the first incarnation's pool

    load(rt, table, [{"n": 2}, {"n": 3}], flush=False)  # open when the actor crashes
    crash = load(rt, poison, [{"n": 0}], flush=False)
    load(rt, table, [{"n": 4}])

    assert [row["n"] for row in db.rows(table)] == [1, 2, 3, 4]
    [crashed] = rt.deliveries(crash)
    assert crashed.status == "failed" and "injected crash" in crashed.error
    deadline = time.monotonic() + 10
    while crashed_ones & {row["pid"] for row in db.fetch(backends)}:
        assert time.monotonic() < deadline, "the crashed incarnation's connections stay open"
        time.sleep(0.05)
