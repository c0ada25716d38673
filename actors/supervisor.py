"""Supervision: restart crashed actors one-for-one without losing their work.

Owns `Supervisor`, `ChildSpec`, `Supervised` (the mixin a child actor type
uses) and `SupervisedRef` (the stable address of a child across restarts).

pykka alone drops the unprocessed messages of an actor that crashes. Here a
child keeps two things across incarnations: its inbox (the same object is
adopted by the successor, so nothing queued is lost and callers holding the
`SupervisedRef` keep sending to it) and its `durable` dict (state the actor
chooses to keep, such as unflushed batches). Restart intensity, as in OTP,
stops a crash loop, per child: a child that crashes more than `max_restarts`
times within `period` seconds (or whose restart fails) is given up on alone.
It stops taking messages, is reported `failed` with its error by `children()`
and to `on_give_up`, and its owner can collect what it held (`leftovers()`);
every other child goes on.

The pykka internals this needs (inbox adoption, the failure and teardown steps,
stopping through the inbox) are in `actors.pykka_internals`. Knows nothing of
workflows or destinations.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka

from outbound.actors.pykka_internals import (
    CrashHooks,
    adopt_inbox,
    queued_messages,
    stop_through_inbox,
)

logger = logging.getLogger(__name__)


class Restart(enum.Enum):
    PERMANENT = "permanent"  # always restarted after a crash
    TEMPORARY = "temporary"  # never restarted; a crash just removes it


@dataclass(frozen=True)
class ChildSpec:
    """How to start one child: `factory()` must call `SomeSupervisedActor.start(...)`."""

    name: str
    factory: Callable[[], pykka.ActorRef[Any]]
    restart: Restart = Restart.PERMANENT


class SupervisorGaveUp(RuntimeError):
    """A child crashed more often than the restart intensity allows (or could not restart).

    `child` names it; the supervisor and its other children go on.
    """

    def __init__(self, message: str, child: str = "") -> None:
        super().__init__(message)
        self.child = child


@dataclass
class _Adoption:
    inbox: Any | None
    durable: dict[str, Any]
    on_crash: Callable[[BaseException | None], None]
    actor: Any = None
    ref: Any = None
    name: str = ""


_adoption: contextvars.ContextVar[_Adoption | None] = contextvars.ContextVar(
    "outbound_adoption", default=None
)


class Supervised(CrashHooks):
    """Mixin for actor types a `Supervisor` can restart without losing work.

    Put it before the pykka actor type: `class Mine(Supervised, pykka.ThreadingActor)`.
    Anything kept in `self.durable` survives a crash and is handed to the
    next incarnation; `on_crash(error)` is called once when an incarnation
    crashes, before the supervisor hears of it.
    """

    durable: dict[str, Any]
    _supervision: _Adoption | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        adoption = _adoption.get()
        if adoption is not None and adoption.actor is None:
            adoption.actor = self
        else:
            adoption = None
        self._supervision = adoption
        self.durable = adoption.durable if adoption else {}
        super().__init__(*args, **kwargs)
        if adoption and adoption.inbox is not None:
            adopt_inbox(self, adoption.inbox)  # type: ignore[arg-type]
        if adoption:
            adoption.inbox = self.actor_inbox  # type: ignore[attr-defined]

    @property
    def supervised_name(self) -> str | None:
        """The name this actor is supervised under (None when not started by a supervisor)."""
        return self._supervision.name if self._supervision is not None else None

    @property
    def stable_ref(self) -> pykka.ActorRef[Any]:
        """This actor's address that stays valid across restarts (give it to loops and timers)."""
        if self._supervision is not None and self._supervision.ref is not None:
            return self._supervision.ref
        return self.actor_ref  # type: ignore[attr-defined,no-any-return]

    def on_crash(self, error: BaseException | None) -> None:
        """This incarnation crashed (called once, on its thread): keep what the next one needs."""

    def _crashed_once(self, error: BaseException | None) -> None:
        self.on_crash(error)
        if self._supervision is not None:
            self._supervision.on_crash(error)

    def _keeps_inbox(self) -> bool:
        # A crashed child leaves its inbox untouched for its successor.
        return self._supervision is not None


class SupervisedRef(pykka.ActorRef[Any]):
    """A child's address that stays valid across restarts.

    Messages told while the child restarts wait in its inbox; only when the
    supervisor has given up or stopped the child does `tell` raise
    `pykka.ActorDeadError`.
    """

    def __init__(self, actor: pykka.Actor, child: _Child) -> None:
        super().__init__(actor)
        self._child = child

    def is_alive(self) -> bool:
        return self._child.accepting

    def leftovers(self) -> tuple[dict[str, Any], list[Any]]:
        """For a child the supervisor gave up on: its durable state and unhandled messages.

        Lets the owner account for work a dead child still held instead of losing it.
        """
        if self._child.accepting:
            raise RuntimeError("leftovers() is only for a child that has been stopped")
        return self._child.durable, queued_messages(self._child.inbox)

    def _rebind(self, actor: pykka.Actor) -> None:
        self._actor_weakref = weakref.ref(actor)
        self.actor_class = actor.__class__
        self.actor_stopped = actor.actor_stopped

    def __repr__(self) -> str:
        return f"<SupervisedRef {self._child.spec.name} of {self.actor_class.__name__}>"


@dataclass
class _Child:
    spec: ChildSpec
    durable: dict[str, Any] = field(default_factory=dict)
    inbox: Any | None = None
    ref: SupervisedRef | None = None
    accepting: bool = True
    incarnation: int = 0
    restarts: deque[float] = field(default_factory=deque)  # times of recent restarts
    failed: BaseException | None = None  # why it was given up on


@dataclass(frozen=True)
class _ChildCrashed:
    name: str
    incarnation: int
    error: BaseException | None


class Supervisor(pykka.ThreadingActor):
    """Starts child actors and restarts them one-for-one when they crash.

    Runs on a daemon thread: an owner that forgets to stop it must not keep
    the interpreter from exiting (owners stop it from an atexit hook instead).

    `on_give_up(error)` is called (from the supervisor's thread) when a
    child exceeds the restart intensity or cannot be restarted: `error` is a
    `SupervisorGaveUp` naming the child. That child no longer takes messages;
    the others keep running. The last such error is kept in `gave_up`.
    """

    use_daemon_thread = True

    def __init__(
        self,
        max_restarts: int = 5,
        period: float = 10.0,
        on_give_up: Callable[[SupervisorGaveUp], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.max_restarts = max_restarts
        self.period = period
        self._on_give_up = on_give_up
        self._clock = clock
        self._children: dict[str, _Child] = {}
        self.gave_up: SupervisorGaveUp | None = None

    # -- API (call through the proxy or `ask`) --------------------------------

    def start_child(self, spec: ChildSpec) -> SupervisedRef:
        if spec.name in self._children:
            raise ValueError(f"a child named {spec.name!r} is already supervised")
        child = _Child(spec)
        self._children[spec.name] = child
        self._spawn(child)
        assert child.ref is not None
        return child.ref

    def child(self, name: str) -> SupervisedRef:
        return self._child_or_raise(name).ref  # type: ignore[return-value]

    def children(self) -> dict[str, dict[str, Any]]:
        """Status of each child: alive, `running` or `failed` (with the error), restarts so far."""
        return {
            name: {
                "alive": bool(
                    child.ref and child.accepting and not child.ref.actor_stopped.is_set()
                ),
                "status": "failed" if child.failed is not None else "running",
                "error": str(child.failed) if child.failed is not None else None,
                "incarnation": child.incarnation,
                "actor": child.ref.actor_class.__name__ if child.ref else None,
            }
            for name, child in self._children.items()
        }

    def abandon_child(self, name: str, error: BaseException) -> None:
        """Stop routing messages to a child that is stuck (it does not answer), and mark it failed.

        Its thread is left to finish on its own; `leftovers()` of its ref then
        tells its owner what it held.
        """
        child = self._child_or_raise(name)
        child.accepting = False
        if child.failed is None:
            child.failed = error

    def stop_child(self, name: str, timeout: float | None = 10.0) -> None:
        child = self._child_or_raise(name)
        self._stop_child(child, timeout)
        del self._children[name]

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _ChildCrashed):
            return self._handle_crash(message)
        return super().on_receive(message)

    def on_stop(self) -> None:
        for child in reversed(list(self._children.values())):
            self._stop_child(child, timeout=10.0)

    # -- internals -----------------------------------------------------------

    def _child_or_raise(self, name: str) -> _Child:
        try:
            return self._children[name]
        except KeyError:
            raise KeyError(f"no supervised child named {name!r}") from None

    def _spawn(self, child: _Child) -> None:
        child.incarnation += 1
        incarnation = child.incarnation
        me = self.actor_ref

        def on_crash(error: BaseException | None) -> None:
            if me.is_alive():
                me.tell(_ChildCrashed(child.spec.name, incarnation, error))

        adoption = _Adoption(
            child.inbox, child.durable, on_crash, ref=child.ref, name=child.spec.name
        )
        token = _adoption.set(adoption)
        try:
            plain_ref = child.spec.factory()
        finally:
            _adoption.reset(token)
        if adoption.actor is None:
            plain_ref.stop(block=False)
            raise TypeError(
                f"child {child.spec.name!r}: its factory must start an actor whose type "
                "mixes in actors.Supervised"
            )
        child.inbox = adoption.inbox
        actor = adoption.actor
        if child.ref is None:
            child.ref = SupervisedRef(actor, child)
            adoption.ref = child.ref
        else:
            child.ref._rebind(actor)

    def _handle_crash(self, crash: _ChildCrashed) -> None:
        child = self._children.get(crash.name)
        if child is None or child.incarnation != crash.incarnation or child.failed is not None:
            return
        logger.warning("supervised child %r crashed: %r", crash.name, crash.error)
        if child.spec.restart is Restart.TEMPORARY:
            child.accepting = False
            del self._children[crash.name]
            return
        now = self._clock()
        restarts = child.restarts
        restarts.append(now)
        while restarts and now - restarts[0] > self.period:
            restarts.popleft()
        if len(restarts) > self.max_restarts:
            self._give_up(
                child,
                f"child {crash.name!r} crashed more than {self.max_restarts} times in "
                f"{self.period:g} s; last error: {crash.error!r}",
                crash.error,
            )
            return
        try:
            self._spawn(child)
        except Exception as error:  # its factory fails now: a restart cannot help
            self._give_up(child, f"child {crash.name!r} could not be restarted: {error!r}", error)

    def _give_up(self, child: _Child, message: str, cause: BaseException | None) -> None:
        """Stop routing messages to one child for good; the others go on."""
        error = SupervisorGaveUp(message, child.spec.name)
        error.__cause__ = cause
        self.gave_up = error
        child.accepting = False
        child.failed = error
        logger.error("%s; giving up on it (the other children go on)", error)
        if self._on_give_up is not None:
            try:
                self._on_give_up(error)
            except Exception:
                logger.exception("on_give_up callback failed")

    def _stop_child(self, child: _Child, timeout: float | None) -> None:
        child.accepting = False
        ref = child.ref
        if ref is None or ref.actor_stopped.is_set():
            return
        # The ref refuses callers now, so stop the incarnation through its inbox;
        # the reply comes once on_stop has run.
        done = stop_through_inbox(ref.actor_inbox)
        if child.failed is not None:  # abandoned as stuck: it stops when it gets to it
            return
        try:
            done.get(timeout=timeout)
        except pykka.Timeout:
            logger.warning("child %r did not stop within %s s", child.spec.name, timeout)
