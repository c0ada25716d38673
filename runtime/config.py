"""Runtime configuration: one frozen `Config`, read from `OUTBOUND_*` variables.

Owns the runtime's own settings and the reading of all of them: each
destination declares its settings in its folder (`destinations/<kind>/settings.py`)
and the delivery core its shared ones (`destinations/settings.py`); `Config`
composes them. `Config.from_env()` reads the environment; `Config(...)` and
`config.replace(...)` take keyword overrides. A malformed variable fails at
start-up naming the variable and what it expects, never later at the first
delivery.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outbound.destinations.email.settings import EmailSettings
from outbound.destinations.emit.settings import EmitSettings
from outbound.destinations.http.settings import HttpSettings, check_http_settings
from outbound.destinations.s3.settings import S3Settings
from outbound.destinations.settings import (
    BatchSettings,
    MiB,
    RetrySettings,
    Settings,
    check_settings,
    parse_bool,
    setting,
)
from outbound.destinations.sql.settings import SqlSettings
from outbound.destinations.sse.settings import SseSettings
from outbound.journal.settings import JournalSettings, check_journal_settings
from outbound.logs import LOG_FORMAT_VARIABLE, check_log_format


@dataclass(frozen=True)
class RuntimeSettings(Settings):
    """The runtime's own settings: runs, history, backpressure, shutdown, health."""

    data_dir: Path = setting(
        "OUTBOUND_DATA_DIR", Path(".outbound"), "where dead-letter files are written"
    )
    deliver_on_error: bool = setting(
        "OUTBOUND_DELIVER_ON_ERROR", True, "deliver the sends of a run that raised"
    )
    max_payload_bytes: int = setting(
        "OUTBOUND_MAX_PAYLOAD_BYTES",
        1 * MiB,
        "largest encoded payload of one send",
        rule="at least 1",
    )
    run_history: int = setting(
        "OUTBOUND_RUN_HISTORY",
        10_000,
        "finished runs kept for deliveries() and GET /runs",
        rule="at least 1",
    )
    run_event_excerpt: int = setting(
        "OUTBOUND_RUN_EVENT_EXCERPT",
        2000,
        "characters of each run's event kept with its result (as JSON text) for GET "
        "/runs/{id} and the inspector; 0 keeps none (events holding personal data)",
        rule="at least 0",
    )
    delivery_history: int = setting(
        "OUTBOUND_DELIVERY_HISTORY",
        200_000,
        "delivery records kept with those runs; the oldest runs go first beyond it",
        rule="at least 1",
    )
    max_pending: int = setting(
        "OUTBOUND_MAX_PENDING",
        10_000,
        "runs and sends in flight (submitted, not yet delivered or failed) before "
        "submit() waits for room (backpressure)",
        rule="at least 1",
    )
    pool_workers: int = setting(
        "OUTBOUND_POOL_WORKERS", 8, "threads that run workflow-run actors", rule="at least 1"
    )
    gc_tuning: bool = setting(
        "OUTBOUND_GC_TUNING",
        False,
        "at the first start in a process, gc.freeze() existing objects and raise the GC's "
        "first threshold to 5000 (process-wide; outbound serve/demo and benchmarks do it)",
    )
    shutdown_timeout: float = setting(
        "OUTBOUND_SHUTDOWN_TIMEOUT", 30.0, "seconds stop() waits before dead-lettering"
    )
    health_retrying_after: float = setting(
        "OUTBOUND_HEALTH_RETRYING_AFTER",
        60.0,
        "seconds a batch may keep failing before rt.health() reports its destination retrying",
        rule="positive",
    )
    log_format: str = setting(
        LOG_FORMAT_VARIABLE,
        "plain",
        "how outbound serve and outbound replay write log lines to stderr: plain "
        "(time level logger: message) or json (one object per line, for log shippers); "
        "a library embedding the runtime keeps its own logging setup",
    )


@dataclass(frozen=True)
class ApiSettings(Settings):
    """The HTTP API's settings (`outbound serve`)."""

    api_token: str | None = setting(
        "OUTBOUND_API_TOKEN", None, "bearer token the HTTP API requires (unset: open)"
    )
    cors_origins: str = setting(
        "OUTBOUND_CORS_ORIGINS", "*", "comma-separated origins allowed to read SSE streams"
    )


# The bases are listed last-first: a dataclass takes its bases' fields in reverse
# MRO order, so `describe()` lists the runtime's own settings first, then retries,
# HTTP, S3, batching, SQL, email, SSE, the API, emit and the journal.
@dataclass(frozen=True)
class Config(
    JournalSettings,
    EmitSettings,
    ApiSettings,
    SseSettings,
    EmailSettings,
    SqlSettings,
    BatchSettings,
    S3Settings,
    HttpSettings,
    RetrySettings,
    RuntimeSettings,
):
    """Every setting of a `Runtime`, with the environment variable that sets it.

    Composed of each destination's settings (`destinations/<kind>/settings.py`),
    the delivery core's (retries, batching) and the runtime's own, so every
    field is still `config.<name>` and `Config(<name>=...)`.
    """

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        check_settings(self)
        check_http_settings(self)
        check_journal_settings(self)
        check_log_format(self.log_format)

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
        return parse_bool
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    if annotation.startswith("Path"):
        return Path
    return str


def _parse(env: str, raw: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(raw.strip())
    except ValueError as error:
        expected = getattr(kind, "__name__", "value").lstrip("_").replace("parse_", "")
        raise ValueError(f"{env}={raw!r} is not a valid {expected}: {error}") from None
