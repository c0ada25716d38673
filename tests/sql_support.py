"""Test helpers for the SQL destination: the tests' own view of Postgres, and loading rows.

`Db` reads and writes with a plain asyncpg connection of its own (one short
connection per call), never through the code under test. `load` sends rows
from one run of the `load` workflow that the `make_sql_runtime` fixture
(tests/conftest.py) registers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import asyncpg

from outbound import Runtime


class Db:
    """The test's own view of Postgres: one short connection per call."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _run(self, action: Callable[[asyncpg.Connection], Any]) -> Any:
        async def main() -> Any:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.set_type_codec(
                    "jsonb", schema="pg_catalog", encoder=json.dumps, decoder=json.loads
                )
                return await action(conn)
            finally:
                await conn.close()

        return asyncio.run(main())

    def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in self._run(lambda conn: conn.fetch(sql, *args))]

    def value(self, sql: str, *args: Any) -> Any:
        return self._run(lambda conn: conn.fetchval(sql, *args))

    def execute(self, sql: str, *args: Any) -> str:
        return self._run(lambda conn: conn.execute(sql, *args))

    def columns(self, table: str) -> dict[str, str]:
        rows = self.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
            table,
        )
        return {row["column_name"]: row["data_type"] for row in rows}

    def rows(self, table: str, order: str = "_received_at, _event_id") -> list[dict[str, Any]]:
        return self.fetch(f'SELECT * FROM "{table}" ORDER BY {order}')

    def count(self, table: str) -> int:
        return int(self.value(f'SELECT count(*) FROM "{table}"'))


def load(rt: Runtime, table: str, rows: list[dict[str, Any]], flush: bool = True) -> str:
    """Send `rows` to `table` from one run; with `flush`, wait until they are final."""
    result = rt.run("load", {"table": table, "rows": rows}, timeout=10)
    assert result.status == "succeeded", result.error
    if flush:
        assert rt.flush(timeout=20)
    return result.run_id
