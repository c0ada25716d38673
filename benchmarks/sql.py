"""`sql`: events per second into Postgres: `ctx.send.sql` vs a raw COPY and per-event INSERTs.

All three load the same ~8-field payloads (text, numbers, a boolean, a date,
a timestamp, a jsonb array) into tables of the same shape (`_event_id uuid
primary key`, `_received_at`, the fields) on the same Postgres: the embedded
one (with Postgres's default durability: fsync on), or
`OUTBOUND_DATABASE_URL` when set. Ours is timed from the first run submitted
until `rt.flush()` reports every row committed, with schema inference and
default batch settings. Baseline (a), the limit: the payload dicts turned into
records for a schema known in advance, loaded with one `copy_records_to_table`
call and committed. Baseline (b): one `INSERT` per event with asyncpg (what a
workflow would do inline), on a sample of events, as events per second. Each
is measured in 3 interleaved rounds and the medians compared.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from tempfile import TemporaryDirectory
from typing import Any

import asyncpg

from outbound import Config, Runtime
from outbound.actors.ids import new_id
from outbound.benchmarks.common import Stopwatch, rate
from outbound.benchmarks.report import Report
from outbound.embedded import EmbeddedPostgres

COLUMNS = {
    "id": "double precision",
    "type": "text",
    "customer": "text",
    "amount": "double precision",
    "paid": "boolean",
    "day": "date",
    "at": "timestamp",
    "items": "jsonb",
}


def payload(n: int) -> dict[str, Any]:
    """Eight fields of mixed types, about 230 bytes of JSON."""
    return {
        "id": n,
        "type": "order.created",
        "customer": f"customer-{n % 977:04d}",
        "amount": round(n * 0.37 % 1000, 2),
        "paid": n % 3 == 0,
        "day": f"2024-{n % 12 + 1:02d}-{n % 28 + 1:02d}",
        "at": f"2024-05-25 16:{n % 60:02d}:{n % 59:02d}.{n % 1000:03d}",
        "items": [{"sku": f"SKU-{n % 89:03d}", "qty": n % 7 + 1}],
    }


def typed_values(p: dict[str, Any]) -> tuple[Any, ...]:
    """A payload's values in COLUMNS order, as the driver takes them for a known schema."""
    return (
        p["id"],
        p["type"],
        p["customer"],
        p["amount"],
        p["paid"],
        datetime.date.fromisoformat(p["day"]),
        datetime.datetime.fromisoformat(p["at"]),
        p["items"],
    )


@contextmanager
def postgres() -> Iterator[str]:
    url = os.environ.get("OUTBOUND_DATABASE_URL")
    if url:
        yield url
        return
    with EmbeddedPostgres(durable=True) as server:
        yield server.url


def new_table(prefix: str) -> str:
    return f"bench_{prefix}_{new_id()[:12]}"


def measure_ours(url: str, events: int, per_run: int, data_dir: Path, **settings: Any) -> float:
    """Events per second through `ctx.send.sql` until every row is committed.

    `settings`: more `Config` fields (the `durable` scenario sets the journal).
    """
    table = new_table("ours")
    rt = Runtime(Config(data_dir=data_dir, database_url=url, gc_tuning=True, **settings))
    events_by_run = [
        [payload(n) for n in range(start, start + per_run)] for start in range(0, events, per_run)
    ]

    @rt.workflow("p_sql")
    def to_sql(batch: list[dict[str, Any]], ctx: Any) -> None:
        for event in batch:
            ctx.send.sql(table=table, payload=event)

    @rt.workflow("p_warm_up")
    def warm_up(event: Any, ctx: Any) -> None:
        ctx.send.sql(table=new_table("warm"), payload=payload(0))

    with rt:
        # A running service has its connections open, as the baselines have theirs:
        # open the pool with a load into another table (ours still infers and
        # creates the measured table inside the timing).
        warm_ups = rt.config.sql_pool_size
        for _ in range(warm_ups):
            rt.submit("p_warm_up")
        assert rt.flush(60), "the warm-up load did not finish"
        gc.collect()
        with Stopwatch() as watch:
            for batch in events_by_run:
                rt.submit("p_sql", batch)
            assert rt.flush(600), "loads did not finish"
        stats = rt.stats()["destinations"]["sql"]
        assert stats["delivered"] == events + warm_ups and stats["failed"] == 0, stats
        [[count]] = rt.sql_query(f"SELECT count(*) FROM {table}")["rows"]
        assert count == events, count
    return rate(events, watch.seconds)


async def _connect(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(url)
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        format="binary",
        encoder=lambda value: b"\x01" + json.dumps(value).encode(),
        decoder=lambda data: json.loads(data[1:]),
    )
    return conn


async def _create_table(conn: asyncpg.Connection, table: str) -> None:
    fields = ", ".join(f'"{name}" {kind}' for name, kind in COLUMNS.items())
    await conn.execute(
        f"CREATE TABLE {table} (_event_id uuid PRIMARY KEY, _received_at timestamptz NOT NULL, "
        f"{fields})"
    )


def measure_raw_copy(url: str, events: int) -> float:
    """Events per second: dicts -> records -> one `copy_records_to_table` -> commit."""
    table = new_table("copy")
    payloads = [payload(n) for n in range(events)]
    names = ["_event_id", "_received_at", *COLUMNS]

    async def main() -> float:
        conn = await _connect(url)
        try:
            await _create_table(conn, table)
            gc.collect()
            with Stopwatch() as watch:
                now = datetime.datetime.now(datetime.UTC)
                records = [(new_id(), now, *typed_values(p)) for p in payloads]
                async with conn.transaction():
                    await conn.copy_records_to_table(table, records=records, columns=names)
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == events
            return watch.seconds
        finally:
            await conn.close()

    return rate(events, asyncio.run(main()))


def measure_insert_per_event(url: str, events: int) -> float:
    """Events per second with one autocommitted `INSERT` per event (a sample of `events`)."""
    table = new_table("insert")
    payloads = [payload(n) for n in range(events)]
    placeholders = ", ".join(f"${i}" for i in range(1, len(COLUMNS) + 3))
    quoted = ", ".join(f'"{name}"' for name in ["_event_id", "_received_at", *COLUMNS])
    statement = f"INSERT INTO {table} ({quoted}) VALUES ({placeholders})"

    async def main() -> float:
        conn = await _connect(url)
        try:
            await _create_table(conn, table)
            gc.collect()
            with Stopwatch() as watch:
                for p in payloads:
                    await conn.execute(
                        statement, new_id(), datetime.datetime.now(datetime.UTC), *typed_values(p)
                    )
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == events
            return watch.seconds
        finally:
            await conn.close()

    return rate(events, asyncio.run(main()))


def run(quick: bool = False, events: int | None = None, rounds: int = 3) -> Report:
    events = events or (20_000 if quick else 100_000)
    insert_sample = 2_000 if quick else 10_000
    one_per_run = events // 4 if quick else events // 2
    raw_copy: list[float] = []
    per_event: list[float] = []
    ours_many: list[float] = []
    with postgres() as url, TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        measure_raw_copy(url, min(events, 5_000))  # warm up the server and the codecs
        # Interleaved rounds, the median of each: this machine's noise (and the
        # disk's, which the baselines wait on at every commit) hits all alike.
        for _ in range(rounds):
            raw_copy.append(measure_raw_copy(url, events))
            per_event.append(measure_insert_per_event(url, insert_sample))
            ours_many.append(measure_ours(url, events, per_run=1_000, data_dir=data_dir))
        ours_one = measure_ours(url, one_per_run, per_run=1, data_dir=data_dir)
    ours, copy, insert = median(ours_many), median(raw_copy), median(per_event)
    return Report(
        "sql",
        results={
            "ours (1,000 sends per run)": {"events": events, "events_per_s": ours},
            "ours (1 send per run)": {"events": one_per_run, "events_per_s": ours_one},
            "raw_copy_records_to_table": {"events": events, "events_per_s": copy},
            "insert_per_event": {"events": insert_sample, "events_per_s": insert},
        },
        ratios={
            "vs_raw_copy": ours / copy,
            "vs_insert_per_event": ours / insert,
            "vs_raw_copy_1_per_run": ours_one / copy,
        },
        targets={"vs_raw_copy": ">= 0.4", "vs_insert_per_event": ">= 20"},
        notes=[
            "8-field payloads (text, numbers, boolean, date, timestamp, jsonb), default batch "
            "settings (10,000 events per batch), Postgres 16 on 127.0.0.1, default durability "
            "(fsync on: every commit waits for the disk)",
            "raw COPY knows the schema in advance; ours infers it and creates the table",
            f"insert_per_event measured on {insert_sample:,} events, scaled to events/s",
            f"median of {rounds} interleaved rounds: ours {[round(r) for r in ours_many]}, "
            f"raw COPY {[round(r) for r in raw_copy]}, "
            f"INSERT per event {[round(r) for r in per_event]} events/s",
        ],
    )
