"""Pooled actors: pykka actors that share a small set of worker threads.

Owns the `PooledActor` type, its inbox and the `ActorPool` that runs them. A
`pykka.ThreadingActor` costs one OS thread for its whole life, which is fine for
a handful of long-lived actors but far too heavy for thousands of short-lived
ones (one per workflow run). A pooled actor keeps pykka's API and semantics
(`start`, `tell`, `ask`, proxies, `on_start`/`on_stop`/`on_failure`, one message
at a time, in order) but only occupies a worker thread while it has messages.

It plugs into pykka through the documented extension points
`_create_actor_inbox`, `_create_future` and `_start_actor_loop`, and knows
nothing of workflows or destinations.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import pykka
from pykka import ThreadingFuture

from outbound.actors.ids import new_urn

logger = logging.getLogger(__name__)

#: Messages an actor handles before it yields its worker to other actors.
SLICE_SIZE = 64
#: Jobs a busy worker runs between two calls of the idle hooks.
IDLE_EVERY = 32


class ActorPool:
    """A fixed set of worker threads that run ready actors, first come first served.

    Workers block on one `queue.SimpleQueue` (a C-level queue with cheap
    wake-ups), so an idle pool costs nothing and a wake-up costs one lock.
    """

    def __init__(self, workers: int | None = None, name: str = "outbound-pool") -> None:
        self.size = workers or min(16, 4 * (os.cpu_count() or 1))
        self.name = name
        self._ready: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._idle_hooks: tuple[Callable[[], None], ...] = ()
        self._local = threading.local()

    def add_idle_hook(self, hook: Callable[[], None]) -> None:
        """Call `hook()` on a worker before it waits for work, and every IDLE_EVERY jobs.

        For work a job buffers per thread to do in bulk (one wake-up of another
        thread instead of one per job): the hook flushes that buffer. Hooks must
        not raise.
        """
        with self._lock:
            self._idle_hooks = (*self._idle_hooks, hook)

    def is_worker(self) -> bool:
        """True on one of this pool's worker threads."""
        return getattr(self._local, "pool", None) is self

    def _ensure_started(self) -> None:
        if self._threads:
            return
        with self._lock:
            if self._threads or self._closed:
                return
            threads = [
                threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
                for i in range(self.size)
            ]
            for thread in threads:
                thread.start()
            self._threads = threads

    def schedule(self, job: Callable[[], None]) -> None:
        """Run `job` on a worker thread soon. Jobs must not raise."""
        if self._closed:
            raise RuntimeError(f"actor pool {self.name!r} is shut down")
        self._ensure_started()
        self._ready.put(job)

    def _work(self) -> None:
        self._local.pool = self
        ready = self._ready
        since_idle = 0
        while True:
            try:
                job = ready.get_nowait()
            except queue.Empty:
                self._run_idle_hooks()
                since_idle = 0
                job = ready.get()
            if job is None:
                self._run_idle_hooks()
                return
            try:
                job()
            except BaseException:  # a job must never kill its worker
                logger.exception("actor pool job failed")
            since_idle += 1
            if since_idle >= IDLE_EVERY:
                self._run_idle_hooks()
                since_idle = 0

    def _run_idle_hooks(self) -> None:
        for hook in self._idle_hooks:
            try:
                hook()
            except BaseException:
                logger.exception("actor pool idle hook failed")

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop the workers once the jobs already scheduled have run."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads, self._threads = self._threads, []
        for _ in threads:
            self._ready.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)


_default_pool: ActorPool | None = None
_default_pool_lock = threading.Lock()


def default_pool() -> ActorPool:
    """The process-wide pool used by `PooledActor` subclasses that name none."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None or _default_pool._closed:
            _default_pool = ActorPool()
            atexit.register(_default_pool.shutdown)
        return _default_pool


class PoolInbox:
    """An actor inbox that asks the pool for a worker when a message arrives.

    At most one worker runs an actor at a time: `_scheduled` is set while the
    actor is queued or running, and only the put that flips it schedules.
    """

    def __init__(self) -> None:
        self._messages: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._runner: Callable[[], None] | None = None
        self._pool: ActorPool | None = None

    def bind(self, pool: ActorPool, runner: Callable[[], None]) -> None:
        """Attach the inbox to an actor incarnation and run it (on_start first)."""
        with self._lock:
            self._pool = pool
            self._runner = runner
            self._scheduled = True
        pool.schedule(runner)

    def put(self, envelope: Any, /) -> None:
        with self._lock:
            self._messages.append(envelope)
            if self._scheduled or self._runner is None:
                return
            self._scheduled = True
            pool, runner = self._pool, self._runner
        assert pool is not None
        pool.schedule(runner)

    def get(self) -> Any:
        return self._messages.popleft()

    def empty(self) -> bool:
        return not self._messages

    def qsize(self) -> int:
        return len(self._messages)

    def finish_slice(self) -> bool:
        """Called by the runner when it yields; True if it must run again now."""
        with self._lock:
            if self._messages and self._runner is not None:
                return True
            self._scheduled = False
            return False

    def unbind(self, runner: Callable[[], None]) -> None:
        """Detach a stopped incarnation; messages stay for a successor."""
        with self._lock:
            if self._runner == runner:
                self._runner = None
                self._scheduled = False


class StopFlag:
    """The part of `threading.Event` pykka uses for `actor_stopped`, at a tenth of the cost.

    Most actors are never waited on, so the real Event (a Condition and a
    lock) is only made when somebody calls `wait()`.
    """

    __slots__ = ("_flag", "_event")

    def __init__(self) -> None:
        self._flag = False
        self._event: threading.Event | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        if self._event is not None:
            self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._event is None:
            with _flag_lock:
                if self._event is None:
                    self._event = threading.Event()
        if self._flag:  # set() may have run before the event existed
            self._event.set()
        return self._event.wait(timeout)


_flag_lock = threading.Lock()


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


__all__ = ["ActorPool", "PoolInbox", "PooledActor", "default_pool"]
