"""Delivery records and the ledger that counts them.

Owns `Delivery` (one per send: pending -> retrying -> delivered | failed),
`Outgoing` (a send on its way to a destination actor: its record, plus what to
deliver) and `Ledger` (the records of recent runs, counters per destination,
and the number of deliveries not yet final, which `flush()` and `stop()` wait
on). Destination actors report outcomes through the record's own methods
(`delivered`, `retrying`, `failed`), so a custom destination needs nothing
else.

The settle path: a record becomes final once, through `Delivery._finish` (one
record), `finish_all` (many with one outcome) or `fail_each` (many failures,
each with its own error). A failure is handed to the ledger's dead-letter store
(`Ledger.dead_letters`, a `destinations.deadletter.DeadLetterWriter` in a
runtime) right there, before the record lets go of its payload, all records of
one call in one write; a record whose `detail["dead_letter"]` already names
where its destination wrote it natively is not written again. Delivered records
pay nothing for this. Must not touch actors, loops or any network client.
"""

from __future__ import annotations

import collections
import itertools
import logging
import operator
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Literal, Protocol

logger = logging.getLogger(__name__)

DeliveryStatus = Literal["pending", "retrying", "delivered", "failed"]
FINAL: frozenset[str] = frozenset({"delivered", "failed"})
OPEN: frozenset[str] = frozenset({"pending", "retrying"})  # every other status


@dataclass(slots=True, eq=False)
class Delivery:
    """What happened to one send. Read it with `Runtime.deliveries(run_id)`."""

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
    _ledger: Ledger | None = field(default=None, repr=False)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def delivered(self, **detail: Any) -> None:
        """Mark the send delivered; `detail` adds e.g. status code, object key or table."""
        self._finish("delivered", None, detail)

    def failed(self, error: str | BaseException, **detail: Any) -> None:
        """Mark the send failed for good, with the reason."""
        self._finish("failed", _describe(error), detail)

    def retrying(self, error: str | BaseException, **detail: Any) -> None:
        """Record a failed attempt that will be tried again."""
        if self.final:
            return
        self.status = "retrying"
        self.error = _describe(error)
        self.detail.update(detail)
        if self._ledger is not None:
            self._ledger.count(self.destination, "retries")

    def _finish(
        self, status: DeliveryStatus, error: str | None, detail: dict[str, Any], report: bool = True
    ) -> Ledger | None:
        """Make the record final; returns its ledger (None if it was final already).

        A final record lets go of its ledger: the ledger keeps records, and
        without a reference back a runtime that is dropped is freed at once
        instead of waiting for the cyclic garbage collector.
        """
        if self.final:
            return None
        self.detail.update(detail)
        self.error = error
        self.finished_at = time.time()
        if status == "failed" and self._ledger is not None:
            _dead_letter([self], [self._ledger])  # before the payload is let go
        self.status = status
        ledger, self._ledger = self._ledger, None
        self._release()
        if report and ledger is not None:
            ledger.finished(self)
        return ledger

    def _release(self) -> None:
        """Let go of what a final record no longer needs (see `Outgoing`)."""

    def snapshot(self) -> Delivery:
        """A detached copy, safe to hand to callers while delivery goes on."""
        return Delivery(
            self.destination,
            self.status,
            self.attempts,
            dict(self.detail),
            self.error,
            self.id,
            self.run_id,
            self.workflow_id,
            self.accepted_at,
            self.finished_at,
        )

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
        }


@dataclass(slots=True, eq=False)
class Outgoing(Delivery):
    """A send on its way to a destination actor: its delivery record, plus what to deliver.

    Record and send are one object: one allocation and one object for the
    garbage collector to track per send instead of two (a quarter fewer full
    collections while a run's sends are alive). The ledger keeps the records
    of recent runs, so a final one lets go of its payload: nothing reads it
    once the send is final, and destinations skip final sends.
    """

    payload: Any = field(default=None, repr=False)
    size: int = 0  # encoded bytes, for memory accounting and dead-letter files
    depth: int = 0  # how many emits led to the run that made this send

    def _release(self) -> None:
        self.payload = None


def new_send(
    destination: str,
    delivery_id: str,
    run_id: str,
    workflow_id: str,
    accepted_at: float,
    payload: Any,
    size: int,
    depth: int,
) -> Outgoing:
    """A send just accepted, pending.

    Arguments by position: a dataclass's generated `__init__` takes keywords of
    a class this size at a third of the speed, and this runs once per send.
    """
    return Outgoing(
        destination,
        "pending",
        0,
        {},
        None,
        delivery_id,
        run_id,
        workflow_id,
        accepted_at,
        None,
        None,
        payload,
        size,
        depth,
    )


def delivered_each(outcomes: Iterable[tuple[Delivery, dict[str, Any]]]) -> None:
    """`Delivery.delivered` for many records, each with its own detail.

    The ledger is updated once per call, not per record: one lock round trip per
    batch matters when runs are handing off on other threads at the same time.
    """
    by_ledger: dict[Ledger, list[Delivery]] = {}
    for record, detail in outcomes:
        ledger = record._finish("delivered", None, detail, report=False)
        if ledger is not None:
            by_ledger.setdefault(ledger, []).append(record)
    for ledger, group in by_ledger.items():
        ledger.finished_many(group)


@dataclass(frozen=True, slots=True)
class Failure:
    """One send that failed for good, with its reason and detail (for `fail_each`)."""

    send: Outgoing
    error: str | BaseException
    detail: dict[str, Any] = field(default_factory=dict)


def finish_all(
    sends: list[Outgoing],
    status: DeliveryStatus,
    detail: dict[str, Any],
    error: str | None = None,
) -> None:
    """Make many sends final with one outcome (a batch): one ledger update per ledger.

    Failed ones are dead-lettered together, in one write per destination.
    """
    finishing = list(itertools.compress(sends, map(OPEN.__contains__, map(_status_of, sends))))
    if detail:
        collections.deque(map(dict.update, map(_detail_of, finishing), repeat(detail)), maxlen=0)
    # The other fields are set in C loops too.
    for field_name, value in (("error", error), ("finished_at", time.time())):
        collections.deque(map(setattr, finishing, repeat(field_name), repeat(value)), maxlen=0)
    _settle(finishing, status)


def fail_each(failures: Iterable[Failure]) -> None:
    """Fail many sends, each with its own error: one dead-letter write and ledger update."""
    now, failing = time.time(), []
    for failure in failures:
        send = failure.send
        if send.status not in OPEN:
            continue
        send.detail.update(failure.detail)
        send.error = _describe(failure.error)
        send.finished_at = now
        failing.append(send)
    _settle(failing, "failed")


def _settle(finishing: list[Outgoing], status: DeliveryStatus) -> None:
    """Make open records final (their detail, error and time already set) and count them.

    A failure is dead-lettered first, while the record still holds its payload;
    then `_ledger` and `payload` let go as in `_finish`.
    """
    ledgers = list(map(_ledger_of, finishing))
    if status == "failed":
        _dead_letter(finishing, ledgers)
    for field_name, value in (("status", status), ("_ledger", None), ("payload", None)):
        collections.deque(map(setattr, finishing, repeat(field_name), repeat(value)), maxlen=0)
    distinct = set(ledgers) - {None}
    if len(distinct) == 1 and None not in ledgers:  # the usual: one runtime's records
        distinct.pop().finished_many(finishing)
        return
    for ledger in distinct:  # each ledger counts its own
        ledger.finished_many([r for r, of in zip(finishing, ledgers, strict=True) if of is ledger])


_destination_of = operator.attrgetter("destination")
_destination_and_status = operator.attrgetter("destination", "status")
_ledger_of = operator.attrgetter("_ledger")
_status_of = operator.attrgetter("status")
_detail_of = operator.attrgetter("detail")
#: The delivery id of a send, for map() over many sends.
delivery_id = operator.attrgetter("id")


def _dead_letter(records: Sequence[Delivery], ledgers: Sequence[Ledger | None]) -> None:
    """Hand records that are failing now to their ledger's dead-letter store, one call per store.

    Records without a ledger (made outside a runtime), and those their
    destination already wrote in its own form, are left alone.
    """
    by_store: dict[Any, list[Delivery]] = {}
    for record, ledger in zip(records, ledgers, strict=True):
        store = ledger.dead_letters if ledger is not None else None
        if store is not None and "dead_letter" not in record.detail:
            by_store.setdefault(store, []).append(record)
    for store, group in by_store.items():
        try:
            store.write(group)
        except Exception:  # the store's own bug must not keep a send from settling
            logger.exception("dead-lettering %d failed sends raised", len(group))


def _describe(error: str | BaseException) -> str:
    if isinstance(error, BaseException):
        text = str(error)
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return error


class DeadLetterStore(Protocol):
    """Where failed sends are written (`destinations.deadletter.DeadLetterWriter`)."""

    def write(self, records: Sequence[Delivery]) -> None:
        """Write records failing now; must not raise; may add to their `detail`."""


class Ledger:
    """Delivery records of recent runs, counters, and the count of unfinished sends.

    Every run and every final delivery passes through here, from many threads.
    The writes hold a plain lock only for int and dict updates without calls or
    loops (where the interpreter may switch threads: a thread switched out
    while holding the lock makes every other thread that wants it queue behind
    it), and wake waiters (`flush`, `stop`) only when a count reaches zero.
    """

    def __init__(
        self,
        run_history: int = 10_000,
        clock: Callable[[], float] = time.time,
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
        self._runs: collections.OrderedDict[str, tuple[Any, list[Delivery]]] = (
            collections.OrderedDict()
        )
        self._records_kept = 0
        self._history_lock = threading.Lock()
        # (destination, counter) -> count; run status -> count
        self._counts: collections.defaultdict[tuple[str, str], int] = collections.defaultdict(int)
        self._run_counts: collections.defaultdict[str, int] = collections.defaultdict(int)
        self._unfinished = 0
        # Runs started and ended, counted apart: `run_started` is on the path of
        # every submit, and sharing a lock there with the run threads and the
        # destination actors made submitting threads queue behind them: 2.6 of
        # 3.9 s of 20k submits (measured).
        self._start_lock = threading.Lock()
        self._runs_started = 0
        self._runs_ended = 0
        self._hand_offs = 0  # finished runs whose sends are not yet told to destinations
        self._listeners: list[Callable[[Delivery], None]] = []
        self.clock = clock

    # -- writes -----------------------------------------------------------------

    def run_started(self) -> None:
        with self._start_lock:
            self._runs_started += 1

    def run_finished(self, result: Any, sends: Iterable[Outgoing] = ()) -> None:
        """Keep a run's result and register its sends' records, before they are handed over.

        A run with sends counts as a pending hand-off until `handed_off()`, so
        `wait_hand_offs` can tell when every send has reached its destination.
        """
        records = list(sends)
        sent = len(records)
        destinations = list(map(_destination_of, records))
        # Not yet seen by any other thread: no lock needed. (A loop in C: runs
        # hand off thousands of records a second.)
        collections.deque(map(setattr, records, repeat("_ledger"), repeat(self)), maxlen=0)
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
        with self._mutex:
            if sent:
                self._hand_offs += 1
                self._unfinished += sent
                if single is not None:
                    counts[single] += sent
            run_counts[status] += 1
            self._runs_ended += 1
            idle = self._runs_started == self._runs_ended
        if sent and single is None:
            for destination, count in collections.Counter(destinations).items():
                self.count(destination, "accepted", count)
        if idle:
            self._wake()

    def handed_off(self, runs: int) -> None:
        """`runs` finished runs' sends have been told to their destinations."""
        with self._mutex:
            self._hand_offs -= runs
            idle = self._hand_offs == 0
        if idle:
            self._wake()

    def finished(self, record: Delivery) -> None:
        key = (record.destination, record.status)
        counts = self._counts
        with self._mutex:
            counts[key] += 1
            self._unfinished -= 1
            idle = self._unfinished == 0 and self._runs_started == self._runs_ended
            listeners = self._listeners
        if self._on_final is not None:
            self._on_final(record.destination, 1)
        if idle:
            self._wake()
        for listener in listeners:
            listener(record)

    def finished_many(self, records: list[Delivery]) -> None:
        """`finished` for records that became final together, under one lock round trip."""
        finished = collections.Counter(map(_destination_and_status, records))
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

    def add_listener(self, listener: Callable[[Delivery], None]) -> None:
        """Call `listener(record)` on every delivery that becomes final (keep it cheap)."""
        with self._mutex:
            self._listeners = [*self._listeners, listener]

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

    def _kept_run(self, run_id: str) -> tuple[Any, list[Delivery]]:
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
            unfinished = self._unfinished
            in_flight = self.runs_in_flight
        destinations: dict[str, dict[str, int]] = {}
        for (destination, counter), count in counts.items():
            destinations.setdefault(destination, {})[counter] = count
        for counter in destinations.values():
            counter.setdefault("delivered", 0)
            counter.setdefault("failed", 0)
            counter["pending"] = (
                counter.get("accepted", 0) - counter["delivered"] - counter["failed"]
            )
        return {
            "runs": runs,
            "runs_in_flight": in_flight,
            "destinations": destinations,
            "unfinished": unfinished,
        }
