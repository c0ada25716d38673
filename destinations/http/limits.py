"""Per-host policies of the HTTP destination that depend on time: rate limits and circuit breakers.

Owns `RateLimit` (a parsed `"100/s"`, `"6000/min"`: `OUTBOUND_HTTP_RATE_LIMIT` and
`rt.http_endpoint(..., rate_limit=...)`), `TokenBucket` (one per host, per node)
and `Circuit` (one host's breaker: closed, open for a cool-down, then one probe).
Pure state machines: the clock is an argument (`now`, `time.monotonic()` seconds),
so they are tested without sleeping; `hosts.HostQueues` asks them whether a host
may start a request and `workers.py` tells them how each attempt ended. Must not
import the runtime or another destination.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

#: Units a rate may be given in, and their seconds.
RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
RATE_UNITS |= {"h": 3600.0, "hour": 3600.0}
RATE_RULE = "a positive number of requests per s, min or h, e.g. 100/s or 6000/min"
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*")
#: A bucket holds this many seconds' worth of tokens (at least one): short bursts only.
BURST_SECONDS = 0.1

#: Consecutive failed attempts (connect error, timeout, 429, 5xx) that open a host's circuit
#: (`OUTBOUND_HTTP_CIRCUIT_FAILURES`).
FAILURES_TO_OPEN = 5
#: Seconds an open circuit waits before its first probe (`OUTBOUND_HTTP_CIRCUIT_COOL_DOWN`);
#: doubled after each failed probe.
FIRST_COOL_DOWN = 5.0
#: The longest cool-down between probes.
MAX_COOL_DOWN = 60.0


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When circuits open and how long they wait before a probe."""

    failures_to_open: int = FAILURES_TO_OPEN
    cool_down: float = FIRST_COOL_DOWN


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A request rate: `per_second` on average, bursts of at most `burst` requests."""

    per_second: float
    text: str

    @property
    def burst(self) -> float:
        return max(1.0, self.per_second * BURST_SECONDS)

    @classmethod
    def parse(cls, text: str, name: str = "rate_limit") -> RateLimit:
        """`"100/s"` -> 100 per second; ValueError naming `name` and the rule when bad."""
        match = _RATE.fullmatch(text.lower()) if isinstance(text, str) else None
        unit = RATE_UNITS.get(match.group(2)) if match else None
        count = float(match.group(1)) if match else 0.0
        if match is None or unit is None or count <= 0:
            raise ValueError(f"{name} must be {RATE_RULE}, got {text!r}")
        return cls(count / unit, text.strip())


def rate_limit_setting(value: Any, name: str) -> RateLimit | None:
    """A rate limit given as text or `RateLimit` (None: no limit)."""
    if value is None or isinstance(value, RateLimit):
        return value
    return RateLimit.parse(value, name)


class TokenBucket:
    """Requests a host may start now: `burst` at most, refilled at the limit's rate."""

    __slots__ = ("limit", "tokens", "updated")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self.tokens = limit.burst
        self.updated = now

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: one is there now)."""
        self._refill(now)
        if self.tokens >= 1.0:
            return 0.0
        return (1.0 - self.tokens) / self.limit.per_second

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0

    def _refill(self, now: float) -> None:
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.limit.burst, self.tokens + elapsed * self.limit.per_second)
            self.updated = now


class Circuit:
    """One host's circuit breaker.

    Closed: requests go. After `failures_to_open` failed attempts in a row it
    opens: no request starts (sends wait in their queue, their attempts not
    spent) until the cool-down is over; then one probe goes. The probe
    succeeding closes it; failing opens it again for twice the cool-down (at
    most `MAX_COOL_DOWN`, or the first cool-down if longer). Any answer but 429
    and 5xx counts as success: the host answers (a 404 is the endpoint's fault,
    not the host's).
    """

    __slots__ = (
        "host",
        "settings",
        "failures",
        "opened_at",
        "retry_at",
        "cool_down",
        "probing",
        "last_error",
    )

    def __init__(self, host: str, settings: BreakerSettings | None = None) -> None:
        self.host = host
        self.settings = settings if settings is not None else BreakerSettings()
        self.failures = 0
        self.opened_at: float | None = None  # time.monotonic() when it opened
        self.retry_at = 0.0  # when the next probe may go, while open
        self.cool_down = self.settings.cool_down
        self.probing = False
        self.last_error: str | None = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    @property
    def clean(self) -> bool:
        """Closed with no failure counted: nothing to remember."""
        return self.opened_at is None and self.failures == 0

    def wait(self, now: float) -> float:
        """Seconds until a request may start (0: now; inf: only once the probe ends)."""
        if self.opened_at is None:
            return 0.0
        if self.probing:
            return math.inf
        return max(0.0, self.retry_at - now)

    def started(self) -> None:
        """A request starts; while open, it is the probe."""
        if self.opened_at is not None:
            self.probing = True

    def succeeded(self) -> bool:
        """The host answered; True if this closed the circuit."""
        was_open = self.opened_at is not None
        self.failures = 0
        self.opened_at = None
        self.probing = False
        self.cool_down = self.settings.cool_down
        return was_open

    def failed(self, now: float, error: str | None) -> bool:
        """An attempt failed (connect error, timeout, 429, 5xx); True if this opened it."""
        self.failures += 1
        self.last_error = error
        if self.opened_at is not None:
            if self.probing:  # the probe failed: wait longer
                self.probing = False
                self.cool_down = min(
                    self.cool_down * 2, max(MAX_COOL_DOWN, self.settings.cool_down)
                )
                self.retry_at = now + self.cool_down
            return False
        if self.failures < self.settings.failures_to_open:
            return False
        self.opened_at = now
        self.retry_at = now + self.cool_down
        return True

    def state(self, now: float, wall_now: float) -> dict[str, Any]:
        """What health shows of an open circuit; times as `time.time()` (`wall_now` is `now`)."""
        return {
            "failures": self.failures,
            "opened_at": round(wall_now - now + (self.opened_at or now), 3),
            "probing": self.probing,
            "next_probe_at": round(wall_now - now + self.retry_at, 3),
            "cool_down": self.cool_down,
            "last_error": self.last_error,
        }
