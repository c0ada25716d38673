"""`Runtime.sql_query()`: its argument checks and the question to the SQL destination's actor.

Owns refusing a query that cannot run (SQL not configured, empty text, a
timeout that is not positive, a runtime that is not running) before anything
reaches Postgres, and waiting for the answer. How the query runs (its own
read-only role and connections, the result's size cap) is
`outbound.destinations.sql`'s. Takes what it needs as arguments; must not
import the runtime facade.
"""

from __future__ import annotations

from typing import Any

import pykka


def sql_query(
    database_url: str | None,
    sql_actor: pykka.ActorRef[Any] | None,
    state: str,
    sql: str,
    timeout: float,
) -> dict[str, Any]:
    """Ask the SQL destination's actor (None when not started) to run `sql`; see `Runtime`."""
    from outbound.destinations.sql.actor import SqlQuery

    if not database_url:
        raise RuntimeError("SQL is not configured: set OUTBOUND_DATABASE_URL to a Postgres URL")
    if not isinstance(sql, str) or not sql.strip():
        raise ValueError("sql must be a non-empty string")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
    if sql_actor is None or state != "running":
        raise RuntimeError(f"the runtime is {state}: start it before querying")
    future = sql_actor.ask(SqlQuery(sql, timeout), timeout=30)
    return future.result(timeout + 30)  # type: ignore[no-any-return]
