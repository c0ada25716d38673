"""Settings as every destination declares them: frozen dataclasses of `OUTBOUND_*` fields.

Owns `setting` (a field with its environment variable, default, doc and
rule), `Settings` (the base that checks the rules, `check_settings`, when
settings are made),
`parse_bool` (the one reading of an on/off value) and the settings the
delivery core shares: retries (`RetrySettings`) and batching
(`BatchSettings`). Each destination's own settings live in its folder
(`destinations/<kind>/settings.py`); the runtime's `Config` composes them all
(it inherits every settings class, so `config.http_timeout` and
`Config(http_timeout=...)` are what they always were) and reads the
environment. The settings classes are plain frozen dataclasses without slots:
several of them are bases of one `Config`. Must not import the runtime.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

MiB = 1024 * 1024

#: A rule a numeric setting must meet, checked by `check_settings`.
Rule = Literal["at least 0", "at least 1", "positive"]


def setting(env: str, default: Any, doc: str, rule: Rule | None = None) -> Any:
    """A settings field: its variable, default and meaning (for `Config.describe()`)."""
    return field(default=default, metadata={"env": env, "doc": doc, "rule": rule})


def check_settings(settings: Any) -> None:
    """Raise ValueError naming the first field whose value breaks its rule."""
    owner = type(settings).__name__
    rules = (("at least 0", _negative), ("at least 1", _below_one), ("positive", _not_positive))
    for rule, broken in rules:
        for f in dataclasses.fields(settings):
            value = getattr(settings, f.name)
            if f.metadata.get("rule") == rule and broken(value):
                raise ValueError(f"{owner}.{f.name} must be {rule}, got {value!r}")


def _negative(value: Any) -> bool:
    return value is not None and bool(value < 0)


def _below_one(value: Any) -> bool:
    return value is not None and bool(value < 1)  # None: unset, a default is chosen later


def _not_positive(value: Any) -> bool:
    return value is not None and bool(value <= 0)


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(raw: str) -> bool:
    """1/0, true/false, yes/no, on/off (any case, spaces around ignored); ValueError else."""
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


@dataclass(frozen=True)
class Settings:
    """Base of every settings class: its rules are checked when it is made."""

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class RetrySettings(Settings):
    """Backoff shared by every destination that retries (HTTP, email, batches)."""

    retry_base: float = setting(
        "OUTBOUND_RETRY_BASE", 0.5, "first backoff step in seconds (full jitter)"
    )
    retry_cap: float = setting(
        "OUTBOUND_RETRY_CAP", 30.0, "longest backoff in seconds", rule="positive"
    )
    # A day, as webhook services retry (for hours to days): an endpoint, a mail
    # server or a database that is down for an hour is an outage to ride out,
    # not a reason to dead-letter what was accepted.
    retry_for: float = setting(
        "OUTBOUND_RETRY_FOR",
        86_400.0,
        "seconds from a send's acceptance after which it is not retried any more "
        "(HTTP, email, batches); with the journal on, the max-attempts defaults grow "
        "to fill it",
        rule="positive",
    )


#: Attempts per send when OUTBOUND_HTTP/EMAIL_MAX_ATTEMPTS is unset and the journal is off.
DEFAULT_MAX_ATTEMPTS = 5


def max_attempts(config: Any, explicit: int | None) -> int:
    """Attempts per send: the user's setting, else a default that suits the journal.

    Without a journal a send lives in memory only, so a few attempts (5, about
    7 s of backoff) keep a stop from waiting long. With the journal on, a
    retry survives a restart, so the window (`retry_for`) is what ends
    retrying: enough attempts to fill it at the backoff cap, and a few more
    for the short steps at the start.
    """
    if explicit is not None:
        return int(explicit)
    if getattr(config, "journal", "off") == "off":
        return DEFAULT_MAX_ATTEMPTS
    return int(config.retry_for / config.retry_cap) + 10


def always_enabled(settings: Settings) -> bool:
    """`is_enabled` of a destination with nothing to configure (HTTP, SSE, emit)."""
    del settings
    return True


@dataclass(frozen=True)
class BatchSettings(Settings):
    """When the batching destinations (S3, SQL) flush, and how much they may hold."""

    batch_max_age: float = setting(
        "OUTBOUND_BATCH_MAX_AGE",
        60.0,
        "seconds from a batch's first event to its flush",
        rule="positive",
    )
    batch_max_events: int = setting(
        "OUTBOUND_BATCH_MAX_EVENTS", 10_000, "events that flush a batch", rule="at least 1"
    )
    batch_max_bytes: int = setting(
        "OUTBOUND_BATCH_MAX_BYTES", 8 * MiB, "encoded bytes that flush a batch", rule="at least 1"
    )
    batch_memory_cap: int = setting(
        "OUTBOUND_BATCH_MEMORY_CAP",
        256 * MiB,
        "bytes buffered in all batches before sends wait",
        rule="at least 1",
    )
