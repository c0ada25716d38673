"""A send, its outcome, the one settle path, and the ledger that counts them.

Owns:
- `Send`: what was asked (ids, destination, payload, size, depth, time of the
  call). Its fields cannot be assigned once it is made; the payload alone is
  dropped when the send is settled (the ledger keeps settled sends of recent
  runs, and nothing reads a payload after that).
- `Outcome`: what happened to it so far (status, attempts, detail, error,
  finished_at), one per send, reached as `send.outcome` (and read through
  `send.status`, `send.attempts`, ... as destinations do).
- `Delivery`: the public snapshot of both that `Runtime.deliveries()` returns.
- The transitions: `settle` / `settle_each` make open sends final (delivered,
  or failed and dead-lettered), `reschedule` records a failed attempt that
  will be tried again. Every final outcome goes through `_settle`, the one
  place where a send stops being open: it writes failures to the ledger's
  dead-letter store (`destinations.deadletter.DeadLetterWriter` in a runtime)
  before the payload is dropped, all sends of one call in one write, and
  counts them in their ledger, and tells the journal entry that holds them
  (`JournalEntry`), whose last send acknowledges it. `leave_in_journal`
  lets go of open sends at a stop with a journal: the next start delivers them.
- `Ledger`: the sends of recent runs, counters per destination, and the number
  of sends not yet final, which `flush()` and `stop()` wait on.

A send whose `detail["dead_letter"]` already names where its destination wrote
it natively is not written again. Must not touch actors, loops or any network
client.
"""

from __future__ import annotations

import collections
import logging
import operator
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from outbound.destinations.bulk import update_each

logger = logging.getLogger(__name__)

DeliveryStatus = Literal["pending", "retrying", "delivered", "failed"]
FinalStatus = Literal["delivered", "failed"]
FINAL: frozenset[str] = frozenset({"delivered", "failed"})
OPEN: frozenset[str] = frozenset({"pending", "retrying"})  # every other status
_entry_of = operator.attrgetter("entry")
_status_of = operator.attrgetter("status")


@dataclass(slots=True, eq=False)
class Outcome:
    """What happened to one send so far; final once `status` is delivered or failed.

    Changed by the transitions of this module, and by destinations that count
    attempts (`send.attempts += 1`) or add detail before settling.
    """

    status: DeliveryStatus = "pending"
    attempts: int = 0
    error: str | None = None
    finished_at: float | None = None
    # Wall-clock time of the next attempt of a send in backoff (set by `reschedule`;
    # kept once it is final: when its last retry was due).
    next_try_at: float | None = None
    # The ledger that counts the send, from its hand-off until it is final. A
    # final send lets go of it: without the reference back, a runtime that is
    # dropped is freed at once instead of by the cyclic garbage collector.
    ledger: Ledger | None = field(default=None, repr=False)
    # The journal entry that holds the send (None without a journal): told at settle.
    entry: JournalEntry | None = field(default=None, repr=False)
    # Made at the first write (most sends in flight have no detail yet): one
    # object fewer per send for the garbage collector to track while it waits.
    _detail: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def detail(self) -> dict[str, Any]:
        """What the destination said (status code, object key, table, dead-letter file)."""
        detail = self._detail
        if detail is None:
            detail = self._detail = {}
        return detail


class Send:
    """One send as it was asked: made once by `ctx.send.<kind>`, never changed (once
    settled it drops its payload, which nothing reads any more).

    `outcome` is what happened to it; `status`, `attempts`, `detail`, `error`,
    `finished_at` and `final` read it. The asked fields are read-only
    properties over private slots: a frozen dataclass with the same fields
    took twice as long to make (2.2 µs against 1.0 µs, its outcome included,
    measured with `timeit`), and this runs once per send.
    """

    __slots__ = (
        "_destination",
        "_id",
        "_run_id",
        "_workflow_id",
        "_accepted_at",
        "_payload",
        "_size",
        "_depth",
        "outcome",
    )

    def __init__(
        self,
        destination: str,
        id: str = "",
        run_id: str = "",
        workflow_id: str = "",
        accepted_at: float = 0.0,
        payload: Any = None,
        size: int = 0,
        depth: int = 0,
    ) -> None:
        self._destination = destination
        self._id = id
        self._run_id = run_id
        self._workflow_id = workflow_id
        self._accepted_at = accepted_at  # wall-clock time of the send call
        self._payload = payload
        self._size = size  # encoded bytes, for memory accounting and dead-letter files
        self._depth = depth  # how many emits led to the run that made this send
        self.outcome = Outcome()

    destination: str = property(operator.attrgetter("_destination"))  # type: ignore[assignment]
    id: str = property(operator.attrgetter("_id"))  # type: ignore[assignment]
    run_id: str = property(operator.attrgetter("_run_id"))  # type: ignore[assignment]
    workflow_id: str = property(operator.attrgetter("_workflow_id"))  # type: ignore[assignment]
    accepted_at: float = property(operator.attrgetter("_accepted_at"))  # type: ignore[assignment]
    payload: Any = property(operator.attrgetter("_payload"))
    size: int = property(operator.attrgetter("_size"))  # type: ignore[assignment]
    depth: int = property(operator.attrgetter("_depth"))  # type: ignore[assignment]

    # -- its outcome, read as destinations do --------------------------------------------

    status: DeliveryStatus = property(operator.attrgetter("outcome.status"))  # type: ignore[assignment]
    detail: dict[str, Any] = property(operator.attrgetter("outcome.detail"))  # type: ignore[assignment]
    error: str | None = property(operator.attrgetter("outcome.error"))  # type: ignore[assignment]
    finished_at: float | None = property(operator.attrgetter("outcome.finished_at"))  # type: ignore[assignment]

    @property
    def attempts(self) -> int:
        return self.outcome.attempts

    @attempts.setter
    def attempts(self, attempts: int) -> None:
        """Destinations count their attempts on the send (`send.attempts += 1`)."""
        self.outcome.attempts = attempts

    @property
    def final(self) -> bool:
        return self.outcome.status in FINAL

    def snapshot(self) -> Delivery:
        """A detached copy of the send and its outcome, safe to hand to callers."""
        outcome = self.outcome
        return Delivery(
            self._destination,
            outcome.status,
            outcome.attempts,
            dict(outcome._detail or ()),
            outcome.error,
            self._id,
            self._run_id,
            self._workflow_id,
            self._accepted_at,
            outcome.finished_at,
            outcome.next_try_at,
        )

    def __repr__(self) -> str:
        return (
            f"Send({self._destination!r}, id={self._id!r}, run_id={self._run_id!r}, "
            f"status={self.outcome.status!r}, attempts={self.outcome.attempts})"
        )


def new_send(
    destination: str,
    delivery_id: str,
    run_id: str,
    workflow_id: str,
    accepted_at: float,
    payload: Any,
    size: int,
    depth: int,
) -> Send:
    """A send just accepted, pending (`Send(...)` with every field given)."""
    return Send(destination, delivery_id, run_id, workflow_id, accepted_at, payload, size, depth)


@dataclass(slots=True, eq=False)
class Delivery:
    """What happened to one send, as `Runtime.deliveries(run_id)` returns it: a detached copy."""

    destination: str
    status: DeliveryStatus = "pending"
    attempts: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    id: str = ""
    run_id: str = ""
    workflow_id: str = ""
    accepted_at: float = 0.0  # wall-clock time of the send call
    finished_at: float | None = None
    next_try_at: float | None = None  # wall-clock time of the next attempt (in backoff)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "destination": self.destination,
            "status": self.status,
            "attempts": self.attempts,
            "detail": dict(self.detail),
            "error": self.error,
            "accepted_at": self.accepted_at,
            "finished_at": self.finished_at,
            "next_try_at": self.next_try_at,
        }


# -- the transitions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivered:
    """One send delivered, with its own detail (for `settle_each`)."""

    send: Send
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Failure:
    """One send that failed for good, with its reason and detail (for `settle_each`)."""

    send: Send
    error: str | BaseException
    detail: Mapping[str, Any] = field(default_factory=dict)


def settle(
    sends: Iterable[Send],
    status: FinalStatus,
    *,
    error: str | BaseException | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Make open sends final with one outcome (one send, or a batch); final ones stay as they are.

    Failed sends are dead-lettered together, in one write per destination;
    each ledger is updated once.
    """
    settling = [send for send in sends if send.outcome.status in OPEN]
    if not settling:
        return
    outcomes = [send.outcome for send in settling]
    if detail:
        update_each([outcome.detail for outcome in outcomes], dict(detail))
    text = None if error is None else describe_error(error)
    now = time.time()
    for outcome in outcomes:
        outcome.error = text
        outcome.finished_at = now
    _settle(settling, outcomes, status)


def settle_each(settlements: Iterable[Delivered | Failure]) -> None:
    """Make open sends final, each with its own outcome (one dead-letter write, one count)."""
    now = time.time()
    by_status: dict[FinalStatus, tuple[list[Send], list[Outcome]]] = {}
    for settlement in settlements:
        send = settlement.send
        outcome = send.outcome
        if outcome.status not in OPEN:
            continue
        if settlement.detail:
            outcome.detail.update(settlement.detail)
        if isinstance(settlement, Failure):
            status: FinalStatus = "failed"
            outcome.error = describe_error(settlement.error)
        else:
            status = "delivered"
            outcome.error = None
        outcome.finished_at = now
        sends, outcomes = by_status.setdefault(status, ([], []))
        sends.append(send)
        outcomes.append(outcome)
    for status, (sends, outcomes) in by_status.items():
        _settle(sends, outcomes, status)


def reschedule(
    sends: Iterable[Send],
    error: str | BaseException,
    *,
    next_try_at: float | None = None,
    **detail: Any,
) -> None:
    """Record a failed attempt of open sends that will be tried again (status `retrying`).

    Not final: the destination keeps the send and tries again at `next_try_at`
    (wall clock). With a journal, this is where a retry is handed back to it:
    the entry that holds the send records its attempts and next try
    (`JournalEntry.send_rescheduled`), so a restart resumes the backoff
    instead of starting it over.
    """
    text = describe_error(error)
    retries: collections.Counter[tuple[Ledger, str]] = collections.Counter()
    started: collections.Counter[tuple[Ledger, str]] = collections.Counter()
    for send in sends:
        outcome = send.outcome
        if outcome.status not in OPEN:
            continue
        if outcome.status == "pending" and outcome.ledger is not None:
            started[outcome.ledger, send.destination] += 1
        outcome.status = "retrying"
        outcome.error = text
        outcome.next_try_at = next_try_at
        if detail:
            outcome.detail.update(detail)
        if outcome.ledger is not None:
            retries[outcome.ledger, send.destination] += 1
        if outcome.entry is not None:
            outcome.entry.send_rescheduled(send)
    for (ledger, destination), count in retries.items():
        ledger.count(destination, "retries", count)
    for (ledger, destination), count in started.items():
        ledger.count(destination, "retrying", count)  # a gauge: sends in backoff now


def _stop_retrying(sends: Iterable[Send], ledgers: Iterable[Ledger | None]) -> None:
    """Sends that were in backoff are not any more (final, or left): the gauge goes down."""
    ended: collections.Counter[tuple[Ledger, str]] = collections.Counter()
    for send, ledger in zip(sends, ledgers, strict=True):
        if ledger is not None and send.outcome.status == "retrying":
            ended[ledger, send.destination] += 1
    for (ledger, destination), count in ended.items():
        ledger.count(destination, "retrying", -count)


def _settle(settling: list[Send], outcomes: list[Outcome], status: FinalStatus) -> None:
    """The one place where open sends become final (their detail, error and time already set).

    A failure is dead-lettered first, while the send still holds its payload;
    then the outcome is final, the send drops its payload and the outcome its
    ledger, the journal entries that hold them are told (an entry whose sends
    are all final is acknowledged: at-least-once ends here, never earlier),
    and each ledger counts its own.
    """
    ledgers = [outcome.ledger for outcome in outcomes]
    if status == "failed":
        _dead_letter(settling, ledgers)
    # `map` with attrgetters: C loops, run for every settle with or without a journal.
    entries = list(map(_entry_of, outcomes))
    if "retrying" in map(_status_of, outcomes):
        _stop_retrying(settling, ledgers)
    for outcome in outcomes:
        outcome.status = status
        outcome.ledger = None
        outcome.entry = None
    for send in settling:
        send._payload = None  # the one field of a send that changes: its payload is let go
    if entries[0] is not None or (len(entries) > 1 and any(entries)):
        _tell_entries(entries)
    if len(settling) == 1:  # one send (most per-send destinations): no grouping to do
        if ledgers[0] is not None:
            ledgers[0].finished(settling[0])
        return
    distinct = set(ledgers) - {None}
    if len(distinct) == 1 and None not in ledgers:  # the usual: one runtime's sends
        distinct.pop().finished_many(settling)
        return
    for ledger in distinct:  # each ledger counts its own
        ledger.finished_many([s for s, of in zip(settling, ledgers, strict=True) if of is ledger])


def _tell_entries(entries: list[JournalEntry | None]) -> None:
    """Tell each journal entry how many of its sends just became final (one call per entry)."""
    if len(entries) == 1:
        entries[0].sends_final(1)  # type: ignore[union-attr]
        return
    for entry, count in collections.Counter(entries).items():
        if entry is not None:
            entry.sends_final(count)


def leave_in_journal(sends: Iterable[Send], reason: str) -> int:
    """Let go of open sends that a journal keeps for the next start (a stop that timed out).

    Not a settle: nothing is acknowledged and nothing dead-lettered; the sends
    stay `pending` with `reason` as their error, and their ledger stops waiting
    for them (counted as `left_in_journal`). Returns how many were left.
    """
    left: collections.Counter[tuple[Ledger, str]] = collections.Counter()
    sends = [send for send in sends if send.outcome.status in OPEN]
    _stop_retrying(sends, [send.outcome.ledger for send in sends])
    for send in sends:
        outcome = send.outcome
        if outcome.status not in OPEN:
            continue
        outcome.error = reason
        outcome.entry = None
        if outcome.ledger is not None:
            left[outcome.ledger, send.destination] += 1
        outcome.ledger = None
    for (ledger, destination), count in left.items():
        ledger.left_in_journal(destination, count)
    return sum(left.values())


def _dead_letter(sends: Sequence[Send], ledgers: Sequence[Ledger | None]) -> None:
    """Hand sends that are failing now to their ledger's dead-letter store, one call per store.

    Sends without a ledger (made outside a runtime) are left alone; those their
    destination already wrote in its own form go to the store's
    `written_natively` if it has one (the journal keeps S3 objects too).
    """
    by_store: dict[Any, list[Send]] = {}
    natively: dict[Any, list[Send]] = {}
    for send, ledger in zip(sends, ledgers, strict=True):
        store = ledger.dead_letters if ledger is not None else None
        if store is not None:
            written = "dead_letter" in (send.outcome._detail or ())
            (natively if written else by_store).setdefault(store, []).append(send)
    for store, group in by_store.items():
        try:
            store.write(group)
        except Exception:  # the store's own bug must not keep a send from settling
            logger.exception("dead-lettering %d failed sends raised", len(group))
    for store, group in natively.items():
        written_natively = getattr(store, "written_natively", None)
        try:
            if written_natively is not None:
                written_natively(group)
        except Exception:
            logger.exception("keeping %d natively dead-lettered sends raised", len(group))
    if by_store or natively:
        _count_dead_letters(sends, ledgers)


def _count_dead_letters(sends: Sequence[Send], ledgers: Sequence[Ledger | None]) -> None:
    """Count, per ledger and destination, the failed sends now in a dead-letter file
    (`dead_lettered`) and those that could not be written (`dead_letter_errors`)."""
    counts: collections.Counter[tuple[Ledger, str, str]] = collections.Counter()
    for send, ledger in zip(sends, ledgers, strict=True):
        detail = send.outcome._detail
        if ledger is None or not detail:
            continue
        if "dead_letter" in detail:
            counts[ledger, send.destination, "dead_lettered"] += 1
        elif "dead_letter_error" in detail:
            counts[ledger, send.destination, "dead_letter_errors"] += 1
    for (ledger, destination, counter), count in counts.items():
        ledger.count(destination, counter, count)


def describe_error(error: str | BaseException) -> str:
    """An error as the text a send's outcome keeps: `"Type: message"` for an exception."""
    if isinstance(error, BaseException):
        text = str(error)
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return error


class JournalEntry(Protocol):
    """The journal message that holds sends (`outbound.journal.entries.SendsEntry`)."""

    def sends_final(self, count: int) -> None:
        """`count` of its sends just became final; must not raise."""

    def send_rescheduled(self, send: Send) -> None:
        """`send` failed an attempt and waits until `send.outcome.next_try_at`: keep its
        attempts and next try for a restart (soon; must not block or raise)."""


class DeadLetterStore(Protocol):
    """Where failed sends are written (`destinations.deadletter.DeadLetterWriter`)."""

    def write(self, sends: Sequence[Send]) -> None:
        """Write sends failing now; must not raise; may add to their `detail`."""


class Ledger:
    """The sends of recent runs, counters, and the count of unfinished sends.

    Every run and every final delivery passes through here, from many threads.
    The writes hold a plain lock only for int and dict updates without calls or
    loops (where the interpreter may switch threads: a thread switched out
    while holding the lock makes every other thread that wants it queue behind
    it), and wake waiters (`flush`, `stop`) only when a count reaches zero.
    """

    def __init__(
        self,
        run_history: int = 10_000,
        *,
        delivery_history: int = 200_000,
        dead_letters: DeadLetterStore | None = None,
        on_final: Callable[[str, int], None] | None = None,
    ) -> None:
        #: Where the settle path writes every send that fails (None: nowhere).
        self.dead_letters = dead_letters
        # Told `(destination, count)` of sends that just became final (the runtime's
        # admission bound gives their room back); called outside the lock.
        self._on_final = on_final
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)  # waits for a count to reach zero
        # The history: the last `run_history` runs, fewer when they hold more than
        # `delivery_history` records (a few huge runs must not keep millions).
        self._run_history = run_history
        self._delivery_history = delivery_history
        self._runs: collections.OrderedDict[str, tuple[Any, list[Send]]] = collections.OrderedDict()
        self._records_kept = 0
        self._history_lock = threading.Lock()
        # (destination, counter) -> count; run status -> count
        self._counts: collections.defaultdict[tuple[str, str], int] = collections.defaultdict(int)
        self._run_counts: collections.defaultdict[str, int] = collections.defaultdict(int)
        # (workflow id, run status) -> count, in the order workflows first finished a run
        self._workflow_run_counts: collections.defaultdict[tuple[str, str], int] = (
            collections.defaultdict(int)
        )
        self._unfinished = 0
        # Runs started and ended, counted apart: `run_started` is on the path of
        # every submit, and sharing a lock there with the run threads and the
        # destination actors made submitting threads queue behind them: 2.6 of
        # 3.9 s of 20k submits (measured).
        self._start_lock = threading.Lock()
        self._runs_started = 0
        self._runs_ended = 0
        self._hand_offs = 0  # finished runs whose sends are not yet told to destinations
        self._listeners: list[Callable[[Send], None]] = []
        self._run_listeners: list[Callable[[Any], None]] = []
        self._start_listeners: list[Callable[[Any], None]] = []

    # -- writes -----------------------------------------------------------------

    def run_started(self, run: Any = None) -> None:
        """Count a run that starts; `run` (its `RunFuture`: `run_id`, `workflow_id`,
        `submitted_at`) goes to the start listeners (`add_start_listener`)."""
        with self._start_lock:
            self._runs_started += 1
        if run is not None:
            for listener in self._start_listeners:
                listener(run)

    def run_finished(self, result: Any, sends: Iterable[Send] = ()) -> None:
        """Keep a run's result and register its sends' records, before they are handed over.

        A run with sends counts as a pending hand-off until `handed_off()`, so
        `wait_hand_offs` can tell when every send has reached its destination.
        """
        records = list(sends)
        sent = len(records)
        destinations = [send._destination for send in records]
        for send in records:  # not yet seen by any other thread: no lock needed
            send.outcome.ledger = self
        # Kept before the run counts as ended, so whoever waited for it finds it.
        # (Its own lock: only run-finishing threads meet here. What is dropped is
        # freed after it is released.)
        runs, dropped = self._runs, []
        with self._history_lock:
            runs[result.run_id] = (result, records)
            self._records_kept += sent
            while len(runs) > self._run_history or (
                self._records_kept > self._delivery_history and len(runs) > 1
            ):
                dropped.append(runs.popitem(last=False))
                self._records_kept -= len(dropped[-1][1][1])
        del dropped
        # The usual run sends to one destination: its counter is updated without a loop.
        single = None
        if sent and destinations.count(destinations[0]) == sent:
            single = (destinations[0], "accepted")
        counts, run_counts, status = self._counts, self._run_counts, result.status
        by_workflow = (getattr(result, "workflow_id", ""), status)
        with self._mutex:
            if sent:
                self._hand_offs += 1
                self._unfinished += sent
                if single is not None:
                    counts[single] += sent
            run_counts[status] += 1
            self._workflow_run_counts[by_workflow] += 1
            self._runs_ended += 1
            idle = self._runs_started == self._runs_ended
        if sent and single is None:
            for destination, count in collections.Counter(destinations).items():
                self.count(destination, "accepted", count)
        if idle:
            self._wake()
        for listener in self._run_listeners:
            listener(result)

    def recovered(self, sends: list[Send], counter: str = "recovered") -> None:
        """Count sends a journal handed back at start (accepted by an earlier process), or
        dead letters sent again (`counter="replayed"`)."""
        for send in sends:
            send.outcome.ledger = self
        with self._mutex:
            self._unfinished += len(sends)
        for destination, count in collections.Counter(s._destination for s in sends).items():
            self.count(destination, "accepted", count)
            self.count(destination, counter, count)
        in_backoff = collections.Counter(s._destination for s in sends if s.status == "retrying")
        for destination, count in in_backoff.items():
            self.count(destination, "retrying", count)  # recovered in backoff (a journal's record)

    def left_in_journal(self, destination: str, count: int) -> None:
        """`count` open sends were left to the journal at stop: no longer waited for."""
        counts = self._counts
        with self._mutex:
            counts[destination, "left_in_journal"] += count
            self._unfinished -= count
            idle = self._unfinished == 0 and self._runs_started == self._runs_ended
        if self._on_final is not None:
            self._on_final(destination, count)
        if idle:
            self._wake()

    def handed_off(self, runs: int) -> None:
        """`runs` finished runs' sends have been told to their destinations."""
        with self._mutex:
            self._hand_offs -= runs
            idle = self._hand_offs == 0
        if idle:
            self._wake()

    def finished(self, send: Send) -> None:
        """Count one send that just became final (`finished_many` without its grouping)."""
        destination = send.destination
        key = (destination, send.outcome.status)
        counts = self._counts
        with self._mutex:
            counts[key] += 1
            self._unfinished -= 1
            idle = self._unfinished == 0 and self._runs_started == self._runs_ended
            listeners = self._listeners
        if self._on_final is not None:
            self._on_final(destination, 1)
        if idle:
            self._wake()
        for listener in listeners:
            listener(send)

    def finished_many(self, records: list[Send]) -> None:
        """Count sends that just became final together, under one lock round trip."""
        finished = collections.Counter(
            [(send._destination, send.outcome.status) for send in records]
        )
        counts, done = self._counts, len(records)
        with self._mutex:
            for key, count in finished.items():
                counts[key] += count
            self._unfinished -= done
            idle = self._unfinished == 0 and self._runs_started == self._runs_ended
            listeners = self._listeners
        on_final = self._on_final
        if on_final is not None:
            for (destination, _status), count in finished.items():
                on_final(destination, count)
        if idle:
            self._wake()
        for listener in listeners:
            for record in records:
                listener(record)

    def count(self, destination: str, counter: str, amount: int = 1) -> None:
        key = (destination, counter)
        counts = self._counts
        with self._mutex:
            counts[key] += amount

    def add_listener(self, listener: Callable[[Send], None]) -> None:
        """Call `listener(send)` on every send that becomes final (keep it cheap)."""
        with self._mutex:
            self._listeners = [*self._listeners, listener]

    def add_run_listener(self, listener: Callable[[Any], None]) -> None:
        """Call `listener(result)` on every run that ends, once it is kept (keep it cheap)."""
        with self._mutex:
            self._run_listeners = [*self._run_listeners, listener]

    def add_start_listener(self, listener: Callable[[Any], None]) -> None:
        """Call `listener(run)` on every run that starts (keep it cheap: the hot path)."""
        with self._mutex:
            self._start_listeners = [*self._start_listeners, listener]

    def remove_listener(self, listener: Callable[[Any], None]) -> None:
        """Stop calling `listener` (added by `add_listener`, `add_run_listener` or
        `add_start_listener`)."""
        with self._mutex:
            self._listeners = [item for item in self._listeners if item != listener]
            self._run_listeners = [item for item in self._run_listeners if item != listener]
            self._start_listeners = [item for item in self._start_listeners if item != listener]

    def _wake(self) -> None:
        """A count reached zero: let waiters check their condition again."""
        with self._changed:
            self._changed.notify_all()

    # -- reads ------------------------------------------------------------------

    @property
    def unfinished(self) -> int:
        return self._unfinished

    @property
    def runs_in_flight(self) -> int:
        # Each count is read at once (an int attribute): a run started meanwhile
        # only makes this larger, never zero too early.
        return self._runs_started - self._runs_ended

    def wait_runs(self, timeout: float | None) -> bool:
        """Wait until no run is in flight; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.runs_in_flight == 0, timeout)

    def wait_hand_offs(self, timeout: float | None) -> bool:
        """Wait until every finished run's sends were told to their destinations."""
        with self._changed:
            return self._changed.wait_for(lambda: self._hand_offs == 0, timeout)

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no run is in flight and every send is final; False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._unfinished == 0 and self.runs_in_flight == 0, timeout
            )

    def deliveries(self, run_id: str) -> list[Delivery]:
        return [record.snapshot() for record in list(self._kept_run(run_id)[1])]

    def run(self, run_id: str) -> Any:
        return self._kept_run(run_id)[0]

    def kept_runs(self) -> list[tuple[Any, list[Send]]]:
        """The runs of the history, newest (the last to end) first, as `(result, sends)`.

        A copy taken under the history lock (one C-level copy, so run-finishing
        threads wait for no loop); the sends are the live records: read their
        status, do not change them.
        """
        with self._history_lock:
            kept = list(self._runs.values())
        kept.reverse()
        return kept

    def _kept_run(self, run_id: str) -> tuple[Any, list[Send]]:
        entry = self._runs.get(run_id)
        if entry is None:
            raise KeyError(
                f"no run {run_id!r} in the history: the last {self._run_history} runs "
                f"(run_history), fewer when they hold over {self._delivery_history} "
                "deliveries (delivery_history)"
            )
        return entry

    def stats(self) -> dict[str, Any]:
        with self._mutex:
            counts = dict(self._counts)
            runs = dict(self._run_counts)
            workflow_runs = list(self._workflow_run_counts.items())
            unfinished = self._unfinished
            in_flight = self.runs_in_flight
        runs_by_workflow: dict[str, dict[str, int]] = {}  # workflows in first-finished order
        for (workflow_id, status), count in workflow_runs:
            runs_by_workflow.setdefault(workflow_id, {})[status] = count
        destinations: dict[str, dict[str, int]] = {}
        for (destination, counter), count in counts.items():
            destinations.setdefault(destination, {})[counter] = count
        for counter in destinations.values():
            counter.setdefault("delivered", 0)
            counter.setdefault("failed", 0)
            counter["pending"] = (
                counter.get("accepted", 0)
                - counter["delivered"]
                - counter["failed"]
                - counter.get("left_in_journal", 0)
            )
        return {
            "runs": runs,
            "runs_by_workflow": runs_by_workflow,
            "runs_in_flight": in_flight,
            "destinations": destinations,
            "unfinished": unfinished,
        }
