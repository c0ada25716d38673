"""Bridges between the runtime's loop threads and whichever event loop serves the HTTP API.

Owns `await_on(loop, fn)` (await, from any trio or asyncio code, a coroutine
run on one of the runtime's loop threads), `run_blocking(runtime, fn)` (a
blocking call on a worker thread, awaited without blocking the caller's loop)
and `RelayedFrames` (an SSE subscription read on a loop other than the hub's:
a relay task on the hub's trio loop forwards each chunk into a bounded anyio
stream of the serving loop; a full stream cuts the subscriber off, as a full
hub queue does). `outbound serve` needs none of this for SSE (it serves on the
hub's own loop); it is what lets `rt.asgi_app()` run under any ASGI server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import sniffio
import trio

from outbound.actors import LoopResult
from outbound.actors.loops import LoopThread
from outbound.api.view import RuntimeView
from outbound.destinations.sse.hub import SseHub, Subscription


def threadsafe_scheduler() -> Callable[..., Any]:
    """`schedule(fn, *args)`: run `fn(*args)` on the current event loop, from any thread."""
    if sniffio.current_async_library() == "trio":
        return trio.lowlevel.current_trio_token().run_sync_soon
    return asyncio.get_running_loop().call_soon_threadsafe


async def await_on(loop: LoopThread, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run `fn(*args)` on `loop`'s thread and await its result here."""
    schedule = threadsafe_scheduler()
    done = anyio.Event()
    outcome: list[LoopResult] = []

    def settle(result: LoopResult) -> None:  # on `loop`'s thread
        outcome.append(result)
        schedule(done.set)

    loop.spawn(fn, *args, reply_to=settle)
    await done.wait()
    if outcome[0].error is not None:
        raise outcome[0].error
    return outcome[0].value


async def run_blocking(runtime: RuntimeView, fn: Callable[..., Any], *args: Any) -> Any:
    """A blocking call on the runtime's asyncio executor, awaited from any loop.

    Its worker threads come and go with the runtime, unlike trio's thread
    cache, whose idle threads outlive a runtime by seconds.
    """
    loop = runtime.asyncio_loop
    if loop is None:
        return await anyio.to_thread.run_sync(fn, *args)

    async def in_executor() -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    return await await_on(loop, in_executor)


class RelayedFrames:
    """A hub subscription consumed on another loop; iterate it on the serving loop."""

    def __init__(self, hub: SseHub, subscription: Subscription) -> None:
        self.hub = hub
        self.subscription = subscription
        self._send, self._receive = anyio.create_memory_object_stream[bytes](hub.queue_size)
        self._schedule = threadsafe_scheduler()
        self.cut_off = False
        self.on_drop: Callable[[], Any] | None = None

    @classmethod
    async def open(
        cls,
        hub: SseHub,
        workflow_id: str,
        last_event_id: str | None,
        on_drop: Callable[[], Any] | None = None,
    ) -> RelayedFrames:
        """Subscribe on the hub's loop and start relaying; `on_drop()` runs on a cut-off."""
        assert hub.loop is not None

        async def subscribe() -> Subscription:
            subscription = hub.subscribe(workflow_id, last_event_id)
            subscription.on_drop = on_drop
            return subscription

        relayed = cls(hub, await await_on(hub.loop, subscribe))
        relayed.on_drop = on_drop
        hub.loop.spawn(relayed._relay)
        return relayed

    async def _relay(self) -> None:  # on the hub's trio loop
        try:
            async for chunk in self.hub.frames(self.subscription):
                if self.cut_off:
                    break
                self._schedule(self._push, chunk)
        finally:
            self.hub.unsubscribe(self.subscription)
            with contextlib.suppress(Exception):  # the serving loop may be gone
                self._schedule(self._send.close)

    def _push(self, chunk: bytes) -> None:  # on the serving loop
        if self.cut_off:
            return
        try:
            self._send.send_nowait(chunk)
        except anyio.WouldBlock:
            self.cut_off = True
            self._send.close()
            if self.on_drop is not None:
                self.on_drop()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.cut_off = True

    async def chunks(self) -> AsyncIterator[bytes]:
        async with self._receive:
            async for chunk in self._receive:
                if self.cut_off:
                    return
                yield chunk

    def close(self) -> None:
        """The client is gone: stop relaying (callable from the serving loop)."""
        self.cut_off = True
        self._receive.close()
        assert self.hub.loop is not None

        async def unsubscribe() -> None:
            self.hub.unsubscribe(self.subscription)

        with contextlib.suppress(RuntimeError):  # the runtime stopped: nothing to undo
            self.hub.loop.spawn(unsubscribe)
