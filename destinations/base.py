"""The destination actor: what every destination (built-in or custom) is.

Owns `Destination`, the messages the runtime sends it (`Deliver`, `Flush`,
`DeadLetter`) and `Services`, the shared machinery a destination may use (event
loops, timers, config). A destination is a supervised pykka actor: the runtime
hands it a run's sends in one `Deliver` message, and it reports each outcome on
the send's `Delivery` record through `self.delivered(...)` / `self.failed(...)`.

Everything accepted and not yet final lives in `self.unfinished`, which is kept
in the actor's durable state: after a crash the restarted actor still holds it,
and at shutdown whatever is left is written to the dead-letter directory. A send
that fails is dead-lettered by the settle path at once (`destinations.delivery`).

A crash while taking a `Deliver` must cost only the send that caused it: the
restarted actor hands the interrupted sends it does not already hold (`holds`)
to `deliver` again one at a time, and a send that crashes it alone is failed.
Must not import `runtime`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pykka

from outbound.actors import AsyncioLoop, LoopResult, Supervised, Timers, TrioLoop
from outbound.destinations.deadletter import DeadLetterWriter, payload_fields
from outbound.destinations.delivery import (
    Failure,
    Ledger,
    Outgoing,
    delivered_each,
    delivery_id,
    fail_each,
    finish_all,
)

if TYPE_CHECKING:
    from outbound.config import Config
    from outbound.destinations.batching import MemoryBudget

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Deliver:
    """A run's sends for this destination, in send order."""

    sends: list[Outgoing]


@dataclass(frozen=True, slots=True)
class Flush:
    """Start delivering everything buffered now (batches, queues); reply when started."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Give up on whatever is still unfinished: fail and dead-letter it, reply with a count.

    `data_dir` is where destinations with a native dead-letter form (S3) write it.
    """

    data_dir: Path
    reason: str


@dataclass
class DestinationStatus:
    """What a destination reports to `Runtime.health()` besides being alive.

    Written by the destination's actor, read by any thread (plain attributes).
    """

    retrying_since: float | None = None  # time.monotonic() of the oldest write still failing
    last_error: str | None = None


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
    status: dict[str, DestinationStatus] = field(default_factory=dict)  # by destination name

    def status_of(self, destination: str) -> DestinationStatus:
        return self.status.setdefault(destination, DestinationStatus())


class Destination(Supervised, pykka.ThreadingActor):
    """Base class of destination actors. Override `deliver(sends)`.

    Custom destinations subclass this, report each send with `self.delivered`
    or `self.failed`, and are registered with `Runtime.add_destination(name,
    factory)`, where `factory(config)` returns `MyDestination.start(...)`.
    """

    use_daemon_thread = True
    name = "destination"

    def __init__(self, config: Config | None = None, services: Services | None = None) -> None:
        super().__init__()
        if self.supervised_name:  # the name it was added under (a custom one may not set `name`)
            self.name = self.supervised_name
        self.config = config if config is not None else (services.config if services else None)
        self.services = services
        # Its own dead-letter form, if it has one, is known to the writer before
        # anything can fail (a custom destination has no services: at its first send).
        self._format_known = type(self).dead_letter_fields is Destination.dead_letter_fields
        if services is not None and not self._format_known:
            self._register_format(services.ledger)

    @staticmethod
    def dead_letter_fields(send: Outgoing) -> dict[str, Any]:
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

    # -- state that survives restarts -------------------------------------------------

    @property
    def unfinished(self) -> dict[str, Outgoing]:
        """Sends accepted and not yet final, by delivery id (durable across restarts)."""
        return self.durable.setdefault("unfinished", {})

    # -- lifecycle ---------------------------------------------------------------

    def on_start(self) -> None:
        interrupted: list[Outgoing] | None = self.durable.pop("accepting", None)
        alone = self.durable.pop("alone", False)
        crash = self.durable.pop("crash", "the destination crashed while accepting it")
        if interrupted:
            # The previous incarnation crashed while taking these. Those it had
            # taken into its durable state go on from there; of the others, a
            # send that crashed it alone is the poisonous one and fails; several
            # are retried one at a time, so only the poisonous one fails.
            held = self.holds()
            suspects = [s for s in interrupted if not s.final and s.id not in held]
            if len(suspects) == 1 or alone:
                for send in suspects:
                    self.failed(send, f"destination {self.name!r} crashed delivering it: {crash}")
            elif suspects:
                self.durable.setdefault("suspects", collections.deque()).extendleft(
                    reversed(suspects)
                )
        self.recover()
        self._retry_suspects()

    def _retry_suspects(self) -> None:
        """Deliver the sends of an interrupted `Deliver` again, each in a hand-off of its own."""
        suspects: collections.deque[Outgoing] | None = self.durable.get("suspects")
        while suspects:
            send = suspects.popleft()
            if send.final:
                continue
            self.durable["alone"] = True  # if this crashes, the next start fails this send
            self._accept([send])
            self.durable.pop("alone", None)

    def recover(self) -> None:
        """Called at every start; a restarted actor resumes its durable work here."""

    def holds(self) -> set[str]:
        """Delivery ids this actor keeps in its durable state (queues, batches).

        After a crash in `deliver` these are resumed from there, not handed to
        `deliver` again (which would send them twice). Override in destinations
        that queue or batch sends durably.
        """
        return set()

    def _handle_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        if exception_value is not None:
            self.durable["crash"] = repr(exception_value)
        super()._handle_failure(exception_type, exception_value, traceback)

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

    def _accept(self, sends: list[Outgoing]) -> None:
        if not self._format_known and sends:
            self._register_format(sends[0]._ledger)
        self.unfinished.update(zip(map(delivery_id, sends), sends, strict=True))
        self.durable["accepting"] = sends
        self.deliver(sends)
        self.durable.pop("accepting", None)

    # -- to override -----------------------------------------------------------------

    def deliver(self, sends: list[Outgoing]) -> None:
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
        self.failed_each([Failure(send, given_up(reason, send)) for send in sends])
        self.unfinished.clear()
        return len(sends)

    # -- reporting -------------------------------------------------------------------

    def delivered(self, send: Outgoing, **detail: Any) -> None:
        self.unfinished.pop(send.id, None)
        send.delivered(**detail)

    def delivered_many(self, sends: list[Outgoing], **detail: Any) -> None:
        """`delivered` for many sends with the same detail (a batch): one ledger update."""
        self._forget(sends)
        finish_all(sends, "delivered", detail)

    def delivered_each(self, outcomes: list[tuple[Outgoing, dict[str, Any]]]) -> None:
        """`delivered` for many sends, each with its own detail: one ledger update."""
        self._forget(send for send, _ in outcomes)
        delivered_each((send, detail) for send, detail in outcomes)

    def _forget(self, sends: Iterable[Outgoing]) -> None:
        """Drop sends that became final from `unfinished` (with the loop in C)."""
        drop = map(self.unfinished.pop, map(delivery_id, sends), repeat(None))
        collections.deque(drop, maxlen=0)

    def failed(self, send: Outgoing, error: str | BaseException, **detail: Any) -> None:
        """Fail a send for good; it is dead-lettered at once (prefer `failed_each` for many)."""
        self.unfinished.pop(send.id, None)
        send.failed(error, **detail)

    def failed_many(self, sends: list[Outgoing], error: str | BaseException, **detail: Any) -> None:
        """`failed` for many sends with one error (a batch): one dead-letter write."""
        self._forget(sends)
        finish_all(sends, "failed", detail, error if isinstance(error, str) else _text(error))

    def failed_each(self, failures: list[Failure]) -> None:
        """`failed` for many sends, each with its own error: one dead-letter write."""
        self._forget(failure.send for failure in failures)
        fail_each(failures)


def given_up(reason: str, send: Outgoing) -> str:
    """The error of a send given up on (shutdown), keeping what its last attempt said."""
    if send.error:
        return f"{reason}; dead-lettered; last error: {send.error}"
    return f"{reason}; dead-lettered"


def _text(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
