"""The SQL destination actor: JSON objects batched per table and loaded into Postgres.

Owns `SqlDestination` (a `BatchingDestination` keyed by table), the messages
it takes besides deliveries (`SqlQuery`, the retention tick) and the SQL form
of dead-letter lines. Payloads arrive as `SqlRow`s from `ctx.send.sql` (`send.py`); each
batch is turned column-wise and typed once (`RowColumns`), on the actor
thread, then written by `PostgresStore` on the asyncio loop thread (asyncpg never runs
inside trio). Queries are answered by `SqlReader` (`sql_query`) on connections of
their own, as a role that can only read. The store (its pool and cached
schemas) and the reader are resources, not work: each incarnation makes its
own, and closes them when it stops or crashes; the batches and the retention
sweep in progress are its durable work (`SqlWork`).
Must not import the runtime or another destination.
"""

from __future__ import annotations

import concurrent.futures
import logging
import operator
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import pykka

from outbound.actors import LoopResult
from outbound.actors.loops import LoopThread
from outbound.destinations.base import DurableWork, Services
from outbound.destinations.batching import (
    Batch,
    BatchingDestination,
    BatchLimits,
    BatchWork,
    BatchWritten,
)
from outbound.destinations.delivery import Send
from outbound.destinations.sql.columns import RowColumns
from outbound.destinations.sql.query import SqlQueryError, SqlReader
from outbound.destinations.sql.rows import row_as_json
from outbound.destinations.sql.send import SqlRow
from outbound.destinations.sql.settings import SqlSettings
from outbound.destinations.sql.store import PostgresStore

__all__ = ["SqlDestination", "SqlQuery", "SqlQueryError"]

logger = logging.getLogger(__name__)

_RETENTION = "sql-retention"  # the loop-result tag of a retention sweep (batch tags are ints)


@dataclass(frozen=True, slots=True)
class SqlQuery:
    """Run a read-only query as the reader role; the reply is a `concurrent.futures.Future`
    of the result."""

    sql: str
    timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class _RetentionTick:
    pass


# Getters in C, for map() over a batch of `SqlRow` payloads.
row_table = operator.attrgetter("table")
row_keys = operator.attrgetter("keys")
row_values = operator.attrgetter("values")


def prepare_rows(sends: list[Send]) -> RowColumns:
    """A batch's rows column by column, typed; rows Postgres would refuse set aside."""
    payloads = list(map(_payload_of, sends))
    return RowColumns.of(
        list(map(_id_of, sends)),
        list(map(_accepted_at_of, sends)),
        list(map(row_keys, payloads)),
        list(map(row_values, payloads)),
    )


_payload_of = operator.attrgetter("payload")
_id_of = operator.attrgetter("id")
_accepted_at_of = operator.attrgetter("accepted_at")


@dataclass
class SqlWork(BatchWork):
    """The SQL actor's durable work: its batches, and whether a retention sweep is running."""

    sweeping: bool = False


class SqlDestination(BatchingDestination):
    """Batches rows per table and loads them with COPY; answers read-only queries."""

    name = "sql"
    Work: ClassVar[type[DurableWork]] = SqlWork
    work: SqlWork

    def __init__(self, services: Services, limits: BatchLimits | None = None) -> None:
        super().__init__(services, limits)
        config = services.config
        if not config.database_url:
            raise ValueError("the SQL destination needs OUTBOUND_DATABASE_URL (a Postgres URL)")
        # Each opens its pool at its first use, not here.
        self.store = PostgresStore(config.database_url, pool_size=config.sql_pool_size)
        self.reader = SqlReader(self.store, config.sql_pool_size, config.sql_max_result_bytes)
        self._retention_timer: Any = None

    # -- batching ----------------------------------------------------------------------

    def deliver(self, sends: list[Send]) -> None:
        if set(map(type, map(_payload_of, sends))) != {SqlRow}:
            kept = []
            for send in sends:
                if type(send.payload) is SqlRow:
                    kept.append(send)
                else:  # `ctx.send.to("sql", ...)` skips the checks of `ctx.send.sql`
                    self.failed(send, "send SQL rows with ctx.send.sql(table=..., payload={...})")
            sends = kept
        super().deliver(sends)

    def batch_key(self, send: Send) -> Hashable:
        return row_table(send.payload)

    def batch_keys(self, sends: list[Send]) -> list[Hashable]:
        return list(map(row_table, map(_payload_of, sends)))

    @property
    def loop(self) -> LoopThread:
        return self.services.asyncio

    def write_batch(self, batch: Batch) -> Callable[[], Awaitable[BatchWritten]]:
        if batch.prepared is None:
            batch.prepared = prepare_rows(batch.sends)
        prepared: RowColumns = batch.prepared
        store, table = self.store, str(batch.key)

        direct = batch.attempts == 1  # no earlier attempt can have loaded these rows

        async def write() -> BatchWritten:
            inserted, failed = await store.write(table, prepared, direct)
            failed.update(prepared.refused)
            return BatchWritten({"table": table}, failed)

        return write

    @staticmethod
    def dead_letter_fields(send: Send) -> dict[str, Any]:
        """The table and the row as a JSON object (replayable with `ctx.send.sql`)."""
        row: SqlRow = send.payload
        return {
            "table": row.table,
            "event_id": send.id,
            "payload": row_as_json(row.keys, row.values),
        }

    # -- lifecycle -----------------------------------------------------------------------

    def recover(self) -> None:
        super().recover()
        config = self.config
        if config.sql_retention_days > 0:
            self._retention_timer = self.services.timers.every(
                config.sql_retention_interval, self.stable_ref, _RetentionTick()
            )

    def on_stop(self) -> None:
        self._cancel_retention()
        super().on_stop()
        for pool_owner in (self.reader, self.store):
            try:
                self.loop.call(pool_owner.close, timeout=10)
            except Exception as error:  # the loop is gone or the server is down
                logger.debug("closing a SQL pool: %s", error)

    def on_crash(self, error: BaseException | None) -> None:
        self._cancel_retention()
        # The next incarnation opens pools of its own. These close on the loop once
        # the loads and queries already on them are done (or after 5 s), without
        # holding up the restart.
        for pool_owner in (self.reader, self.store):
            try:
                self.loop.spawn(pool_owner.close)
            except RuntimeError as gone:  # the loop is gone: so are its connections
                logger.debug("closing a SQL pool: %s", gone)
        super().on_crash(error)

    def _cancel_retention(self) -> None:
        if self._retention_timer is not None:
            self._retention_timer.cancel()
            self._retention_timer = None

    # -- other messages ----------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        if isinstance(message, SqlQuery):
            return self._query(message)
        if isinstance(message, _RetentionTick):
            if not self.work.sweeping:
                self.work.sweeping = True
                days = self.config.sql_retention_days
                self.loop.spawn(
                    self.store.delete_expired, days, reply_to=self.stable_ref, tag=_RETENTION
                )
            return None
        return super().handle(message)

    def _query(self, message: SqlQuery) -> concurrent.futures.Future[dict[str, Any]]:
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def settle(result: LoopResult) -> None:
            if result.error is not None:
                future.set_exception(result.error)
            else:
                future.set_result(result.value)

        self.loop.spawn(self.reader.query, message.sql, message.timeout, reply_to=settle)
        return future

    def on_loop_result(self, result: LoopResult) -> None:
        if result.tag != _RETENTION:
            batch = self.sealed.get(result.tag)
            if batch is not None and result.error is not None:
                # Parsed rows take several times the JSON's memory, and the budget
                # counts only the JSON: while Postgres is down, keep just the bytes.
                batch.prepared = None
            return super().on_loop_result(result)
        self.work.sweeping = False
        if result.error is not None:
            logger.warning("SQL retention sweep failed (will try again): %s", result.error)
            return None
        deleted: dict[str, int] = result.value
        total = sum(deleted.values())
        if total:
            self.services.ledger.count(self.name, "rows_expired", total)
            logger.info("SQL retention deleted %d rows: %s", total, deleted)
        return None


def starter(config: SqlSettings, **parts: Any) -> Callable[[Services], pykka.ActorRef[Any]]:
    """What starts the SQL actor with the services of a runtime start (it needs no parts)."""
    return SqlDestination.start
