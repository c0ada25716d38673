"""`ApiServer`: a runtime's HTTP API served by hypercorn on the runtime's own trio loop.

Owns starting hypercorn there (where the SSE hub's streams and subscriber
queues live, so a stream reads its hub queue directly) and the stopping order:
stop accepting, let accepted runs publish, end every SSE stream, cut the
connections of clients that read nothing, wait for hypercorn. Reads the
runtime only through `RuntimeView`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from outbound.api.app import create_app
from outbound.api.sockets import shutdown_connection
from outbound.api.view import RuntimeView

logger = logging.getLogger(__name__)


def _unwrap(error: BaseException | None) -> BaseException | None:
    """The one error inside nested exception groups (trio nurseries wrap them), if one."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


class ApiServer:
    """Serves a runtime's API with hypercorn on the runtime's trio loop.

    `start()` returns once the socket listens (`port` is then the real port);
    `stop()` ends every SSE stream, lets hypercorn finish and waits for it.
    """

    def __init__(
        self,
        runtime: RuntimeView,
        host: str = "127.0.0.1",
        port: int = 0,
        graceful_timeout: float = 5.0,
    ) -> None:
        self.runtime = runtime
        self.host = host
        self.port = port
        self.graceful_timeout = graceful_timeout
        self.app = create_app(runtime)
        self._shutdown: trio.Event | None = None
        self._ready: concurrent.futures.Future[list[str]] = concurrent.futures.Future()
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _loop(self) -> Any:
        loop = self.runtime.trio_loop
        if loop is None or not self.runtime.running:
            raise RuntimeError("start the runtime before its API server")
        return loop

    def start(self, timeout: float = 10.0) -> ApiServer:
        self._loop().spawn(self._serve, reply_to=self._finished)
        binds = self._ready.result(timeout)
        self.port = int(binds[0].rsplit(":", 1)[1])
        return self

    def _finished(self, result: Any) -> None:
        error = _unwrap(result.error)
        if not self._ready.done():
            self._ready.set_exception(error or RuntimeError("the API server ended at once"))
        if error is not None and not isinstance(error, trio.Cancelled):
            logger.error("the API server stopped with an error: %r", error)
        if not self._done.done():
            self._done.set_result(None)

    async def _serve(self) -> None:
        from hypercorn.config import Config as HypercornConfig
        from hypercorn.trio import serve

        self._shutdown = trio.Event()
        config = HypercornConfig()
        host = f"[{self.host}]" if ":" in self.host else self.host
        config.bind = [f"{host}:{self.port}"]
        config.graceful_timeout = self.graceful_timeout
        config.backlog = 2048
        config.accesslog = None
        config.errorlog = logger  # type: ignore[assignment]
        async with trio.open_nursery() as nursery:
            serving: Callable[..., Awaitable[Any]] = functools.partial(
                serve, self.app, config, shutdown_trigger=self._shutdown.wait
            )
            binds = await nursery.start(serving)
            self._ready.set_result(binds)

    async def _stop_accepting(self) -> None:
        if self._shutdown is not None:
            self._shutdown.set()

    async def _close_streams(self) -> int:
        return self.runtime.sse_hub.close_all() + self.app.state.inspector.feed.close()

    def _settle_streams(self, timeout: float) -> None:
        """Let runs already accepted finish and publish, so open streams get their events."""
        deadline = time.monotonic() + timeout
        if not self.runtime.ledger.wait_runs(timeout):
            return
        while time.monotonic() < deadline:
            sse = self.runtime.stats()["destinations"].get("sse", {})
            if sse.get("pending", 0) <= 0:
                return
            time.sleep(0.01)

    def _cut_wedged_streams(self, grace: float) -> None:
        """Streams still open after `grace` s are stuck writing to a client that reads
        nothing (hypercorn shields the write from cancellation): shut their sockets."""
        open_streams = self.app.state.sse.open_streams
        deadline = time.monotonic() + grace
        while open_streams and time.monotonic() < deadline:
            time.sleep(0.02)
        for server, client in list(open_streams):
            shutdown_connection(server, client)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, let accepted runs publish, end every SSE stream, wait for hypercorn."""
        if not self._ready.done() or self._done.done():
            return
        try:
            loop = self._loop()
            loop.call(self._stop_accepting, timeout=timeout)
            self._settle_streams(min(timeout, self.graceful_timeout) / 2)
            loop.call(self._close_streams, timeout=timeout)
        except RuntimeError:
            return  # the runtime (and its loop) already stopped: the server went with it
        self._cut_wedged_streams(grace=1.0)
        try:
            self._done.result(timeout)
        except concurrent.futures.TimeoutError:
            logger.warning("the API server did not stop within %s s", timeout)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
