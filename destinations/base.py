"""The destination actor: what every destination (built-in or custom) is.

Owns `Destination`, the messages the runtime sends it (`Deliver`, `Flush`,
`DeadLetter`) and `Services`, the shared machinery a destination may use (event
loops, timers, config). A destination is a supervised pykka actor: the runtime
hands it a run's sends in one `Deliver` message, and it reports each outcome on
the send's `Delivery` record through `self.delivered(...)` / `self.failed(...)`.

Everything accepted and not yet final lives in `self.unfinished`, which is kept
in the actor's durable state: after a crash the restarted actor still holds it,
and at shutdown whatever is left is written to the dead-letter directory.
Must not import `runtime`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pykka

from actors import AsyncioLoop, LoopResult, Supervised, Timers, TrioLoop
from destinations.deadletter import write_jsonl
from destinations.delivery import Ledger, Outgoing, delivered_each, delivery_id, finish_all

if TYPE_CHECKING:
    from destinations.batching import MemoryBudget
    from runtime.config import Config

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
    """Give up on whatever is still unfinished: write it to `directory`, reply with a count."""

    data_dir: Path
    reason: str


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
        self.config = config if config is not None else (services.config if services else None)
        self.services = services

    # -- state that survives restarts -------------------------------------------------

    @property
    def unfinished(self) -> dict[str, Outgoing]:
        """Sends accepted and not yet final, by delivery id (durable across restarts)."""
        return self.durable.setdefault("unfinished", {})

    # -- lifecycle ---------------------------------------------------------------

    def on_start(self) -> None:
        interrupted: list[Outgoing] | None = self.durable.pop("accepting", None)
        if interrupted:
            # The previous incarnation crashed while taking these: fail them
            # visibly rather than risk a crash loop on a poisonous send.
            error = self.durable.pop("crash", "the destination crashed while accepting it")
            for send in interrupted:
                if not send.final:
                    self.failed(send, f"destination {self.name!r} crashed: {error}")
        self.recover()

    def recover(self) -> None:
        """Called at every start; a restarted actor resumes its durable work here."""

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
        """Write every unfinished send to the dead-letter directory and fail its record."""
        sends = list(self.unfinished.values())
        path = write_jsonl(data_dir, self.name, sends, reason)
        for send in sends:
            self.failed(send, f"{reason}; dead-lettered to {path}", dead_letter=str(path))
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
        self.unfinished.pop(send.id, None)
        send.failed(error, **detail)
