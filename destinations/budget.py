"""The memory budget of batched destinations: a cap on buffered bytes that makes hand-offs wait.

Owns `MemoryBudget` and `AdmissionUnits` (how a destination reaches the
runtime's admission bound, see below). The runtime takes room before it hands a run's sends to
a batched destination (S3, SQL), and the batcher gives it back once a batch is
final, so memory stays bounded while a store is slow or down. Imports nothing
of the project: the runtime and the destination base both use it.
"""

from __future__ import annotations

import threading
from typing import Protocol


class MemoryBudget:
    """A cap on bytes held by all batches; `acquire` blocks while it is full.

    A single hand-off larger than the whole cap is let through when nothing else
    is buffered, so an oversized batch waits instead of deadlocking. Once
    `close()`d (at shutdown), nothing waits any more.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self.waits = 0  # acquires that had to wait, ever
        self.waiting = 0  # acquires waiting now
        self.closed = False
        self._changed = threading.Condition(threading.Lock())

    def acquire(self, amount: int, timeout: float | None = None) -> bool:
        if amount <= 0:
            return True
        with self._changed:
            if self.used + amount > self.cap and self.used > 0 and not self.closed:
                self.waits += 1
                self.waiting += 1
                try:
                    if not self._changed.wait_for(
                        lambda: self.used + amount <= self.cap or self.used == 0 or self.closed,
                        timeout,
                    ):
                        return False
                finally:
                    self.waiting -= 1
            self.used += amount
            return True

    def close(self) -> None:
        """Let every waiting and later `acquire` through (shutdown: hand-offs must not hang)."""
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def release(self, amount: int) -> None:
        if amount <= 0:
            return
        with self._changed:
            self.used = max(0, self.used - amount)
            self._changed.notify_all()


class AdmissionUnits(Protocol):
    """The admission bound as a destination sees it (`outbound.admission.Admission`).

    A destination that holds sends for a long time may give a send's unit back
    (`settle`) while the send waits somewhere bounded of its own, and must take
    it again (`take`, never waits) before the send can become final: the ledger
    gives one unit back for every send that becomes final. The HTTP
    destination's per-host queues do this for a slow host's backlog.
    """

    limit: int

    def take(self, count: int = 1) -> None: ...

    def settle(self, count: int = 1) -> None: ...
