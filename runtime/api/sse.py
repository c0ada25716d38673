"""The SSE endpoint: `GET /pipelines/{workflow_id}/sse` (and its CORS preflight).

Owns `SseEndpoint` (a workflow's stream: history, then live; `Last-Event-ID`
or `?lastEventId=` resumes) and `SubscriptionResponse`. Served by `ApiServer`,
on the hub's own trio loop, a stream reads its hub queue directly; served by
anything else, it relays through `outbound.api.loop_bridge`. A client that
reads nothing has its connection cut (`outbound.api.sockets`). Reads the
runtime only through `RuntimeView`; delivery logic is not here.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from outbound.api.auth import Cors
from outbound.api.loop_bridge import RelayedFrames
from outbound.api.messages import error_response
from outbound.api.sockets import shutdown_connection
from outbound.api.view import RuntimeView
from outbound.destinations.sse.hub import HubClosedError, SseHub


class SubscriptionResponse(EventSourceResponse):
    """An SSE response over one hub subscription; `on_close()` runs however it ends."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], None],
        headers: dict[str, str],
    ) -> None:
        # ping=0: the hub queues `:keepalive` comments itself, in order with the events.
        super().__init__(content, headers=headers, ping=0, sep="\n")
        self._on_close = on_close

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        # No send_timeout here (it cannot fire under hypercorn's trio worker anyway),
        # so skip the cancel scope sse-starlette would open around every write.
        await send(message)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class SseEndpoint:
    """The stream endpoint of one runtime's app, and the connections it has open."""

    def __init__(self, runtime: RuntimeView, cors: Cors) -> None:
        self.runtime = runtime
        self.cors = cors
        self.open_streams: set[tuple[Any, Any]] = set()  # (server, client) of SSE responses

    async def stream(self, request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        cors = self.cors.headers(request.headers.get("origin"))
        if workflow_id not in self.runtime.workflows:
            return error_response(404, f"no workflow {workflow_id!r}", cors)
        return await self.open_stream(request, self.runtime.sse_hub, workflow_id, cors)

    async def open_stream(
        self,
        request: Request,
        hub: SseHub,
        stream: str,
        headers: dict[str, str],
        on_close: Callable[[], None] | None = None,
    ) -> Response:
        """A response streaming `hub`'s stream `stream` (history after `Last-Event-ID`, then
        live), tracked in `open_streams`; `on_close()` once it ends. Also serves the
        inspector's notices (`outbound.api.inspector_feed`)."""
        if hub.loop is None or not self.runtime.running:
            return error_response(503, "the runtime is not running", headers)
        last_event_id = request.headers.get("last-event-id") or request.query_params.get(
            "lastEventId"
        )
        try:
            connection = (
                _address(request.scope.get("server")),
                _address(request.scope.get("client")),
            )
            cut = functools.partial(shutdown_connection, *connection)
            if hub.on_loop_thread():  # served by ApiServer: read the hub's queue directly
                subscription = hub.subscribe(stream, last_event_id)
                subscription.on_drop = cut
                content, unsubscribe = (
                    hub.frames(subscription),
                    functools.partial(hub.unsubscribe, subscription),
                )
            else:
                relayed = await RelayedFrames.open(hub, stream, last_event_id, cut)
                content, unsubscribe = relayed.chunks(), relayed.close
        except HubClosedError as error:
            return error_response(503, str(error), headers)
        self.open_streams.add(connection)

        def closed() -> None:
            self.open_streams.discard(connection)
            unsubscribe()
            if on_close is not None:
                on_close()

        return SubscriptionResponse(content, closed, headers)

    async def preflight(self, request: Request) -> Response:
        headers = self.cors.headers(request.headers.get("origin"))
        headers["Access-Control-Allow-Methods"] = "GET, OPTIONS"
        headers["Access-Control-Allow-Headers"] = "Authorization, Last-Event-ID, Cache-Control"
        headers["Access-Control-Max-Age"] = "600"
        return Response(status_code=204, headers=headers)


def _address(value: Any) -> tuple[Any, ...] | None:
    return tuple(value) if value else None
