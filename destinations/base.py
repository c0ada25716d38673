"""The destination actor: what every destination (built-in or custom) is.

Owns `Destination`, the messages the runtime sends it (`Deliver`, `Flush`,
`DeadLetter`), `Services` (the shared machinery a destination may use: event
loops, timers, config) and `DurableWork` (what survives its restart). A
destination is a supervised pykka actor: the runtime hands it a run's sends in
one `Deliver` message, and it settles each one through `self.delivered(...)` /
`self.failed(...)` (many at once: `self.settle(...)` / `self.settle_each(...)`),
all of which end in the one settle path of `destinations.delivery`, which
dead-letters a failure at once.

Everything accepted and not yet final is in `self.unfinished`, part of the
actor's `DurableWork` (`self.work`): after a crash the restarted actor still
holds it, and at shutdown whatever is left is failed and dead-lettered.

A crash while taking a `Deliver` must cost only the send that caused it: the
restarted actor hands the interrupted sends it does not already hold (`holds`)
to `deliver` again one at a time, and a send that crashes it alone is failed.
Must not import `runtime`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pykka

from outbound.actors import AsyncioLoop, LoopResult, Supervised, Timers, TrioLoop
from outbound.destinations.budget import AdmissionUnits, MemoryBudget
from outbound.destinations.deadletter import DeadLetterWriter, payload_fields
from outbound.destinations.delivery import (
    Delivered,
    Failure,
    FinalStatus,
    Ledger,
    Send,
    settle,
    settle_each,
)
from outbound.destinations.journaling import JournalPort

if TYPE_CHECKING:
    from outbound.config import Config

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Deliver:
    """A run's sends for this destination, in send order."""

    sends: list[Send]


@dataclass(frozen=True, slots=True)
class Flush:
    """Seal and start writing every open batch or queue now, and retry failing batches
    without waiting out their backoff. Told, never asked: nothing waits for a reply
    (`Runtime.flush` then waits for the sends to settle)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Shutdown: fail every send this destination still holds, dead-lettering each
    (`data_dir` is where a destination with a native form, S3, writes it), and reply
    with how many sends were failed."""

    data_dir: Path
    reason: str


@dataclass
class DestinationStatus:
    """What a destination reports to `Runtime.health()` besides being alive.

    Written by the destination's actor, read by any thread (plain attributes).
    """

    retrying_since: float | None = None  # time.monotonic() of the oldest write still failing
    last_error: str | None = None
    retrying_batches: int = 0  # sealed batches whose writes failed and wait to be retried


@dataclass
class Services:
    """Shared machinery handed to destination actors by the runtime."""

    config: Config
    trio: TrioLoop
    asyncio: AsyncioLoop
    timers: Timers
    ledger: Ledger
    budget: MemoryBudget  # bytes held by batched destinations; hand-offs wait when full
    submit_run: Callable[..., Any] | None = None  # used by emit to start listener runs
    journal: JournalPort | None = None  # the runtime's journal (None: OUTBOUND_JOURNAL=off)
    status: dict[str, DestinationStatus] = field(default_factory=dict)  # by destination name
    admission: AdmissionUnits | None = None  # OUTBOUND_MAX_PENDING's units (HTTP's host shares)

    def status_of(self, destination: str) -> DestinationStatus:
        return self.status.setdefault(destination, DestinationStatus())


@dataclass
class DurableWork:
    """The work a destination actor holds that survives its restart: sends, never resources.

    Kept in the actor's `durable` state under one key (`WORK_KEY`); subclasses
    add their own queues (`RetryWork`, `BatchWork`). Clients, pools and
    threads are not work: a restarted actor makes them again.
    """

    #: Sends accepted and not yet final, by delivery id.
    unfinished: dict[str, Send] = field(default_factory=dict)
    #: The sends of the `Deliver` being taken, while it is taken (set when it crashed).
    accepting: list[Send] | None = None
    #: What the last crash while taking a `Deliver` raised, for the error of its poisonous send.
    crash: str | None = None
    #: True while one interrupted send is taken again alone: if it crashes, it fails.
    alone: bool = False
    #: Interrupted sends waiting to be taken again one at a time.
    suspects: collections.deque[Send] = field(default_factory=collections.deque)


#: The key of a destination's `DurableWork` in its actor's `durable` state.
WORK_KEY = "work"


def unfinished_in(durable: Mapping[str, Any]) -> dict[str, Send]:
    """The unfinished sends in a (stopped) destination actor's durable state, by delivery id."""
    work = durable.get(WORK_KEY)
    return work.unfinished if isinstance(work, DurableWork) else {}


class Destination(Supervised, pykka.ThreadingActor):
    """Base class of destination actors. Override `deliver(sends)`.

    Custom destinations subclass this, report each send with `self.delivered`
    or `self.failed`, and are registered with `Runtime.add_destination(name,
    factory)`, where `factory(config)` returns `MyDestination.start(...)`.
    """

    use_daemon_thread = True
    name = "destination"
    #: The type of this destination's durable work (subclasses with queues extend it).
    Work: ClassVar[type[DurableWork]] = DurableWork
    #: Ledger counters this kind moves beyond accepted/delivered/failed (`retries`,
    #: `batches_written`): made 0 when it starts, so `/metrics` shows each from the start,
    #: and only for the destinations that can move it.
    counters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Config | None = None, services: Services | None = None) -> None:
        super().__init__()
        if self.supervised_name:  # the name it was added under (a custom one may not set `name`)
            self.name = self.supervised_name
        self.config = config if config is not None else (services.config if services else None)
        self.services = services
        work = self.durable.get(WORK_KEY)
        if not isinstance(work, self.Work):
            work = self.durable[WORK_KEY] = self.Work()
        #: What this actor holds that survives a restart (the same object in every incarnation).
        self.work = work
        # Its own dead-letter form, if it has one, is known to the writer before
        # anything can fail (a custom destination has no services: at its first send).
        self._format_known = type(self).dead_letter_fields is Destination.dead_letter_fields
        if services is not None and not self._format_known:
            self._register_format(services.ledger)
        if services is not None:
            for counter in self.counters:
                services.ledger.count(self.name, counter, 0)

    @staticmethod
    def dead_letter_fields(send: Send) -> dict[str, Any]:
        """The fields of a failed send's dead-letter line that let it be sent again.

        Override for a payload that is not plain JSON (the built-in destinations
        do); the default writes `{"payload": send.payload}`.
        """
        return payload_fields(send)

    def _register_format(self, ledger: Ledger | None) -> None:
        writer = ledger.dead_letters if ledger is not None else None
        if isinstance(writer, DeadLetterWriter):
            writer.register_format(self.name, type(self).dead_letter_fields)
            self._format_known = True

    @property
    def unfinished(self) -> dict[str, Send]:
        """Sends accepted and not yet final, by delivery id (durable across restarts)."""
        return self.work.unfinished

    # -- lifecycle ---------------------------------------------------------------

    def on_start(self) -> None:
        work = self.work
        interrupted, work.accepting = work.accepting, None
        alone, work.alone = work.alone, False
        crash, work.crash = work.crash, None
        if interrupted:
            # The previous incarnation crashed while taking these. Those it had
            # taken into its durable state go on from there; of the others, a
            # send that crashed it alone is the poisonous one and fails; several
            # are retried one at a time, so only the poisonous one fails.
            held = self.holds()
            suspects = [s for s in interrupted if not s.final and s.id not in held]
            if len(suspects) == 1 or alone:
                why = crash or "the destination crashed while accepting it"
                for send in suspects:
                    self.failed(send, f"destination {self.name!r} crashed delivering it: {why}")
            elif suspects:
                work.suspects.extendleft(reversed(suspects))
        self.recover()
        self._retry_suspects()

    def _retry_suspects(self) -> None:
        """Deliver the sends of an interrupted `Deliver` again, each in a hand-off of its own."""
        work = self.work
        while work.suspects:
            send = work.suspects.popleft()
            if send.final:
                continue
            work.alone = True  # if this crashes, the next start fails this send
            self._accept([send])
            work.alone = False

    def recover(self) -> None:
        """Called at every start; a restarted actor resumes its durable work here."""

    def holds(self) -> set[str]:
        """Delivery ids this actor keeps in its durable work (queues, batches).

        After a crash in `deliver` these are resumed from there, not handed to
        `deliver` again (which would send them twice). Override in destinations
        that queue or batch sends durably.
        """
        return set()

    def on_crash(self, error: BaseException | None) -> None:
        """This incarnation crashed: keep what the next one needs (see `actors.Supervised`)."""
        if error is not None:
            self.work.crash = repr(error)

    # -- messages ------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Deliver):
            return self._accept(message.sends)
        if isinstance(message, LoopResult):
            return self.on_loop_result(message)
        if isinstance(message, Flush):
            return self.flush()
        if isinstance(message, DeadLetter):
            return self.dead_letter(message.data_dir, message.reason)
        return self.handle(message)

    def _accept(self, sends: list[Send]) -> None:
        if not self._format_known and sends:
            self._register_format(sends[0].outcome.ledger)
        work = self.work
        unfinished = work.unfinished
        for send in sends:
            unfinished[send.id] = send
        work.accepting = sends
        self.deliver(sends)
        work.accepting = None

    # -- to override -----------------------------------------------------------------

    def deliver(self, sends: list[Send]) -> None:
        """Deliver (or queue, or batch) these sends; report each one when it is final."""
        raise NotImplementedError

    def on_loop_result(self, result: LoopResult) -> None:
        """A coroutine this actor spawned on an event loop has finished."""

    def handle(self, message: Any) -> Any:
        """Any other message (timer ticks, retries)."""
        return super().on_receive(message)

    def flush(self) -> None:
        """Start delivering whatever is buffered; unbuffered destinations do nothing."""

    def dead_letter(self, data_dir: Path, reason: str) -> int:
        """Fail every unfinished send (shutdown); the settle path dead-letters them in one write."""
        sends = [send for send in self.unfinished.values() if not send.final]
        self.settle_each([Failure(send, given_up(reason, send)) for send in sends])
        self.unfinished.clear()
        return len(sends)

    # -- settling: every outcome goes through `settle` or `settle_each` -------------------

    def delivered(self, send: Send, **detail: Any) -> None:
        """Report `send` delivered; `detail` adds e.g. status code, object key or table."""
        self.settle([send], "delivered", detail=detail)

    def failed(self, send: Send, error: str | BaseException, **detail: Any) -> None:
        """Fail `send` for good; it is dead-lettered at once (many at once: `settle_each`)."""
        self.settle([send], "failed", error=error, detail=detail)

    def settle(
        self,
        sends: list[Send],
        status: FinalStatus,
        *,
        error: str | BaseException | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Make open sends final with one outcome (a batch): one count, one dead-letter write."""
        unfinished = self.unfinished
        for send in sends:
            unfinished.pop(send.id, None)
        settle(sends, status, error=error, detail=detail)

    def settle_each(self, settlements: Iterable[Delivered | Failure]) -> None:
        """Make open sends final, each with its own outcome: one count, one dead-letter write."""
        settlements = list(settlements)  # read twice
        unfinished = self.unfinished
        for settlement in settlements:
            unfinished.pop(settlement.send.id, None)
        settle_each(settlements)


def given_up(reason: str, send: Send) -> str:
    """The error of a send given up on (shutdown), keeping what its last attempt said."""
    if send.error:
        return f"{reason}; dead-lettered; last error: {send.error}"
    return f"{reason}; dead-lettered"
