"""The inspector: a web page of recent runs and their deliveries, and the endpoints it reads.

Owns the routes `inspector_routes(runtime, sse)` adds to the app:

- `GET /inspector`: the page (`inspector_page/index.html`), and its script and
  style sheet at `GET /inspector/<file>`. Shipped in the package, nothing
  fetched elsewhere (its Content-Security-Policy says so). They hold no data:
  the script and style are served without the token (`auth.is_public_path`);
  the page too, but with the status 401 when a token is configured and the
  request does not carry it (every API path but `/healthz` says 401 without
  it, and a browser still shows the page, which asks for the token and sends
  it with its API calls).
- `GET /inspector/events`: live notices for the page (`inspector_feed`), an
  SSE stream that takes the token as `?token=` like workflow streams.
- `GET /runs`: this node's recent runs, newest first, paged and filtered
  (`Runtime.recent_runs`); 400 naming the parameter for a bad value.
- `GET /stats`: `Runtime.stats()` as JSON (the page's counters).

Reads the runtime only through `RuntimeView`; delivery logic is not here.
"""

from __future__ import annotations

import logging
from importlib import resources

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from outbound.api.auth import carries_token
from outbound.api.inspector_feed import STREAM, InspectorFeed
from outbound.api.loop_bridge import run_blocking
from outbound.api.messages import error_response
from outbound.api.sse import SseEndpoint, SubscriptionResponse
from outbound.api.view import RuntimeView

logger = logging.getLogger(__name__)

PAGE_FOLDER = "inspector_page"
#: The page's files: name -> media type.
ASSETS = {
    "inspector.js": "text/javascript; charset=utf-8",
    "inspector.css": "text/css; charset=utf-8",
}
#: Everything the page loads comes from here; nothing from elsewhere, no inline code.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
LIST_PARAMETERS = ("limit", "before", "workflow", "status", "destination", "delivery")


def _read_page_file(name: str) -> bytes:
    return resources.files("outbound.api").joinpath(PAGE_FOLDER, name).read_bytes()


class Inspector:
    """The page, its notices and its JSON reads, for one runtime's app."""

    def __init__(self, runtime: RuntimeView, sse: SseEndpoint) -> None:
        self.runtime = runtime
        self.sse = sse
        self.feed = InspectorFeed(runtime)
        self.page = _read_page_file("index.html")
        self.assets = {name: _read_page_file(name) for name in ASSETS}

    async def page_html(self, request: Request) -> Response:
        if carries_token(request, self.runtime.config.api_token):
            return Response(self.page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)
        headers = {**PAGE_HEADERS, "WWW-Authenticate": 'Bearer realm="outbound"'}
        return Response(
            self.page, status_code=401, media_type="text/html; charset=utf-8", headers=headers
        )

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.assets:
            return error_response(404, f"no file {name!r} in the inspector")
        return Response(self.assets[name], media_type=ASSETS[name], headers=PAGE_HEADERS)

    async def events(self, request: Request) -> Response:
        if not self.feed.bind():
            return error_response(503, "the runtime is not running")
        self.feed.page_connected()
        try:
            # Off the loop: in a cluster the first page waits for the run records to be read.
            await run_blocking(self.runtime, self.feed.follow_cluster)
        except Exception as error:  # the page still hears this node's runs
            logger.warning("inspector: the cluster's runs are not followed: %s", error)
        except BaseException:
            self.feed.page_gone()
            raise
        response = await self.sse.open_stream(
            request, self.feed.hub, STREAM, {}, on_close=self.feed.page_gone
        )
        if not isinstance(response, SubscriptionResponse):
            self.feed.page_gone()
        return response

    async def runs(self, request: Request) -> Response:
        params = request.query_params
        for name in params:
            if name not in LIST_PARAMETERS:
                return error_response(
                    400, f"unknown parameter {name!r}: use {', '.join(LIST_PARAMETERS)}"
                )
        asked = {name: params[name] for name in LIST_PARAMETERS if params.get(name)}
        raw_limit = asked.pop("limit", "50")
        if not raw_limit.isdigit():
            return error_response(400, "limit must be a whole number from 1 to 500")
        try:
            page = await run_blocking(
                self.runtime, lambda: self.runtime.recent_runs(int(raw_limit), **asked)
            )
        except ValueError as error:
            return error_response(400, str(error))
        answer = page.as_dict()
        answer["node"] = self.runtime.config.node_id or None
        answer["workflows"] = self.runtime.workflows
        return JSONResponse(answer)

    async def stats(self, request: Request) -> Response:
        return JSONResponse(await run_blocking(self.runtime, self.runtime.stats))


def inspector_routes(inspector: Inspector) -> list[BaseRoute]:
    return [
        Route("/inspector", inspector.page_html, methods=["GET"]),
        Route("/inspector/events", inspector.events, methods=["GET"]),
        Route("/inspector/{name}", inspector.asset, methods=["GET"]),
        Route("/runs", inspector.runs, methods=["GET"]),
        Route("/stats", inspector.stats, methods=["GET"]),
    ]
