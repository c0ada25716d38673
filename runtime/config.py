"""Runtime configuration: one frozen `Config`, read from `OUTBOUND_*` variables.

Owns the names, defaults and parsing of every setting. `Config.from_env()`
reads the environment; `Config(...)` and `config.replace(...)` take keyword
overrides. A malformed variable fails at start-up naming the variable and what
it expects, never later at the first delivery.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


def _env_field(env: str, default: Any, doc: str) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc})


@dataclass(frozen=True)
class Config:
    """Every setting of a `Runtime`, with the environment variable that sets it."""

    data_dir: Path = _env_field(
        "OUTBOUND_DATA_DIR", Path(".outbound"), "where dead-letter files are written"
    )
    deliver_on_error: bool = _env_field(
        "OUTBOUND_DELIVER_ON_ERROR", True, "deliver the sends of a run that raised"
    )
    max_payload_bytes: int = _env_field(
        "OUTBOUND_MAX_PAYLOAD_BYTES", 1 * MiB, "largest encoded payload of one send"
    )
    run_history: int = _env_field(
        "OUTBOUND_RUN_HISTORY", 10_000, "finished runs kept for deliveries() and GET /runs"
    )
    delivery_history: int = _env_field(
        "OUTBOUND_DELIVERY_HISTORY",
        200_000,
        "delivery records kept with those runs; the oldest runs go first beyond it",
    )
    max_pending: int = _env_field(
        "OUTBOUND_MAX_PENDING",
        10_000,
        "runs and sends in flight (submitted, not yet delivered or failed) before "
        "submit() waits for room (backpressure)",
    )
    pool_workers: int = _env_field(
        "OUTBOUND_POOL_WORKERS", 8, "threads that run workflow-run actors"
    )
    gc_tuning: bool = _env_field(
        "OUTBOUND_GC_TUNING",
        False,
        "at the first start in a process, gc.freeze() existing objects and raise the GC's "
        "first threshold to 5000 (process-wide; outbound serve/demo and benchmarks do it)",
    )
    shutdown_timeout: float = _env_field(
        "OUTBOUND_SHUTDOWN_TIMEOUT", 30.0, "seconds stop() waits before dead-lettering"
    )
    health_retrying_after: float = _env_field(
        "OUTBOUND_HEALTH_RETRYING_AFTER",
        60.0,
        "seconds a batch may keep failing before rt.health() reports its destination retrying",
    )
    # Retries shared by every destination that retries.
    retry_base: float = _env_field(
        "OUTBOUND_RETRY_BASE", 0.5, "first backoff step in seconds (full jitter)"
    )
    retry_cap: float = _env_field("OUTBOUND_RETRY_CAP", 30.0, "longest backoff in seconds")
    # HTTP
    http_timeout: float = _env_field(
        "OUTBOUND_HTTP_TIMEOUT", 5.0, "seconds for a whole HTTP request, connect to last byte"
    )
    http_max_attempts: int = _env_field(
        "OUTBOUND_HTTP_MAX_ATTEMPTS", 5, "attempts per HTTP send, first included (1 = no retry)"
    )
    http_concurrency: int = _env_field(
        "OUTBOUND_HTTP_CONCURRENCY", 16, "HTTP requests in flight at once"
    )
    # S3
    s3_endpoint: str | None = _env_field(
        "OUTBOUND_S3_ENDPOINT", None, "S3/MinIO endpoint, host:port or URL"
    )
    s3_access_key: str | None = _env_field("OUTBOUND_S3_ACCESS_KEY", None, "S3 access key")
    s3_secret_key: str | None = _env_field("OUTBOUND_S3_SECRET_KEY", None, "S3 secret key")
    s3_region: str | None = _env_field("OUTBOUND_S3_REGION", None, "S3 region")
    s3_secure: bool = _env_field("OUTBOUND_S3_SECURE", False, "use HTTPS for S3")
    s3_create_buckets: bool = _env_field(
        "OUTBOUND_S3_CREATE_BUCKETS", False, "create missing buckets instead of failing"
    )
    # Batching (S3 and SQL)
    batch_max_age: float = _env_field(
        "OUTBOUND_BATCH_MAX_AGE", 60.0, "seconds from a batch's first event to its flush"
    )
    batch_max_events: int = _env_field(
        "OUTBOUND_BATCH_MAX_EVENTS", 10_000, "events that flush a batch"
    )
    batch_max_bytes: int = _env_field(
        "OUTBOUND_BATCH_MAX_BYTES", 8 * MiB, "encoded bytes that flush a batch"
    )
    batch_memory_cap: int = _env_field(
        "OUTBOUND_BATCH_MEMORY_CAP", 256 * MiB, "bytes buffered in all batches before sends wait"
    )
    # SQL
    database_url: str | None = _env_field(
        "OUTBOUND_DATABASE_URL", None, "Postgres URL for the SQL destination"
    )
    sql_retention_days: float = _env_field(
        "OUTBOUND_SQL_RETENTION_DAYS", 30.0, "days SQL rows are kept (0 keeps forever)"
    )
    sql_retention_interval: float = _env_field(
        "OUTBOUND_SQL_RETENTION_INTERVAL", 3600.0, "seconds between SQL retention sweeps"
    )
    sql_pool_size: int = _env_field(
        "OUTBOUND_SQL_POOL_SIZE",
        4,
        "Postgres connections the SQL destination may open for loads (and as many for queries)",
    )
    sql_max_result_bytes: int = _env_field(
        "OUTBOUND_SQL_MAX_RESULT_BYTES",
        32 * MiB,
        "JSON bytes of rows one sql_query / POST /sql returns; past it the result is truncated",
    )
    # Email
    smtp_url: str | None = _env_field(
        "OUTBOUND_SMTP_URL", None, "smtp://user:pass@host:port (smtps:// or ?starttls=1)"
    )
    email_from: str | None = _env_field("OUTBOUND_EMAIL_FROM", None, "sender address")
    email_to: str | None = _env_field("OUTBOUND_EMAIL_TO", None, "default recipient address")
    email_max_attempts: int = _env_field(
        "OUTBOUND_EMAIL_MAX_ATTEMPTS", 5, "attempts per email send, first included (1 = no retry)"
    )
    # SSE and the HTTP API
    sse_history: int = _env_field(
        "OUTBOUND_SSE_HISTORY", 100, "events replayed to a new SSE subscriber"
    )
    sse_keepalive: float = _env_field(
        "OUTBOUND_SSE_KEEPALIVE", 15.0, "seconds between SSE keepalive comments"
    )
    sse_queue: int = _env_field(
        "OUTBOUND_SSE_QUEUE", 1000, "events queued per SSE subscriber before it is disconnected"
    )
    api_token: str | None = _env_field(
        "OUTBOUND_API_TOKEN", None, "bearer token the HTTP API requires (unset: open)"
    )
    cors_origins: str = _env_field(
        "OUTBOUND_CORS_ORIGINS", "*", "comma-separated origins allowed to read SSE streams"
    )
    # Emit
    emit_max_depth: int = _env_field(
        "OUTBOUND_EMIT_MAX_DEPTH", 16, "longest chain of emits before it is stopped"
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        for name in (
            "max_payload_bytes",
            "run_history",
            "delivery_history",
            "max_pending",
            "pool_workers",
            "http_max_attempts",
            "http_concurrency",
            "email_max_attempts",
            "emit_max_depth",
            "batch_max_events",
            "batch_max_bytes",
            "batch_memory_cap",
            "sse_history",
            "sse_queue",
            "sql_pool_size",
            "sql_max_result_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"Config.{name} must be at least 1, got {getattr(self, name)!r}")
        for name in (
            "http_timeout",
            "batch_max_age",
            "retry_cap",
            "sse_keepalive",
            "sql_retention_interval",
            "health_retrying_after",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"Config.{name} must be positive, got {getattr(self, name)!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Read every `OUTBOUND_*` variable that is set; keyword overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.metadata["env"], raw, _kind(f))
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for every setting, for docs and `--help`."""
        return [
            (f.metadata["env"], repr(f.default), f.metadata["doc"]) for f in dataclasses.fields(cls)
        ]


def _kind(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    annotation = str(f.type)
    if annotation.startswith("bool"):
        return _parse_bool
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    if annotation.startswith("Path"):
        return Path
    return str


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _parse(env: str, raw: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(raw.strip())
    except ValueError as error:
        expected = getattr(kind, "__name__", "value").lstrip("_").replace("parse_", "")
        raise ValueError(f"{env}={raw!r} is not a valid {expected}: {error}") from None
