"""Backpressure: the two bounds between `submit` and the network, and who counts against which.

Owns `Backpressure`: the admission bound (`outbound.admission.Admission`,
`OUTBOUND_MAX_PENDING` runs and sends in flight), the batch memory budget
(`MemoryBudget`, bytes that batched destinations such as S3 and SQL hold), and
the set of destinations that batch. A run takes admission at submit; at
hand-off its unit becomes one per send, except for sends to batched
destinations, which the memory budget bounds instead (a batch may wait for its
age or size, which a count of sends would stop it from reaching); the ledger
gives the units back as sends become final (`sends_final`). Takes what it
needs as arguments; must not import the runtime facade, the hand-off or the
shutdown modules (they use it).
"""

from __future__ import annotations

from typing import Any

from outbound.admission import Admission
from outbound.destinations.budget import MemoryBudget
from outbound.destinations.delivery import Send


class Backpressure:
    """Admission and the batch memory budget of one runtime (kept across its restarts)."""

    def __init__(self, max_pending: int, batch_memory_cap: int) -> None:
        self.admission = Admission(max_pending)
        self.batch_memory_cap = batch_memory_cap
        self.budget = MemoryBudget(batch_memory_cap)
        #: Destinations whose sends count against the budget, not admission.
        self.batched: set[str] = set()

    def reopen(self) -> None:
        """The runtime starts (again): count afresh, with a new budget if a stop closed or
        left the old one in use."""
        self.admission.reopen()
        if self.budget.closed or self.budget.used:  # a stop may leave sends to a journal
            self.budget = MemoryBudget(self.batch_memory_cap)

    def stats(self) -> dict[str, Any]:
        """`admission` (in flight, limit, callers waiting for room) and `buffered_bytes`."""
        admission = self.admission
        return {
            "admission": {
                "in_flight": admission.in_flight,
                "limit": admission.limit,
                "waiting": admission.waiting,
            },
            "buffered_bytes": self.budget.used,
        }

    def batched_load(self, outbox: list[Send]) -> tuple[int, int]:
        """How many of these sends go to batches, and the bytes they will hold there."""
        if not self.batched:
            return 0, 0
        batched = self.batched
        count = size = 0
        for send in outbox:
            if send.destination in batched:
                count += 1
                size += send.size
        return count, size

    def sends_final(self, destination: str, count: int) -> None:
        """The ledger's report of sends that became final: give their admission room back.

        Batched sends (S3, SQL) are not counted once handed off: a batch may
        wait for its age or size to fill, which a count of sends would stop it
        from reaching; the batch memory budget bounds them instead.
        """
        if destination not in self.batched:
            self.admission.settle(count)

    def release(self, destination: str, amount: int) -> None:
        """Give back budget that sends to `destination` held (nothing if it does not batch)."""
        if destination in self.batched:
            self.budget.release(amount)
