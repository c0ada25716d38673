"""The SQL destination's settings (`OUTBOUND_DATABASE_URL`, `OUTBOUND_SQL_*`).

Owns these fields only; the runtime's `Config` composes them and reads the
environment. Batching limits are the core's (`destinations/settings.py`).
Must not import the runtime or another destination.
"""

from __future__ import annotations

from dataclasses import dataclass

from outbound.destinations.settings import MiB, Settings, setting

#: What a send to SQL says when SQL is not enabled.
HOW_TO_ENABLE = (
    "set OUTBOUND_DATABASE_URL (postgresql://user:password@host:5432/dbname) to enable SQL"
)


@dataclass(frozen=True)
class SqlSettings(Settings):
    """Where the SQL destination loads rows: enabled when `database_url` is set."""

    database_url: str | None = setting(
        "OUTBOUND_DATABASE_URL", None, "Postgres URL for the SQL destination"
    )
    sql_retention_days: float = setting(
        "OUTBOUND_SQL_RETENTION_DAYS", 30.0, "days SQL rows are kept (0 keeps forever)"
    )
    sql_retention_interval: float = setting(
        "OUTBOUND_SQL_RETENTION_INTERVAL",
        3600.0,
        "seconds between SQL retention sweeps",
        rule="positive",
    )
    sql_pool_size: int = setting(
        "OUTBOUND_SQL_POOL_SIZE",
        4,
        "Postgres connections the SQL destination may open for loads (and as many for queries)",
        rule="at least 1",
    )
    sql_max_result_bytes: int = setting(
        "OUTBOUND_SQL_MAX_RESULT_BYTES",
        32 * MiB,
        "JSON bytes of rows one sql_query / POST /sql returns; past it the result is truncated",
        rule="at least 1",
    )


def is_enabled(settings: SqlSettings) -> bool:
    """Whether the runtime starts this destination."""
    return bool(settings.database_url)
