"""Every use of pykka's private API in the project, in one place.

Follows pykka 4.5.0 (the version installed; `pykka._actor.Actor` and
`pykka._envelope.Envelope`). pykka's public API (`start`, `tell`, `ask`,
proxies, `on_start`/`on_stop`/`on_failure`) does not let an actor run on a
shared thread pool, keep its inbox across a restart, or be stopped through
its inbox, so this module overrides or calls these internals, and nothing
else in the project does:

- `PooledActor` (run on an `actors.pool.ActorPool`): `Actor.__init__`'s
  fields, `_create_actor_inbox`, `_create_future`, `_start_actor_loop`,
  `_actor_loop_setup`, `_actor_loop_teardown`, `_handle_receive`,
  `_handle_failure` and `_stop`, following `Actor._actor_loop_running` one
  envelope at a time.
- `CrashHooks` (for `actors.supervisor.Supervised`): `_handle_failure` (tell
  the supervisor, once) and `_actor_loop_teardown` (leave a crashed actor's
  inbox to its successor).
- `adopt_inbox` (an actor's `actor_inbox`, and its ref's, replaced by its
  predecessor's), `queued_messages` and `stop_through_inbox`
  (`Envelope`, `messages._ActorStop`).

When pykka is upgraded, check these against `pykka/_actor.py` first.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import Any, ClassVar

import pykka
from pykka import ThreadingFuture, messages
from pykka._envelope import Envelope

from outbound.actors.ids import new_urn
from outbound.actors.pool import SLICE_SIZE, ActorPool, PoolInbox, StopFlag, default_pool

logger = logging.getLogger(__name__)


class PooledActor(pykka.Actor):
    """A pykka actor that runs on a shared `ActorPool` instead of its own thread.

    Handlers must not block for long: a blocked handler holds one of the pool's
    few workers. Hand slow I/O to an event loop (see `actors.loops`).
    """

    #: The pool this actor type runs on; `None` means `default_pool()`.
    pool: ClassVar[ActorPool | None] = None

    #: Whether instances join pykka's `ActorRegistry`. The registry is a list
    #: under one lock, scanned on every unregister: fine for tens of actors,
    #: a bottleneck for thousands of short-lived ones, which opt out.
    registered: ClassVar[bool] = True

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> pykka.ActorRef[Any]:
        if cls.registered:
            return super().start(*args, **kwargs)
        actor = cls(*args, **kwargs)
        actor._start_actor_loop()
        return actor.actor_ref

    def _stop(self) -> None:
        if self.registered:
            return super()._stop()
        self.actor_stopped.set()
        try:
            self.on_stop()
        except Exception:
            self._handle_failure(*sys.exc_info())
        return None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # pykka.Actor.__init__ minus its uuid4() call (see actors.ids): runs
        # start thousands of actors a second.
        self.actor_urn = new_urn()
        self.actor_inbox = self._create_actor_inbox()
        self.actor_stopped = StopFlag()  # type: ignore[assignment]
        self._actor_ref = pykka.ActorRef(self)

    @staticmethod
    def _create_actor_inbox() -> PoolInbox:  # type: ignore[override]
        return PoolInbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return ThreadingFuture()

    def _start_actor_loop(self) -> None:
        self._started = False
        inbox: PoolInbox = self.actor_inbox  # type: ignore[assignment]
        inbox.bind(self._pool_of(), self._pool_run_slice)

    def _pool_of(self) -> ActorPool:
        return self.pool or default_pool()

    def _pool_run_slice(self) -> None:
        """Run on a worker: handle up to SLICE_SIZE messages, then yield."""
        inbox: PoolInbox = self.actor_inbox  # type: ignore[assignment]
        if not self._started:
            self._started = True
            self._actor_loop_setup()
        handled = 0
        while not self.actor_stopped.is_set() and not inbox.empty() and handled < SLICE_SIZE:
            self._pool_handle_envelope(inbox.get())
            handled += 1
        if self.actor_stopped.is_set():
            self._pool_finish()
            return
        if inbox.finish_slice():
            self._pool_of().schedule(self._pool_run_slice)

    def _pool_finish(self) -> None:
        inbox: PoolInbox = self.actor_inbox  # type: ignore[assignment]
        inbox.unbind(self._pool_run_slice)
        self._actor_loop_teardown()

    def _pool_handle_envelope(self, envelope: Any) -> None:
        """pykka's per-message step of `_actor_loop_running`, one envelope at a time."""
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                logger.info(f"Exception returned from {self} to caller:", exc_info=sys.exc_info())
                envelope.reply_to.set_exception()
            else:
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:
                    self._handle_failure(*sys.exc_info())
        except BaseException:
            logger.debug(f"{sys.exc_info()[1]!r} in {self}. Stopping all actors.")
            self._stop()
            pykka.ActorRegistry.stop_all()


class CrashHooks:
    """pykka's failure and teardown steps, turned into two plain hooks for a supervised actor.

    `_crashed_once(error)` is called on the first failure of an incarnation;
    a crashed actor whose `_keeps_inbox()` is true leaves its inbox untouched
    (pykka would answer the queued asks with `ActorDeadError` and drop the tells).
    """

    _crashed: bool = False

    def _crashed_once(self, error: BaseException | None) -> None:
        """The first failure of this incarnation (override)."""

    def _keeps_inbox(self) -> bool:
        """Whether a crashed incarnation leaves its inbox to a successor (override)."""
        return False

    def _handle_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        first = not self._crashed
        self._crashed = True
        super()._handle_failure(exception_type, exception_value, traceback)  # type: ignore[misc]
        if first:
            self._crashed_once(exception_value)

    def _actor_loop_teardown(self) -> None:
        if self._crashed and self._keeps_inbox():
            return
        super()._actor_loop_teardown()  # type: ignore[misc]


def adopt_inbox(actor: pykka.Actor, inbox: Any) -> None:
    """Make `actor` (made, not started) read its predecessor's `inbox`: nothing queued is lost."""
    actor.actor_inbox = inbox
    actor._actor_ref.actor_inbox = inbox  # noqa: SLF001


def queued_messages(inbox: Any) -> list[Any]:
    """Take every message still queued in a stopped actor's inbox, in order."""
    taken: list[Any] = []
    while inbox is not None and not inbox.empty():
        taken.append(inbox.get().message)
    return taken


def stop_through_inbox(inbox: Any) -> pykka.Future[Any]:
    """Queue pykka's stop message in `inbox`; the future is set once `on_stop` has run.

    For an actor whose ref refuses callers (the supervisor stops routing to it first).
    """
    done: pykka.Future[Any] = ThreadingFuture()
    inbox.put(Envelope(messages._ActorStop(), reply_to=done))  # noqa: SLF001
    return done


__all__ = [
    "CrashHooks",
    "PooledActor",
    "adopt_inbox",
    "queued_messages",
    "stop_through_inbox",
]
