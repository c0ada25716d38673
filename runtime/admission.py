"""Admission: the bound on runs and sends in flight, and `Busy` when a caller waited too long.

Owns `Admission` (a counting gate, like a semaphore whose units are taken by
one party and given back by another), `Busy` and `poll_admission` (waiting for
room from async code without blocking its event loop). The runtime takes a
unit when a run is submitted, turns the run's unit into one per send when the
run hands its sends off, and the ledger gives one back as each send becomes
final. Everything between `submit` and the network (run actors waiting for a
worker, outboxes buffered for hand-off, destination inboxes, the HTTP request
queue, retries waiting for their timer) holds admitted units only, so this one
count bounds them all. Sends to batched destinations (S3, SQL) stop counting
at hand-off: a batch may wait to fill, and the batch memory budget
(`destinations.budget.MemoryBudget`) bounds them instead. Must not import
the runtime, actors or destinations.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Longest sleep between two tries of `poll_admission` (async callers poll; threads are woken).
POLL_AT_MOST = 0.02


class Busy(TimeoutError):
    """`submit(..., timeout=)` found no room before its timeout: `OUTBOUND_MAX_PENDING` runs
    and sends are in flight. Nothing was started; try again later (or wait longer)."""

    def __init__(self, reason: str = "the runtime is full", waited: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.waited = waited  # seconds the caller waited for room

    def __str__(self) -> str:
        return f"{self.reason}; gave up after waiting {self.waited:.3g} s"


class AdmissionClosed(RuntimeError):
    """The runtime began stopping while this caller waited for room; nothing was started."""


class Admission:
    """At most `limit` runs and sends in flight; callers of `admit` wait for room.

    Units: a submitted run holds one from `admit` until it hands off, then each
    of its sends holds one until it is final (`handed_off`, `settle`). A run
    with many sends may take the count past the limit (its sends already exist:
    waiting would only hold a worker); new runs are then admitted once the count
    is back under the limit. Runs started by the runtime's own threads (emitted
    listener runs, a workflow that submits) are counted with `take`, which never
    waits: what frees room may be the very thread that would wait, so waiting
    there could deadlock. The common path (room left) is one lock round trip.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the admission limit must be at least 1, got {limit!r}")
        self.limit = limit
        self.in_flight = 0
        self.waiting = 0  # callers waiting for room now
        self.waits = 0  # admits that had to wait, ever
        self.closed = False
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)

    def admit(
        self, timeout: float | None = None, may_wait: Callable[[], bool] | None = None
    ) -> None:
        """Take one unit, waiting up to `timeout` s for room (None: as long as it takes).

        Raises `Busy` when the timeout passes first (`timeout=0`: at once when
        full) and `AdmissionClosed` if `close()` is called meanwhile. When full,
        `may_wait()` (asked only then) False means the caller is a thread that
        must not wait: it is admitted past the limit instead (unless timeout=0).
        """
        with self._lock:
            if self.in_flight < self.limit:
                self.in_flight += 1
                return
        if timeout == 0:
            raise self._busy(0.0)
        if may_wait is not None and not may_wait():
            self.take()
            return
        self._wait(timeout)

    def _wait(self, timeout: float | None) -> None:
        started = time.monotonic()
        with self._room:
            self.waits += 1
            self.waiting += 1
            try:
                has_room = self._room.wait_for(
                    lambda: self.in_flight < self.limit or self.closed, timeout
                )
            finally:
                self.waiting -= 1
            if self.closed:
                raise AdmissionClosed("the runtime is stopping; this run was not started")
            if not has_room:
                raise self._busy(time.monotonic() - started)
            self.in_flight += 1

    def _busy(self, waited: float) -> Busy:
        return Busy(
            f"no room for another run: {self.in_flight} runs and sends are in flight, "
            f"the limit is {self.limit} (OUTBOUND_MAX_PENDING)",
            waited,
        )

    def take(self, count: int = 1) -> None:
        """Count `count` units without waiting, even past the limit."""
        with self._lock:
            self.in_flight += count

    def handed_off(self, sends: int) -> None:
        """A run handed off `sends` sends: its one unit becomes one per send."""
        if sends > 1:
            self.take(sends - 1)
        elif sends == 0:
            self.settle(1)

    def settle(self, count: int = 1) -> None:
        """Give back `count` units (sends that became final, a run that sent nothing)."""
        if count <= 0:
            return
        with self._lock:
            self.in_flight = max(0, self.in_flight - count)
            if self.waiting:
                self._room.notify(count)

    def close(self) -> None:
        """Stop waiting: waiters and later waits raise `AdmissionClosed` (the runtime stops)."""
        with self._room:
            self.closed = True
            self._room.notify_all()

    def reopen(self) -> None:
        """Start counting afresh (the runtime starts, or starts again after a stop)."""
        with self._room:
            self.closed = False
            self.in_flight = 0


async def poll_admission(
    attempt: Callable[[], T], timeout: float | None = None, first_delay: float = 0.001
) -> T:
    """`attempt()` (a `submit(..., timeout=0)`) until it does not raise `Busy`.

    For async callers (trio or asyncio): between tries it sleeps (1 ms, doubling
    up to `POLL_AT_MOST`), so the event loop goes on. Raises `Busy` once
    `timeout` s have passed. Cancelling it leaves nothing behind: a try either
    started a run or did not.
    """
    import anyio  # here: only async callers need it

    deadline = None if timeout is None else time.monotonic() + timeout
    delay = first_delay
    while True:
        try:
            return attempt()
        except Busy as error:
            if deadline is not None and time.monotonic() >= deadline:
                raise Busy(error.reason, timeout or 0.0) from None
        pause = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
        await anyio.sleep(pause)
        delay = min(delay * 2, POLL_AT_MOST)
