"""The shared retry policy: full-jitter exponential backoff."""

from __future__ import annotations

import random

from outbound.destinations.backoff import Backoff


def test_delay_stays_within_the_cap_after_thousands_of_attempts() -> None:
    # Batches retry without an attempt limit: 2.0 ** 1024 used to raise OverflowError
    # after about a thousand attempts, crashing the batching destination.
    backoff = Backoff(base=0.5, cap=30.0)
    rng = random.Random(7)
    delays = [backoff.delay(attempt, rng) for attempt in (1, 2, 10, 1_025, 5_000, 10**9)]
    assert all(0.0 <= delay <= 30.0 for delay in delays)


def test_first_delays_grow_exponentially_under_the_cap() -> None:
    backoff = Backoff(base=1.0, cap=1_000.0)
    ceilings = [max(backoff.delay(n, random.Random(seed)) for seed in range(200)) for n in (1, 4)]
    assert ceilings[0] <= 1.0 < ceilings[1] <= 8.0
