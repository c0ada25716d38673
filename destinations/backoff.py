"""The retry policy every retrying destination shares: exponential backoff with full jitter.

Owns `Backoff`, `RetryPolicy` (what a send or an endpoint changes of the
global backoff: `ctx.send.http(..., retry=RetryPolicy(max_attempts=3))`) and
`parse_retry_after`. Destinations decide what is worth retrying and which
policy applies; this module only says how long to wait and when to give up. Full
jitter (a uniform draw between 0 and the exponential step) keeps a crowd of
failed sends from retrying in lock-step against a service that is recovering.
"""

from __future__ import annotations

import dataclasses
import email.utils
import math
import random
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Backoff:
    """`delay(n)` is the wait after the n-th failed attempt (n >= 1)."""

    base: float = 0.5
    cap: float = 30.0
    max_attempts: int = 5  # attempts in all, the first included; 1 means no retry
    max_retry_after: float = 300.0  # longest server-requested wait we honour
    retry_for: float | None = None  # seconds from acceptance after which retrying ends
    #: What set `retry_for`, named when the window ends retrying.
    retry_for_source: str = "OUTBOUND_RETRY_FOR"

    def should_retry(self, attempts: int) -> bool:
        return attempts < self.max_attempts

    def window_over(self, accepted_at: float, now: float | None = None) -> bool:
        """Whether a send accepted at `accepted_at` (wall clock) is past the retry window."""
        if self.retry_for is None or not accepted_at:
            return False
        return (time.time() if now is None else now) - accepted_at > self.retry_for

    def give_up_reason(self, attempts: int, accepted_at: float) -> str | None:
        """Why retrying a send ends now (which limit), or None while it may go on."""
        if not self.should_retry(attempts):
            return f"gave up after {attempts} attempts"
        if self.window_over(accepted_at):
            return (
                f"gave up after {attempts} attempts: retry window of {self.retry_for:g} s "
                f"({self.retry_for_source}) is over"
            )
        return None

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        # The exponent is capped: 2.0 ** 1024 overflows a float, and a batch
        # retries without an attempt limit (thousands of attempts over a long outage).
        ceiling = min(self.cap, self.base * (2.0 ** min(max(0, attempt - 1), 64)))
        return (rng or random).uniform(0, ceiling)

    def delay_for(self, attempt: int, retry_after: float | None) -> float:
        """The server's `Retry-After`, when it gave one, wins over our own backoff."""
        if retry_after is not None:
            return min(max(0.0, retry_after), self.max_retry_after)
        return self.delay(attempt)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one send, or the sends to one endpoint, retry: each field given replaces the
    global default (`OUTBOUND_*_MAX_ATTEMPTS`, `OUTBOUND_RETRY_BASE/CAP/FOR`); None keeps it.

    Immutable and checked when made (ValueError naming the field and its rule), so
    a bad policy fails at the call, before anything is queued. A server's
    `Retry-After` still sets the wait before the next attempt; the policy's
    attempts and window still end retrying.
    """

    max_attempts: int | None = None  # attempts in all, the first included; 1 means no retry
    base: float | None = None  # first backoff step in seconds (full jitter)
    cap: float | None = None  # longest backoff in seconds
    retry_for: float | None = None  # seconds from acceptance after which retrying ends

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if attempts is not None and (
            not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1
        ):
            raise ValueError(
                f"RetryPolicy.max_attempts must be an int of at least 1, got {attempts!r}"
            )
        for name, least, rule in (
            ("base", 0.0, "seconds of at least 0"),
            ("cap", None, "positive seconds"),
            ("retry_for", None, "positive seconds"),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or (value < least if least is not None else value <= 0)
            ):
                raise ValueError(f"RetryPolicy.{name} must be {rule}, got {value!r}")

    def over(self, other: RetryPolicy | None) -> RetryPolicy:
        """This policy, its unset fields taken from `other` (a send's over its endpoint's)."""
        if other is None:
            return self
        return RetryPolicy(
            *(
                mine if mine is not None else theirs
                for mine, theirs in zip(self._values(), other._values(), strict=True)
            )
        )

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def applied_to(self, backoff: Backoff, source: str = "RetryPolicy.retry_for") -> Backoff:
        """The global `backoff` with the fields this policy sets replaced."""
        changes: dict[str, Any] = {}
        if self.max_attempts is not None:
            changes["max_attempts"] = self.max_attempts
        if self.base is not None:
            changes["base"] = float(self.base)
        if self.cap is not None:
            changes["cap"] = float(self.cap)
        if self.retry_for is not None:
            changes["retry_for"] = float(self.retry_for)
            changes["retry_for_source"] = source
        return dataclasses.replace(backoff, **changes) if changes else backoff


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment is None:
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))
