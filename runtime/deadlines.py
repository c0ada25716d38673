"""Deadlines as `time.monotonic()` instants: the one helper that turns one into a timeout.

Owns `time_left`. The runtime's waits (`run`, `flush`, `stop`) take a timeout
once and pass a deadline down, so a wait made of several steps keeps to it.
Must not import anything of the runtime, actors or destinations.
"""

from __future__ import annotations

import time


def time_left(deadline: float | None, at_most: float | None = None) -> float | None:
    """Seconds until a `time.monotonic()` deadline (None: no deadline), capped at `at_most`."""
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    if at_most is None:
        return left
    return at_most if left is None else min(left, at_most)
