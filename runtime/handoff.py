"""Hand-off: the sends of finished runs into the destination actors' inboxes.

Owns `HandOff` (one per start of a runtime: records a finished run, takes
backpressure for its sends, buffers the outboxes per pool worker and forwards
those of many runs in one `Deliver` message per destination; with a journal,
the buffered runs' sends are journaled as one entry first, and the sends
forwarded and the runs reported finished once it is stored; sends a journal
hands back at start go the same way, `recovered`, but for those a destination
claims for messages of its own, `claim_recovered`; and so do replayed dead
letters, journaled first, `replayed`) and
`flush_destinations` (a `Flush` to every destination once the hand-offs in
progress have arrived). A send to a destination whose actor is gone fails at
once, dead-lettered. Takes what it needs as arguments (the ledger, the
`Backpressure`, the table of destination actors); must not import the runtime
facade or the shutdown module, and holds no destination-specific logic.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pykka

from outbound.actors import ActorPool
from outbound.backpressure import Backpressure
from outbound.deadlines import time_left
from outbound.destinations.base import Deliver, Flush
from outbound.destinations.delivery import Ledger, Send, describe_error, settle
from outbound.journal.journal import Journal
from outbound.run import RunFuture, RunResult

logger = logging.getLogger(__name__)

HAND_OFF_BATCH = 64  # runs a pool worker buffers at most before forwarding their sends
HAND_OFF_SENDS = 1024  # ... and sends: big runs go on at once, so batches fill while runs go on
_destination_of = operator.attrgetter("destination")


@dataclass(frozen=True, slots=True)
class FinishedRun:
    """A run waiting for its sends to be journaled (buffered per pool worker)."""

    result: RunResult
    outbox: list[Send]
    future: RunFuture


class HandOff:
    """Forwards what runs send to the destination actors, in bulk, with backpressure."""

    def __init__(
        self,
        ledger: Ledger,
        backpressure: Backpressure,
        pool: ActorPool,
        destinations: Mapping[str, pykka.ActorRef[Any]],
        failed_destinations: Mapping[str, BaseException],
        journal: Journal | None = None,
    ) -> None:
        self.ledger = ledger
        self.journal = journal
        self.backpressure = backpressure
        self.pool = pool
        self.destinations = destinations  # the runtime's live table, by name
        self.failed_destinations = failed_destinations  # given up on, with why
        self._buffered = threading.local()  # per pool worker: outboxes not yet forwarded
        pool.add_idle_hook(self.forward_buffered)

    def hand_off(self, result: RunResult, outbox: list[Send], future: RunFuture) -> None:
        """Record a finished run, forward its sends (one message per destination), settle
        its future.

        On a pool worker the sends wait in a per-thread buffer that the worker
        flushes when it runs out of work (or every few dozen runs, or a
        thousand sends): one message to a destination per batch of runs
        instead of one per run, so a busy pool does not wake the destination
        threads thousands of times a second, while batches still fill (and
        load) as runs go on. `future.awaited` (a caller waits for this run):
        forwarded now, after what this worker buffered, so the caller's next
        run cannot overtake it. With a journal, the future settles only once
        the journal has stored the run's sends (`_journaled`).
        """
        self.ledger.run_finished(result, outbox)
        backpressure = self.backpressure
        batched_sends, held = backpressure.batched_load(outbox)
        # The run's unit becomes one per send, but for batched ones (the memory budget's).
        backpressure.admission.handed_off(len(outbox) - batched_sends)
        if not outbox:
            _run_done(result, future)
            return
        at_once = future.awaited
        on_worker = self.pool.is_worker()
        budget = backpressure.budget
        if held and not budget.acquire(held, timeout=0):
            # Backpressure: the run waits for room in the batch memory budget. What
            # this worker still buffers may be what frees it, so forward that first.
            if on_worker:
                self.forward_buffered()
            budget.acquire(held)
        if self.journal is not None:
            run = FinishedRun(result, outbox, future)
            if on_worker:
                self._buffer(run, len(outbox), at_once)
            else:
                self._journal([run])
            return
        if not on_worker:
            self.forward([outbox])
        elif at_once:
            self.forward_buffered()
            self.forward([outbox])
        else:
            self._buffer(outbox, len(outbox), at_once=False)
        future.set_result(result)

    def _buffer(self, item: FinishedRun | list[Send], sends: int, at_once: bool) -> None:
        """Keep a run's outbox (journal: the run) in this worker's buffer; forward the lot
        when it is full, or at once when a caller waits for this run."""
        local = self._buffered
        buffered = local.__dict__.setdefault("outboxes", [])
        buffered.append(item)
        local.sends = buffered_sends = local.__dict__.get("sends", 0) + sends
        if at_once or len(buffered) >= HAND_OFF_BATCH or buffered_sends >= HAND_OFF_SENDS:
            self.forward_buffered()

    def forward_buffered(self) -> None:
        """The pool's idle hook: forward (or journal) what this worker's runs handed off."""
        buffered = self._buffered.__dict__.get("outboxes")
        if buffered:
            self._buffered.outboxes = []
            self._buffered.sends = 0
            if self.journal is not None:
                self._journal(buffered)
            else:
                self.forward(buffered)

    def _journal(self, runs: list[FinishedRun]) -> None:
        """Journal the sends of `runs` as one entry; forward them once it is stored.

        A send too large for any journal message fails now (dead-lettered),
        and is left out of what is forwarded.
        """
        sends = [send for run in runs for send in run.outbox]
        assert self.journal is not None
        encoded = self.journal.encode(sends)
        too_large = encoded.too_large
        if too_large:
            refused = set(map(id, too_large))
            for run in runs:
                run.outbox[:] = [send for send in run.outbox if id(send) not in refused]
            for send in too_large:
                self.backpressure.release(send.destination, send.size)
            settle(too_large, "failed", error="too large for a journal message (max_payload)")
        self.journal.append(encoded, functools.partial(self._journaled, runs))

    def _journaled(self, runs: list[FinishedRun], error: BaseException | None) -> None:
        """On the journal's thread: the entry is stored (or never will be: `error`)."""
        if error is None:
            self.forward([run.outbox for run in runs])
        else:
            # The journal closed before storing them (a stop while it was unreachable):
            # they were never durable, so they fail now and are dead-lettered.
            sends = [send for run in runs for send in run.outbox]
            for send in sends:
                send.outcome.entry = None
                self.backpressure.release(send.destination, send.size)
            self.ledger.handed_off(len(runs))
            settle(sends, "failed", error=f"not journaled: {describe_error(error)}")
        for run in runs:
            _run_done(run.result, run.future)

    def recovered(self, sends: list[Send], counter: str = "recovered") -> None:
        """Deliver sends a journal handed back at start, counted as if handed off now.

        A send for a destination this runtime does not have (not added before
        `start()`, or no longer configured) stays in the journal, logged: the
        next start with that destination delivers it.
        """
        unknown = [send for send in sends if send.destination not in self.destinations]
        if unknown:
            names = sorted({send.destination for send in unknown})
            logger.error(
                "journal: %d recovered sends are for destinations this runtime does not have "
                "(%s); they stay in the journal for a start that has them",
                len(unknown),
                ", ".join(names),
            )
            sends = [send for send in sends if send.destination in self.destinations]
        self._take_recovered(sends, counter)
        self._tell_each([sends])

    def _take_recovered(self, sends: list[Send], counter: str = "recovered") -> None:
        """Count recovered sends as if handed off now (waits for room in the memory budget)."""
        self.ledger.recovered(sends, counter)
        backpressure = self.backpressure
        batched_sends, held = backpressure.batched_load(sends)
        backpressure.admission.take(len(sends) - batched_sends)
        backpressure.budget.acquire(held)  # waits while batches flush, as a hand-off would

    def claim_recovered(self, sends: list[Send]) -> set[str]:
        """Before `recovered`: hand each destination that claims some of these sends its own
        messages for them (`claim_recovered(journal, sends)` of its actor class, if it has
        one: S3's `Rebuild` of an interrupted object); the delivery ids claimed."""
        if self.journal is None:
            return set()
        by_destination: dict[str, list[Send]] = defaultdict(list)
        for send in sends:
            by_destination[send.destination].append(send)
        claimed: set[str] = set()
        for name, mine in by_destination.items():
            ref = self.destinations.get(name)
            claim = getattr(getattr(ref, "actor_class", None), "claim_recovered", None)
            if claim is None:
                continue
            try:
                messages = claim(self.journal, mine)
            except Exception:  # e.g. the journal stopped answering: deliver them as before
                logger.exception("journal: %r could not claim its recovered sends", name)
                continue
            for message in messages:
                self._take_recovered(message.sends)
                claimed.update(send.id for send in message.sends)
                try:
                    ref.tell(message)  # type: ignore[union-attr]
                except pykka.ActorDeadError:
                    self.backpressure.release(name, sum(send.size for send in message.sends))
                    settle(message.sends, "failed", error=f"destination {name!r} is down")
        return claimed

    def replayed(self, sends: list[Send]) -> list[Send]:
        """Deliver dead letters sent again (`outbound replay`): journaled first, with a
        journal (blocking until stored), then as `recovered` sends. Returns the sends
        not handed on (too large for a journal message); `JournalError` if the journal
        closed before storing them.
        """
        if self.journal is not None and sends:
            encoded = self.journal.encode(sends)
            refused = set(map(id, encoded.too_large))
            sends = [send for send in sends if id(send) not in refused]
            stored = threading.Event()
            outcome: list[BaseException | None] = []

            def journaled(error: BaseException | None) -> None:  # on the journal's thread
                outcome.append(error)
                stored.set()

            self.journal.append(encoded, journaled)
            stored.wait()
            if outcome[0] is not None:
                raise outcome[0]
            if sends:
                self.recovered(sends, "replayed")
            return encoded.too_large
        self.recovered(sends, "replayed")
        return []

    def forward(self, outboxes: list[list[Send]]) -> None:
        try:
            self._tell_each(outboxes)
        finally:
            self.ledger.handed_off(len(outboxes))

    def _tell_each(self, outboxes: list[list[Send]]) -> None:
        """One `Deliver` per destination for the sends of all these outboxes."""
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

    def _tell(self, name: str, sends: list[Send]) -> None:
        try:
            self.destinations[name].tell(Deliver(sends))
        except pykka.ActorDeadError:
            self.backpressure.release(name, sum(send.size for send in sends))
            cause = self.failed_destinations.get(name) or "the destination actor is stopped"
            # One settle for the lot: failed and dead-lettered in one write.
            settle(sends, "failed", error=f"destination {name!r} is down: {cause}")


def _run_done(result: RunResult, future: RunFuture) -> None:
    """The run's sends are where they go next: let its journaled event go, report it."""
    if future.journal_event is not None:
        future.journal_event.run_journaled()
    if not future.done():
        future.set_result(result)


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
