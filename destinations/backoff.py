"""The retry policy every retrying destination shares: exponential backoff with full jitter.

Owns `Backoff` and `parse_retry_after`. Destinations decide what is worth
retrying; this module only says how long to wait and when to give up. Full
jitter (a uniform draw between 0 and the exponential step) keeps a crowd of
failed sends from retrying in lock-step against a service that is recovering.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """`delay(n)` is the wait after the n-th failed attempt (n >= 1)."""

    base: float = 0.5
    cap: float = 30.0
    max_attempts: int = 5  # attempts in all, the first included; 1 means no retry
    max_retry_after: float = 300.0  # longest server-requested wait we honour
    retry_for: float | None = None  # seconds from acceptance after which retrying ends

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
                "(OUTBOUND_RETRY_FOR) is over"
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
