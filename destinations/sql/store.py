"""The Postgres side of the SQL destination: the loader's pool, loads, retention.

Owns `PostgresStore`, whose coroutines run on the runtime's asyncio loop
thread (asyncpg is asyncio-only) and nowhere else: the connection pool is
opened lazily there, the cached table schemas are only touched there. A load
is one transaction: an advisory lock on the table when its schema must change
(so two runtimes can load one table at once), the DDL, a binary COPY into a
temporary table, and `INSERT ... SELECT ... ON CONFLICT (_event_id) DO
NOTHING`, so a batch retried after an ambiguous failure adds no duplicates.
A batch's first attempt, whose rows cannot be in the table yet, COPYs straight
into the table (rows written once, not twice); a duplicate id or any doubt
rolls that back and takes the path above. A row that Postgres refuses fails
alone: the batch is split until the bad rows are found (`_row_level` says
which errors are the rows'); a table Postgres refuses fails its batch for
good. Must not touch actor state; the typing rules live in `schema.py`.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import logging
from typing import Any

import asyncpg

from outbound.destinations.batching import PermanentBatchError
from outbound.destinations.delivery import describe_error
from outbound.destinations.json_encoding import json_encoder
from outbound.destinations.sql.columns import PG_EPOCH, PG_EPOCH_UTC, RowColumns
from outbound.destinations.sql.schema import (
    EVENT_ID,
    RECEIVED_AT,
    RowError,
    change_ddl,
    column_type,
    plan_change,
    quote_ident,
)

logger = logging.getLogger(__name__)

LOAD_TABLE = "_outbound_load"  # the per-transaction temporary table COPY writes into
ACQUIRE_TIMEOUT = 30.0
COMMAND_TIMEOUT = 120.0

#: A load that fails with these saw a stale cached schema: re-read it and try once more.
STALE_SCHEMA = (
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedColumnError,
    asyncpg.DatatypeMismatchError,
    asyncpg.InvalidCachedStatementError,
)


class SqlQueryError(Exception):
    """A read-only query failed (raised by the query side, `sql_query`); the message is
    Postgres's own when Postgres refused it."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class PostgresStore:
    """Postgres access for one runtime. Every coroutine must run on one asyncio loop."""

    def __init__(self, url: str, pool_size: int = 4) -> None:
        self.url = url
        self.pool_size = pool_size
        self.schemas: dict[str, dict[str, str]] = {}  # table -> column -> type, as last known
        self._pool: asyncpg.Pool | None = None
        self._opening: asyncio.Lock | None = None

    # -- the pool -------------------------------------------------------------------

    async def pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.url,
                    min_size=0,
                    max_size=self.pool_size,
                    # No statement cache: COPY and prepared statements would keep
                    # column types from before an ALTER COLUMN ... TYPE and fail.
                    statement_cache_size=0,
                    command_timeout=COMMAND_TIMEOUT,
                    init=_init_connection,
                )
        return self._pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        await close_pool(pool)

    # -- loading -----------------------------------------------------------------------

    async def write(
        self, table: str, batch: RowColumns, direct: bool = False
    ) -> tuple[int, dict[str, str]]:
        """Load `batch` into `table`: (rows inserted, event id -> error of rows refused).

        With `direct` (a batch's first attempt, whose rows cannot be in the
        table yet), COPY goes straight into the table; any doubt (a duplicate
        id, a refused value, a stale schema) falls back to the load through a
        temporary table.
        """
        if direct and len(batch):
            try:
                return await self._load(table, batch, direct=True), {}
            except Exception as error:
                if not (_row_level(error) or isinstance(error, STALE_SCHEMA)):
                    raise
                self.schemas.pop(table, None)
                logger.debug("table %s: direct COPY refused (%s); loading through a temp table",
                             table, error)  # fmt: skip
        failed: dict[str, str] = {}
        inserted = await self._load_or_split(table, batch, failed, first_refusal=True)
        return inserted, failed

    async def _load_or_split(
        self, table: str, batch: RowColumns, failed: dict[str, str], first_refusal: bool = False
    ) -> int:
        """Load `batch`; if Postgres refuses rows of it, load each half, down to single
        rows, which fail alone (their errors in `failed`)."""
        if not len(batch):
            return 0
        try:
            return await self._load(table, batch)
        except Exception as error:
            if not _row_level(error):
                raise
            if len(batch) == 1:
                failed[batch.ids[0]] = describe_error(error)
                return 0
            if first_refusal:
                await self._check_table_takes_rows(table)
            logger.info("table %s: a row was refused (%s); splitting the batch", table, error)
        first, second = batch.halves()
        inserted = await self._load_or_split(table, first, failed)
        return inserted + await self._load_or_split(table, second, failed)

    async def _check_table_takes_rows(self, table: str) -> None:
        """Raise `PermanentBatchError` when Postgres refuses the table itself (its name
        collides with an index or a type, ...): then no row can load, and splitting a
        batch down to single rows would only cost a transaction per row."""
        try:
            await self._load(table, RowColumns.empty())
        except Exception as error:
            if _row_level(error):
                raise PermanentBatchError(
                    f"table {table!r}: Postgres refuses it ({describe_error(error)})"
                ) from None
            raise

    async def _load(self, table: str, batch: RowColumns, direct: bool = False) -> int:
        """One transaction: schema changes, then COPY (via a temp table unless `direct`)."""
        pool = await self.pool()
        types = batch.types
        for fresh in (False, True):
            cached = not fresh and table in self.schemas
            try:
                async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
                    columns = await self._ensure_columns(conn, table, types, fresh)
                    if direct:
                        inserted = await _copy(conn, table, columns, batch)
                    else:
                        inserted = await _copy_and_insert(conn, table, columns, batch)
            except Exception as error:
                # A refusal may come from a cached schema that another runtime has
                # changed since (a column widened): read it again and try once more.
                if not (isinstance(error, STALE_SCHEMA) or (cached and _row_level(error))):
                    raise
                self.schemas.pop(table, None)
                if fresh or direct:
                    raise
                continue
            self.schemas[table] = columns
            return inserted
        raise AssertionError("unreachable")

    async def _ensure_columns(
        self,
        conn: asyncpg.Connection,
        table: str,
        types: dict[str, str | None],
        fresh: bool,
    ) -> dict[str, str]:
        """The table's columns once it can take `types` (changed in this transaction)."""
        known = None if fresh else self.schemas.get(table)
        if known is not None and not plan_change(known, types):
            return known
        # Serialise schema changes to this table across runtimes; the lock ends with
        # the transaction, and what we read after taking it is current.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '.' || $1, 0))",
            table,
        )
        columns = await read_columns(conn, table)
        if columns is not None and (columns.get(EVENT_ID) != "uuid" or RECEIVED_AT not in columns):
            raise PermanentBatchError(
                f"table {table!r} exists but was not made by outbound: it has no "
                f"{EVENT_ID} uuid and {RECEIVED_AT} columns; choose another table name"
            )
        change = plan_change(columns, types)
        for statement in change_ddl(table, change):
            await conn.execute(statement)
        if change:
            logger.info("table %s: schema change %s", table, change)
        return change.apply(columns or {})

    # -- retention -------------------------------------------------------------------------

    async def delete_expired(self, days: float) -> dict[str, int]:
        """Delete rows received more than `days` ago from every table shaped like ours."""
        pool = await self.pool()
        deleted: dict[str, int] = {}
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            tables = await conn.fetch(
                """SELECT r.table_name FROM information_schema.columns r
                   JOIN information_schema.columns e
                     ON e.table_schema = r.table_schema AND e.table_name = r.table_name
                   JOIN information_schema.tables t
                     ON t.table_schema = r.table_schema AND t.table_name = r.table_name
                  WHERE r.table_schema = current_schema() AND t.table_type = 'BASE TABLE'
                    AND r.column_name = $1 AND r.data_type = 'timestamp with time zone'
                    AND e.column_name = $2 AND e.data_type = 'uuid'""",
                RECEIVED_AT,
                EVENT_ID,
            )
            for (table,) in tables:
                status = await conn.execute(
                    f"DELETE FROM {quote_ident(table)} "
                    f"WHERE {quote_ident(RECEIVED_AT)} < now() - make_interval(secs => $1)",
                    days * 86400.0,
                )
                count = int(status.rsplit(" ", 1)[-1])
                if count:
                    deleted[table] = count
        return deleted


async def close_pool(pool: asyncpg.Pool | None) -> None:
    """Close `pool` (None: nothing to close), waiting at most 5 s for its connections
    to finish; past that, or if closing fails, terminate them."""
    if pool is None:
        return
    try:
        await asyncio.wait_for(pool.close(), 5)
    except (TimeoutError, asyncpg.PostgresError, OSError):
        pool.terminate()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb through binary COPY needs a binary codec: a version byte, then the JSON text.
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        format="binary",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
    )
    await conn.set_type_codec("json", schema="pg_catalog", encoder=json.dumps, decoder=json.loads)
    # Timestamps are written as RowColumns prepares them, (microseconds since
    # 2000-01-01,): `tuple` hands such a tuple over as it is. Read back as datetimes.
    for type_name, epoch in (("timestamp", PG_EPOCH), ("timestamptz", PG_EPOCH_UTC)):
        await conn.set_type_codec(
            type_name,
            schema="pg_catalog",
            format="tuple",
            encoder=tuple,
            decoder=functools.partial(_timestamp_from_micros, epoch),
        )


_INFINITY = {2**63 - 1: "infinity", -(2**63): "-infinity"}


def _timestamp_from_micros(epoch: datetime.datetime, value: tuple[int]) -> Any:
    (micros,) = value
    infinite = _INFINITY.get(micros)
    if infinite is not None:
        return infinite
    return epoch + datetime.timedelta(microseconds=micros)


_compact_json = json_encoder(compact=True)


def _encode_jsonb(value: Any) -> bytes:
    if type(value) is bytes:  # encoded once, when the row was sent
        return b"\x01" + value
    return b"\x01" + _compact_json(value).encode("utf-8")


def _decode_jsonb(data: bytes) -> Any:
    return json.loads(data[1:])


async def read_columns(conn: asyncpg.Connection, table: str) -> dict[str, str] | None:
    """Column -> type of `table` in the current schema, from information_schema; None if absent."""
    records = await conn.fetch(
        """SELECT column_name, data_type FROM information_schema.columns
            WHERE table_schema = current_schema() AND table_name = $1
            ORDER BY ordinal_position""",
        table,
    )
    if not records:
        return None
    return {name: column_type(data_type) for name, data_type in records}


def _field_names(batch: RowColumns) -> list[str]:
    """The fields COPY writes: those seen only as null are left out (their columns default
    to NULL)."""
    return [name for name, kind in batch.types.items() if kind is not None]


async def _copy(
    conn: asyncpg.Connection, table: str, columns: dict[str, str], batch: RowColumns
) -> int:
    names = _field_names(batch)
    await conn.copy_records_to_table(
        table, records=batch.records(names, columns), columns=[EVENT_ID, RECEIVED_AT, *names]
    )
    return len(batch)


async def _copy_and_insert(
    conn: asyncpg.Connection, table: str, columns: dict[str, str], batch: RowColumns
) -> int:
    names = _field_names(batch)
    all_names = [EVENT_ID, RECEIVED_AT, *names]
    definitions = ", ".join(
        f"{quote_ident(name)} {kind}"
        for name, kind in zip(
            all_names, ["uuid", "timestamptz", *(columns[name] for name in names)], strict=True
        )
    )
    await conn.execute(f"CREATE TEMP TABLE {LOAD_TABLE} ({definitions}) ON COMMIT DROP")
    await conn.copy_records_to_table(
        LOAD_TABLE, records=batch.records(names, columns), columns=all_names
    )
    quoted = ", ".join(quote_ident(name) for name in all_names)
    status = await conn.execute(
        f"INSERT INTO {quote_ident(table)} ({quoted}) SELECT {quoted} FROM {LOAD_TABLE} "
        f"ON CONFLICT ({quote_ident(EVENT_ID)}) DO NOTHING"
    )
    return int(status.rsplit(" ", 1)[-1])


#: SQLSTATE classes of errors tied to some rows of a batch, by their values or by
#: their keys' names: data exceptions (22), integrity violations (23), names and
#: definitions (42: a duplicate or reserved column name, a name too long, a
#: collision with another object), program limits (54: too many columns, a row
#: too big) and unsupported changes (0A: widening a column a view depends on).
#: Such a batch is split until the rows at fault fail alone. Every other class
#: (connection, resources, shutdown, deadlock, a read-only server...) is about
#: the server, not the rows: the whole batch is retried.
_ROW_CLASSES = frozenset({"0A", "22", "23", "42", "54"})
#: ...but a missing privilege is the configuration's, which a GRANT fixes: retried.
_NOT_ROW_STATES = frozenset({"42501"})


def _row_level(error: BaseException) -> bool:
    """Is this a refusal of some rows (split the batch) rather than of the load (retry)?"""
    if isinstance(error, asyncpg.PostgresError):
        state = getattr(error, "sqlstate", "") or ""
        return state[:2] in _ROW_CLASSES and state not in _NOT_ROW_STATES
    if isinstance(error, asyncpg.InterfaceError):
        return isinstance(error, asyncpg.exceptions._base.DataError)
    return isinstance(error, RowError | OverflowError | TypeError | ValueError)
