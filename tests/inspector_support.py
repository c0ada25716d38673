"""What the inspector's tests share: a sink that answers by path, and a runtime with two
workflows (`p_orders`: HTTP and SSE; `p_refunds`: SSE, and it raises when asked to)."""

from __future__ import annotations

from typing import Any

from outbound.embedded import ReceivedRequest, SinkResponse


def answer_by_path(request: ReceivedRequest) -> SinkResponse:
    """200 with a small JSON body, or the status the path asks for (`/status/404`)."""
    if request.path.startswith("/status/"):
        return SinkResponse(status=int(request.path.rsplit("/", 1)[1]), body=b"no such hook")
    return SinkResponse(body=b'{"received": true}')


def inspector_runtime(make_runtime: Any, sink: Any, **overrides: Any) -> Any:
    """A started runtime whose `p_orders` posts to `sink` (at the event's `path`)."""
    runtime = make_runtime(start=False, **overrides)

    @runtime.workflow("p_orders")
    def orders(event: Any, ctx: Any) -> None:
        ctx.send.http(url=f"{sink.url}{event.get('path', '/hook')}", data=event)
        ctx.send.sse(channel="orders", payload=event)

    @runtime.workflow("p_refunds")
    def refunds(event: Any, ctx: Any) -> None:
        ctx.send.sse(channel="refunds", payload=event)
        if event.get("fail"):
            raise RuntimeError("refund refused")

    return runtime.start()
