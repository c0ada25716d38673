"""Pooled actors: pykka actors that share a small set of worker threads.

Owns the `ActorPool` (worker threads), `PoolInbox` (a pooled actor's inbox)
and `StopFlag`. A `pykka.ThreadingActor` costs one OS thread for its whole
life, which is fine for a handful of long-lived actors but far too heavy for
thousands of short-lived ones (one per workflow run). A pooled actor
(`PooledActor`, in `actors.pykka_internals` with every other use of pykka's
private API) keeps pykka's API and semantics (`start`, `tell`, `ask`, proxies,
`on_start`/`on_stop`/`on_failure`, one message at a time, in order) but only
occupies a worker thread while it has messages. This module uses no pykka
internals and knows nothing of workflows or destinations.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

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


__all__ = ["ActorPool", "PoolInbox", "StopFlag", "default_pool"]
