"""Hand-off: the sends of finished runs into the destination actors' inboxes.

Owns `HandOff` (one per start of a runtime: records a finished run, takes
backpressure for its sends, buffers the outboxes per pool worker and forwards
those of many runs in one `Deliver` message per destination) and
`flush_destinations` (a `Flush` to every destination once the hand-offs in
progress have arrived). A send to a destination whose actor is gone fails at
once, dead-lettered. Takes what it needs as arguments (the ledger, the
`Backpressure`, the table of destination actors); must not import the runtime
facade or the shutdown module, and holds no destination-specific logic.
"""

from __future__ import annotations

import contextlib
import operator
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import pykka

from outbound.actors import ActorPool
from outbound.backpressure import Backpressure
from outbound.deadlines import time_left
from outbound.destinations.base import Deliver, Flush
from outbound.destinations.delivery import Ledger, Send, settle
from outbound.run import RunResult

HAND_OFF_BATCH = 64  # runs a pool worker buffers at most before forwarding their sends
HAND_OFF_SENDS = 1024  # ... and sends: big runs go on at once, so batches fill while runs go on
_destination_of = operator.attrgetter("destination")


class HandOff:
    """Forwards what runs send to the destination actors, in bulk, with backpressure."""

    def __init__(
        self,
        ledger: Ledger,
        backpressure: Backpressure,
        pool: ActorPool,
        destinations: Mapping[str, pykka.ActorRef[Any]],
        failed_destinations: Mapping[str, BaseException],
    ) -> None:
        self.ledger = ledger
        self.backpressure = backpressure
        self.pool = pool
        self.destinations = destinations  # the runtime's live table, by name
        self.failed_destinations = failed_destinations  # given up on, with why
        self._buffered = threading.local()  # per pool worker: outboxes not yet forwarded
        pool.add_idle_hook(self.forward_buffered)

    def hand_off(self, result: RunResult, outbox: list[Send], at_once: bool = False) -> None:
        """Record a finished run and forward its sends: one message per destination.

        On a pool worker the sends wait in a per-thread buffer that the worker
        flushes when it runs out of work (or every few dozen runs, or a
        thousand sends): one message to a destination per batch of runs
        instead of one per run, so a busy pool does not wake the destination
        threads thousands of times a second, while batches still fill (and
        load) as runs go on. `at_once` (a caller waits for this run): forwarded
        now, after what this worker buffered, so the caller's next run cannot
        overtake it.
        """
        self.ledger.run_finished(result, outbox)
        backpressure = self.backpressure
        batched_sends, held = backpressure.batched_load(outbox)
        # The run's unit becomes one per send, but for batched ones (the memory budget's).
        backpressure.admission.handed_off(len(outbox) - batched_sends)
        if not outbox:
            return
        on_worker = self.pool.is_worker()
        budget = backpressure.budget
        if held and not budget.acquire(held, timeout=0):
            # Backpressure: the run waits for room in the batch memory budget. What
            # this worker still buffers may be what frees it, so forward that first.
            if on_worker:
                self.forward_buffered()
            budget.acquire(held)
        if not on_worker:
            self.forward([outbox])
            return
        if at_once:
            self.forward_buffered()
            self.forward([outbox])
            return
        local = self._buffered
        buffered = local.__dict__.setdefault("outboxes", [])
        buffered.append(outbox)
        local.sends = sends = local.__dict__.get("sends", 0) + len(outbox)
        if len(buffered) >= HAND_OFF_BATCH or sends >= HAND_OFF_SENDS:
            self.forward_buffered()

    def forward_buffered(self) -> None:
        """The pool's idle hook: forward what this worker's runs handed off."""
        buffered = self._buffered.__dict__.get("outboxes")
        if buffered:
            self._buffered.outboxes = []
            self._buffered.sends = 0
            self.forward(buffered)

    def forward(self, outboxes: list[list[Send]]) -> None:
        try:
            by_destination: dict[str, list[Send]] = defaultdict(list)
            for outbox in outboxes:
                if not outbox:
                    continue
                destinations = set(map(_destination_of, outbox))
                if len(destinations) == 1:  # the common case: a run's sends go to one place
                    by_destination[destinations.pop()].extend(outbox)
                    continue
                for send in outbox:
                    by_destination[send.destination].append(send)
            for name, sends in by_destination.items():
                self._tell(name, sends)
        finally:
            self.ledger.handed_off(len(outboxes))

    def _tell(self, name: str, sends: list[Send]) -> None:
        try:
            self.destinations[name].tell(Deliver(sends))
        except pykka.ActorDeadError:
            self.backpressure.release(name, sum(send.size for send in sends))
            cause = self.failed_destinations.get(name) or "the destination actor is stopped"
            # One settle for the lot: failed and dead-lettered in one write.
            settle(sends, "failed", error=f"destination {name!r} is down: {cause}")


def flush_destinations(
    ledger: Ledger,
    backpressure: Backpressure,
    destinations: Mapping[str, pykka.ActorRef[Any]],
    deadline: float | None,
) -> None:
    """Tell every destination to flush, once the hand-offs in progress have arrived.

    A run counts as finished before its sends are told to the destinations;
    a `Flush` that overtook them would cut their batch in two (one more
    object or load). A hand-off held back by backpressure waits for room
    that only a flush frees, so each time one starts waiting, the
    destinations are flushed first.
    """
    budget, flushed_for_waits = backpressure.budget, -1
    while not ledger.wait_hand_offs(time_left(deadline, at_most=0.01)):
        if budget.waiting and budget.waits != flushed_for_waits:
            flushed_for_waits = budget.waits
            _tell_all(destinations, Flush())
        if deadline is not None and time.monotonic() >= deadline:
            break
    _tell_all(destinations, Flush())


def _tell_all(destinations: Mapping[str, pykka.ActorRef[Any]], message: Any) -> None:
    for ref in destinations.values():
        with contextlib.suppress(pykka.ActorDeadError):
            ref.tell(message)
