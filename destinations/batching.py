"""Size-, count- and age-triggered batching, shared by the S3 and SQL destinations.

Owns `BatchLimits`, `Batch`, `BatchWork` (its durable work) and
`BatchingDestination`, an actor base that keeps one open buffer per key
(bucket+prefix, table), seals it when the first trigger fires (`max_events`,
`max_bytes`, or `max_age` from the buffer's first event, checked on a timer
tick), and writes sealed batches through the subclass's `write_batch` with the
shared backoff policy.

Open buffers and sealed batches live in the actor's durable work (`BatchWork`),
so a restarted batcher keeps them. What a batch holds is released from the
memory budget (`destinations.budget`) only once the batch is final (written,
failed for good, or dead-lettered). A batch that fails for good, and rows
refused alone, are failed together, so the settle path dead-letters them in one
write (or the subclass writes its native form first: S3's `.gz` objects). While
a batch keeps failing, the actor's `DestinationStatus` says since when, for
`Runtime.health()`. A batch whose oldest send is past the retry window
(`OUTBOUND_RETRY_FOR`) fails for good at its next failed write. Subclasses
decide the wire format and the service; this module must not import any
service client.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import operator
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from outbound.actors import LoopResult
from outbound.actors.loops import LoopThread
from outbound.destinations.backoff import Backoff
from outbound.destinations.base import WORK_KEY, Destination, DurableWork, Services, given_up
from outbound.destinations.budget import MemoryBudget
from outbound.destinations.delivery import (
    OPEN,
    Delivered,
    Failure,
    Send,
    describe_error,
    reschedule,
)

logger = logging.getLogger(__name__)

_batch_ids = itertools.count(1)
_size_of = operator.attrgetter("size")


@dataclass(frozen=True)
class BatchLimits:
    max_events: int = 10_000
    max_bytes: int = 8 * 1024 * 1024
    max_age: float = 60.0

    @property
    def tick(self) -> float:
        """How often buffers are checked for age: a batch is flushed within max_age + tick."""
        return max(0.05, min(1.0, self.max_age / 10))


@dataclass(eq=False)
class Batch:
    """Sends buffered under one key; once sealed it is written as one unit."""

    key: Hashable
    sends: list[Send] = field(default_factory=list)
    nbytes: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_batch_ids))
    attempts: int = 0
    last_error: str | None = None
    failing_since: float | None = None  # time.monotonic() of its first failed attempt
    writing: bool = False
    prepared: Any = None  # the subclass's encoded form, kept across retries


def _only_open_sends(batch: Batch) -> bool:
    """Drop sends settled meanwhile (a crash's recovery fails them) from `batch`, whose
    encoded form then goes too: a final send has let go of its payload. False if
    none is left."""
    still_open = [send for send in batch.sends if send.outcome.status in OPEN]
    if len(still_open) < len(batch.sends):
        batch.sends = still_open
        batch.prepared = None
    return bool(batch.sends)


@dataclass
class BatchWork(DurableWork):
    """A batcher's durable work: open buffers by key, and sealed batches not yet final."""

    buffers: dict[Hashable, Batch] = field(default_factory=dict)
    sealed: dict[int, Batch] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BatchWritten:
    """What `write_batch` returns: detail for every send, and the sends that failed alone."""

    detail: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # delivery id -> error


class PermanentBatchError(Exception):
    """Raised by `write_batch` when retrying cannot help (e.g. the bucket does not exist)."""


@dataclass(frozen=True, slots=True)
class _Tick:
    """Timer message: seal the buffers older than `max_age`."""


@dataclass(frozen=True, slots=True)
class _RetryBatch:
    """Timer message: the backoff of this sealed batch is over, write it again."""

    batch_id: int


class BatchingDestination(Destination):
    """Base of batched destinations. Subclasses define `batch_key`, `loop` and `write_batch`."""

    batched: ClassVar[bool] = True
    Work: ClassVar[type[DurableWork]] = BatchWork
    counters: ClassVar[tuple[str, ...]] = ("retries", "retrying", "batches_written")
    work: BatchWork

    def __init__(self, services: Services, limits: BatchLimits | None = None) -> None:
        super().__init__(services=services)
        config = services.config
        self.limits = limits or BatchLimits(
            config.batch_max_events, config.batch_max_bytes, config.batch_max_age
        )
        self.budget = services.budget
        # Batches keep retrying (a store that is down for minutes should not lose
        # data) until the oldest send in them is past the retry window
        # (OUTBOUND_RETRY_FOR); shutdown dead-letters whatever is still unwritten.
        self.backoff = Backoff(
            config.retry_base, config.retry_cap, max_attempts=10**9, retry_for=config.retry_for
        )
        self._tick_timer: Any = None

    # -- to implement ------------------------------------------------------------

    def batch_key(self, send: Send) -> Hashable:
        raise NotImplementedError

    def batch_keys(self, sends: list[Send]) -> list[Hashable]:
        """`batch_key` of each send (override to compute them in bulk)."""
        return list(map(self.batch_key, sends))

    @property
    def loop(self) -> LoopThread:
        """The event loop `write_batch` runs on."""
        raise NotImplementedError

    def write_batch(self, batch: Batch) -> Callable[[], Awaitable[BatchWritten]]:
        """Return a coroutine function that writes `batch` (called on `self.loop`).

        Runs off the actor thread: it may read `batch` but must not touch actor
        state. Raise to have the whole batch retried; raise
        `PermanentBatchError` to fail every send in it for good.
        """
        raise NotImplementedError

    def dead_letter_batches(self, batches: list[Batch], data_dir: Path, reason: str) -> str | None:
        """Write batches given up on in a native form; returns where (None: not written).

        By default nothing is written here: failing the sends dead-letters
        them as JSON lines (`dead_letter_fields`), one write for all.
        """
        return None

    # -- durable state -------------------------------------------------------------

    @property
    def buffers(self) -> dict[Hashable, Batch]:
        """Open batches by key."""
        return self.work.buffers

    @property
    def sealed(self) -> dict[int, Batch]:
        """Sealed batches not yet final, by batch id."""
        return self.work.sealed

    @property
    def buffered_bytes(self) -> int:
        return sum(batch.nbytes for batch in self.buffers.values()) + sum(
            batch.nbytes for batch in self.sealed.values()
        )

    # -- lifecycle -------------------------------------------------------------------

    def holds(self) -> set[str]:
        batches = itertools.chain(self.buffers.values(), self.sealed.values())
        return {send.id for batch in batches for send in batch.sends}

    def recover(self) -> None:
        self._tick_timer = self.services.timers.every(self.limits.tick, self.stable_ref, _Tick())
        self._report_retrying()
        for batch in self.sealed.values():
            if not batch.writing:
                self._write(batch)

    def on_stop(self) -> None:
        if self._tick_timer is not None:
            self._tick_timer.cancel()

    def on_crash(self, error: BaseException | None) -> None:
        if self._tick_timer is not None:  # the next incarnation starts its own
            self._tick_timer.cancel()
        super().on_crash(error)

    # -- buffering -------------------------------------------------------------------

    def deliver(self, sends: list[Send]) -> None:
        keys = self.batch_keys(sends)
        if len(set(keys)) == 1:  # the common case: every send for one buffer
            self._buffer(keys[0], sends)
            return
        groups: dict[Hashable, list[Send]] = {}
        for key, send in zip(keys, sends, strict=True):
            groups.setdefault(key, []).append(send)
        for key, group in groups.items():
            self._buffer(key, group)

    def _buffer(self, key: Hashable, sends: list[Send]) -> None:
        """Add `sends` to the open buffer of `key`, sealing it whenever a trigger fires.

        Whole runs of sends are added at once; a batch is sealed after the send
        that reaches `max_events` or `max_bytes`, as if they came one by one.
        """
        buffers, limits = self.buffers, self.limits
        start = 0
        while start < len(sends):
            batch = buffers.get(key)
            if batch is None:
                batch = buffers[key] = Batch(key)
            fitting = sends[start : start + limits.max_events - len(batch.sends)]
            totals = list(itertools.accumulate(map(_size_of, fitting), initial=batch.nbytes))
            reaching = bisect.bisect_left(totals, limits.max_bytes, lo=1)  # 1: the first send
            taken = fitting[:reaching]
            batch.sends.extend(taken)
            batch.nbytes = totals[len(taken)]
            start += len(taken)
            if len(batch.sends) >= limits.max_events or batch.nbytes >= limits.max_bytes:
                self._seal(key)

    def handle(self, message: Any) -> Any:
        if isinstance(message, _Tick):
            now = time.monotonic()
            for key, batch in list(self.buffers.items()):
                if now - batch.opened_at >= self.limits.max_age:
                    self._seal(key)
            return None
        if isinstance(message, _RetryBatch):
            batch = self.sealed.get(message.batch_id)
            if batch is not None and not batch.writing:
                self._write(batch)
            return None
        return super().handle(message)

    def flush(self) -> None:
        for key in list(self.buffers):
            self._seal(key)
        # A flush also cuts short any backoff: try failed batches again now.
        for batch in self.sealed.values():
            if not batch.writing:
                self._write(batch)

    def _seal(self, key: Hashable) -> None:
        batch = self.buffers.pop(key)
        self.sealed[batch.id] = batch
        self._write(batch)

    # -- writing ---------------------------------------------------------------------

    def _write(self, batch: Batch) -> None:
        if not _only_open_sends(batch):
            self._drop_batch(batch)  # every send in it was settled meanwhile
            return
        batch.writing = True
        batch.attempts += 1
        for send in batch.sends:  # a send recovered from the journal goes on from its count
            send.outcome.attempts += 1
        self.loop.spawn(self.write_batch(batch), reply_to=self.stable_ref, tag=batch.id)

    def on_loop_result(self, result: LoopResult) -> None:
        batch = self.sealed.get(result.tag)
        if batch is None:  # dead-lettered meanwhile
            return
        batch.writing = False
        error = result.error
        if error is None:
            written: BatchWritten = result.value
            if not written.failed:  # the common case: one ledger update for the batch
                self.settle(batch.sends, "delivered", detail=written.detail)
            else:  # rows refused alone: one write to the dead letters for all of them
                refused = written.failed
                self.settle_each(
                    [
                        Failure(send, refused[send.id], written.detail)
                        if send.id in refused
                        else Delivered(send, written.detail)
                        for send in batch.sends
                    ]
                )
            self._drop_batch(batch)
            self.services.ledger.count(self.name, "batches_written")
            return
        batch.last_error = describe_error(error)
        if isinstance(error, PermanentBatchError):
            self._fail_batch(batch, str(error))
            return
        oldest = min(send.accepted_at for send in batch.sends)
        gave_up = self.backoff.give_up_reason(batch.attempts, oldest)
        if gave_up is not None:  # the window is over for its oldest send
            self._fail_batch(batch, f"{batch.last_error} ({gave_up})")
            return
        delay = self.backoff.delay(batch.attempts)
        reschedule(batch.sends, batch.last_error, next_try_at=time.time() + delay)
        if batch.failing_since is None:
            batch.failing_since = time.monotonic()
        self._report_retrying()
        self.services.timers.after(delay, self.stable_ref, _RetryBatch(batch.id))

    def _fail_batch(self, batch: Batch, error: str) -> None:
        """A batch retrying cannot help: dead-letter it (natively if the subclass can), fail it."""
        detail = self._dead_letter_natively([batch], self.services.config.data_dir, error)
        self.settle(batch.sends, "failed", error=error, detail=detail)
        self._drop_batch(batch)

    def _dead_letter_natively(
        self, batches: list[Batch], data_dir: Path, reason: str
    ) -> dict[str, str]:
        """Write batches in the subclass's native form; the detail that names where (or none).

        When that fails, or there is none, the settle path writes their sends as JSON lines.
        """
        try:
            where = self.dead_letter_batches(batches, data_dir, reason)
        except Exception:
            logger.exception(
                "%s: writing batch %d in its dead-letter form failed; writing JSON lines",
                self.name,
                batches[0].id,
            )
            return {}
        return {"dead_letter": where} if where else {}

    def _drop_batch(self, batch: Batch) -> None:
        """Forget a batch whose sends are all final, and give back its memory budget."""
        self.sealed.pop(batch.id, None)
        self.budget.release(batch.nbytes)
        if batch.failing_since is not None:
            self._report_retrying()

    def _report_retrying(self) -> None:
        """Publish since when the oldest sealed batch has been failing (None: none is)."""
        failing = [b for b in self.sealed.values() if b.failing_since is not None]
        status = self.services.status_of(self.name)
        status.retrying_batches = len(failing)
        if not failing:
            status.retrying_since = None
            return
        oldest = min(failing, key=_failing_since)
        status.retrying_since, status.last_error = oldest.failing_since, oldest.last_error

    # -- shutdown --------------------------------------------------------------------

    def dead_letter(self, data_dir: Path, reason: str) -> int:
        batches = list(self.sealed.values()) + list(self.buffers.values())
        self.sealed.clear()
        self.buffers.clear()
        self._report_retrying()
        for batch in batches:
            self.budget.release(batch.nbytes)
        batches = [batch for batch in batches if _only_open_sends(batch)]
        count = 0
        if batches:
            detail = self._dead_letter_natively(batches, data_dir, reason)
            self.settle_each(
                [
                    Failure(send, given_up(reason, send), detail)
                    for batch in batches
                    for send in batch.sends
                ]
            )
            count = sum(len(batch.sends) for batch in batches)
        return count + super().dead_letter(data_dir, reason)


def release_held(durable: Mapping[str, Any], budget: MemoryBudget) -> None:
    """Give back the memory budget a batcher that will not run again still held.

    For the runtime, when it settles the sends of a destination actor that is
    gone (the supervisor gave up on it) or stuck: its batches never finish.
    """
    work = durable.get(WORK_KEY)
    if not isinstance(work, BatchWork):
        return
    buffers, sealed = work.buffers, work.sealed
    work.buffers, work.sealed = {}, {}
    budget.release(sum(batch.nbytes for batch in [*buffers.values(), *sealed.values()]))


_failing_since = operator.attrgetter("failing_since")
