"""Event-loop threads that actors hand coroutines to.

Owns `TrioLoop` and `AsyncioLoop`: each runs one event loop on its own thread.
An actor never blocks on network I/O; it calls `loop.spawn(fn, *args,
reply_to=self.actor_ref, tag=...)` and later receives a `LoopResult` message
with the value or the error. Code that is not an actor (a test, the runtime
facade) can use the blocking `loop.call(fn, *args)` instead.

Hand-over cost matters (thousands of deliveries a second): `spawn` uses the
loop's own thread-safe scheduling (`TrioToken.run_sync_soon`, about 7 µs,
or `call_soon_threadsafe`), not anyio's blocking portal (a round trip of about
120 µs). What runs through `run_sync_soon` must never raise, so the spawning
callback catches everything and reports it as the result.

Knows nothing of workflows or destinations.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

logger = logging.getLogger(__name__)


class Recipient(Protocol):
    def tell(self, message: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class LoopResult:
    """The outcome of a spawned coroutine, delivered to the actor that spawned it."""

    tag: Any
    value: Any = None
    error: BaseException | None = None


def _deliver(reply_to: Recipient | Callable[[LoopResult], None], result: LoopResult) -> None:
    try:
        if hasattr(reply_to, "tell"):
            reply_to.tell(result)
        else:
            reply_to(result)
    except Exception:  # the actor is gone: nobody is left to tell
        logger.debug("dropped loop result for a stopped recipient: %r", result.tag)


class LoopThread:
    """Common lifecycle of an event loop running on a dedicated thread."""

    name = "loop"

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name  # the thread is `outbound-<name>`
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def start(self) -> LoopThread:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(
            target=self._main, name=f"outbound-{self.name}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def _main(self) -> None:
        raise NotImplementedError

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def spawn(
        self,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        reply_to: Recipient | Callable[[LoopResult], None] | None = None,
        tag: Any = None,
    ) -> None:
        """Run `fn(*args)` on the loop; `reply_to` gets a `LoopResult` when it ends."""
        raise NotImplementedError

    def call(
        self, fn: Callable[..., Awaitable[Any]], *args: Any, timeout: float | None = None
    ) -> Any:
        """Run `fn(*args)` on the loop and wait for its result (never from the loop thread)."""
        if self.in_loop_thread():
            raise RuntimeError(f"{self.name}.call() would deadlock inside its own loop")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def settle(result: LoopResult) -> None:
            if result.error is not None:
                future.set_exception(result.error)
            else:
                future.set_result(result.value)

        self.spawn(fn, *args, reply_to=settle)
        return future.result(timeout)


class TrioLoop(LoopThread):
    """A trio event loop on its own thread; tasks run in one long-lived nursery."""

    name = "trio"

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_event: trio.Event | None = None

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as error:  # surfaces in start() if it happens early
            self._startup_error = error
            logger.exception("trio loop thread ended with an error")
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._stop_event = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop_event.wait()
            nursery.cancel_scope.cancel()

    def spawn(
        self,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        reply_to: Recipient | Callable[[LoopResult], None] | None = None,
        tag: Any = None,
    ) -> None:
        if self._token is None:
            raise RuntimeError("the trio loop is not running; call start() first")

        async def task() -> None:
            try:
                value = await fn(*args)
            except BaseException as error:  # reported, never raised into the nursery
                if reply_to is not None:
                    _deliver(reply_to, LoopResult(tag, error=error))
                if not isinstance(error, Exception):
                    raise
                return
            if reply_to is not None:
                _deliver(reply_to, LoopResult(tag, value=value))

        def start_task() -> None:  # runs via run_sync_soon: must never raise
            try:
                assert self._nursery is not None
                self._nursery.start_soon(task)
            except BaseException as error:
                if reply_to is not None:
                    _deliver(reply_to, LoopResult(tag, error=error))

        try:
            self._token.run_sync_soon(start_task)
        except trio.RunFinishedError as error:
            if reply_to is not None:
                _deliver(
                    reply_to, LoopResult(tag, error=RuntimeError(f"trio loop stopped: {error}"))
                )

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run the plain function `fn(*args)` on the loop thread soon; errors are logged."""
        if self._token is None:
            raise RuntimeError("the trio loop is not running; call start() first")

        def guarded() -> None:  # runs via run_sync_soon: must never raise
            try:
                fn(*args)
            except BaseException:
                logger.exception("trio call_soon callback failed")

        self._token.run_sync_soon(guarded)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Cancel every task still running and end the loop."""
        token, self._token = self._token, None
        if token is not None and self._stop_event is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._stop_event.set)
        if self._thread is not None and not self.in_loop_thread():
            self._thread.join(timeout)
        self._thread = None


class AsyncioLoop(LoopThread):
    """An asyncio event loop on its own thread, for libraries that need asyncio (asyncpg).

    A runtime keeps two: one for its destinations' clients and one for user
    `async def` workflows, so a workflow that blocks its loop stalls no delivery.
    """

    name = "asyncio"

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
            self._ready.set()

    def spawn(
        self,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        reply_to: Recipient | Callable[[LoopResult], None] | None = None,
        tag: Any = None,
    ) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the asyncio loop is not running; call start() first")

        def done(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            if reply_to is None:
                return
            if task.cancelled():
                _deliver(reply_to, LoopResult(tag, error=asyncio.CancelledError()))
            elif task.exception() is not None:
                _deliver(reply_to, LoopResult(tag, error=task.exception()))
            else:
                _deliver(reply_to, LoopResult(tag, value=task.result()))

        def start_task() -> None:
            try:
                task = loop.create_task(fn(*args))  # type: ignore[arg-type]
            except BaseException as error:
                if reply_to is not None:
                    _deliver(reply_to, LoopResult(tag, error=error))
                return
            self._tasks.add(task)
            task.add_done_callback(done)

        try:
            loop.call_soon_threadsafe(start_task)
        except RuntimeError as error:  # loop closed meanwhile
            if reply_to is not None:
                _deliver(reply_to, LoopResult(tag, error=error))

    def stop(self, timeout: float | None = 5.0) -> None:
        """Cancel every task still running and close the loop."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None and not self.in_loop_thread():
            self._thread.join(timeout)
        self._thread = None
