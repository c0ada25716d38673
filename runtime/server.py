"""The HTTP API of a runtime: SSE streams, HTTP triggers, run inspector, health, metrics, SQL.

Owns `create_app(runtime)` (the Starlette app behind `Runtime.asgi_app()`) and
`ApiServer`, which serves that app with hypercorn on the runtime's own trio
loop, where the SSE hub's streams and subscriber queues live: there a stream
reads its hub queue directly. Served by anything else (another hypercorn or
uvicorn, trio or asyncio), the SSE endpoint relays through
`runtime.loop_bridge`. Endpoints:

- `GET /pipelines/{workflow_id}/sse`: the workflow's stream (history, then
  live; `Last-Event-ID` header or `?lastEventId=` resumes), with CORS headers.
- `POST /workflows/{workflow_id}/events`: JSON body -> a run; 202 with `run_id`
  (503 with `Retry-After` when the runtime stays full for `TRIGGER_WAIT` s).
- `GET /runs/{run_id}`: the run's result and its delivery records.
- `GET /healthz`, `GET /metrics` (Prometheus), `POST /sql` (`{"query": ...}`).

With `Config.api_token` set, everything but `/healthz` needs `Authorization:
Bearer <token>` (the SSE endpoint also takes `?token=`, as browsers'
EventSource cannot set headers). These rules match the route path, so they
hold when the app is mounted under a prefix (`Mount("/outbound", app=...)`).
JSON bodies nested deeper than `MAX_JSON_DEPTH` are refused with 400.
Delivery logic is not here: this module only calls the runtime's public
methods and the hub.
"""

from __future__ import annotations

import array
import concurrent.futures
import functools
import hmac
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outbound.admission import Busy, poll_admission
from outbound.destinations.sse import HubClosedError
from outbound.loop_bridge import RelayedFrames, run_blocking
from outbound.metrics import CONTENT_TYPE, metrics_for
from outbound.sockets import shutdown_connection

if TYPE_CHECKING:
    from outbound.runtime import Runtime

logger = logging.getLogger(__name__)

SSE_PREFIX = "/pipelines/"
SSE_SUFFIX = "/sse"
TRIGGER_WAIT = 2.0  # seconds POST /workflows/{id}/events waits for room before answering 503
TRIGGER_RETRY_AFTER = 1  # ... and the Retry-After (seconds) of that 503
MAX_JSON_DEPTH = 128  # nesting of request bodies (serde_json's default limit too)


def _is_sse_path(path: str) -> bool:
    return path.startswith(SSE_PREFIX) and path.endswith(SSE_SUFFIX)


def _route_path(scope: Scope) -> str:
    """The path below the app's mount point: `/healthz` for `/outbound/healthz`
    when mounted at `/outbound` (ASGI puts the prefix in `root_path`)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path) and path[len(root_path) :].startswith("/"):
        return path[len(root_path) :]
    return path


def _load_json(body: bytes) -> Any:
    """Parse a request body; ValueError (a 400) when it is not JSON or nests too deeply.

    Too deep is refused here, not only when the parser runs out of stack: a
    value that barely parses would fail again later (encoding it for
    `GET /runs`, copying it into sends) with a RecursionError, a 500.
    """
    try:
        value = json.loads(body)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    # Cheap first: fewer brackets than the limit cannot nest deeper than it.
    brackets = body.count(b"[") + body.count(b"{")
    if brackets > MAX_JSON_DEPTH and _json_depth(body) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1, +1, -1, -1 as int8
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _json_depth(body: bytes) -> int:
    """How deeply lists/objects nest in `body`, valid JSON (already parsed).

    Counted on the bytes at C speed (strings removed, brackets as +1/-1, the
    highest running sum): walking the parsed value in Python took four times
    as long as parsing it.
    """
    encoding = json.detect_encoding(body)
    if encoding != "utf-8":
        body = body.decode(encoding).encode("utf-8")
    steps = _JSON_STRING.sub(b"", body).translate(_BRACKET_STEPS, _NOT_BRACKETS)
    return max(itertools.accumulate(array.array("b", steps)), default=0)


class Cors:
    """The CORS answer for the SSE endpoint, from `Config.cors_origins` (comma-separated)."""

    def __init__(self, origins: str) -> None:
        self.origins = {origin.strip() for origin in origins.split(",") if origin.strip()}

    def headers(self, origin: str | None) -> dict[str, str]:
        if "*" in self.origins:
            return {"Access-Control-Allow-Origin": "*"}
        if origin and origin in self.origins:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {"Vary": "Origin"}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class RequireToken:
    """ASGI middleware: a bearer token on every request but `/healthz` (when one is configured)."""

    def __init__(self, app: ASGIApp, token: str | None, cors: Cors) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        if path == "/healthz":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        sse = _is_sse_path(path)
        if sse and request.method == "OPTIONS":  # CORS preflight carries no credentials
            await self.app(scope, receive, send)
            return
        offered = _bearer(request.headers.get("authorization"))
        if offered is None and sse:
            offered = request.query_params.get("token")
        if offered is not None and hmac.compare_digest(offered.encode("utf-8"), self.token):
            await self.app(scope, receive, send)
            return
        headers = {"WWW-Authenticate": 'Bearer realm="outbound"'}
        if sse:
            headers.update(self.cors.headers(request.headers.get("origin")))
        reason = "missing bearer token" if offered is None else "wrong bearer token"
        await _error(401, f"unauthorized: {reason}", headers)(scope, receive, send)


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class _PayloadTooLargeError(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _PayloadTooLargeError
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _PayloadTooLargeError
        chunks.append(chunk)
    return b"".join(chunks)


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


class Api:
    """The endpoint functions of one runtime's app."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.cors = Cors(self.config.cors_origins)
        self.metrics = metrics_for(runtime)
        self.open_streams: set[tuple[Any, Any]] = set()  # (server, client) of SSE responses

    def _known(self, workflow_id: str) -> bool:
        return workflow_id in self.runtime.workflows

    async def sse(self, request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        cors = self.cors.headers(request.headers.get("origin"))
        if not self._known(workflow_id):
            return _error(404, f"no workflow {workflow_id!r}", cors)
        hub = self.runtime.sse_hub
        if hub.loop is None or not self.runtime.running:
            return _error(503, "the runtime is not running", cors)
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
                subscription = hub.subscribe(workflow_id, last_event_id)
                subscription.on_drop = cut
                content, on_close = (
                    hub.frames(subscription),
                    functools.partial(hub.unsubscribe, subscription),
                )
            else:
                relayed = await RelayedFrames.open(hub, workflow_id, last_event_id, cut)
                content, on_close = relayed.chunks(), relayed.close
        except HubClosedError as error:
            return _error(503, str(error), cors)
        self.open_streams.add(connection)

        def closed() -> None:
            self.open_streams.discard(connection)
            on_close()

        return SubscriptionResponse(content, closed, cors)

    async def sse_preflight(self, request: Request) -> Response:
        headers = self.cors.headers(request.headers.get("origin"))
        headers["Access-Control-Allow-Methods"] = "GET, OPTIONS"
        headers["Access-Control-Allow-Headers"] = "Authorization, Last-Event-ID, Cache-Control"
        headers["Access-Control-Max-Age"] = "600"
        return Response(status_code=204, headers=headers)

    async def trigger(self, request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        if not self._known(workflow_id):
            return _error(404, f"no workflow {workflow_id!r}")
        limit = self.config.max_payload_bytes
        try:
            body = await _read_body(request, limit)
        except _PayloadTooLargeError:
            return _error(413, f"the body is larger than {limit} bytes")
        try:
            event = _load_json(body)
        except (UnicodeDecodeError, ValueError) as error:
            return _error(400, f"the body must be JSON: {error}")
        try:
            # Full (backpressure): wait a little without blocking the loop, then 503.
            future = await poll_admission(
                functools.partial(self.runtime.submit, workflow_id, event, timeout=0),
                timeout=TRIGGER_WAIT,
            )
        except Busy as error:
            return _error(503, str(error), {"Retry-After": str(TRIGGER_RETRY_AFTER)})
        except RuntimeError as error:  # not running (starting or stopping)
            return _error(503, str(error))
        run_id = future.run_id
        return JSONResponse(
            {"run_id": run_id, "workflow_id": workflow_id, "status": "accepted"},
            status_code=202,
            headers={"Location": f"{request.scope.get('root_path', '')}/runs/{run_id}"},
        )

    async def run(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        result = self.runtime.run_result(run_id)
        if result is None and self.runtime.run_in_progress(run_id):
            return JSONResponse({"run_id": run_id, "status": "running", "deliveries": []})
        try:
            if result is None:
                raise KeyError(run_id)
            deliveries = self.runtime.deliveries(run_id)
        except KeyError:
            return _error(404, f"no run {run_id!r} (unknown, or older than the run history)")
        records = [record.as_dict() for record in deliveries]
        return JSONResponse(
            {
                **result.as_dict(),
                "delivered": sum(1 for record in records if record["status"] == "delivered"),
                "deliveries": records,
            }
        )

    async def emits(self, request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        if not self._known(workflow_id):
            return _error(404, f"no workflow {workflow_id!r}")
        raw_limit = request.query_params.get("limit")
        limit = None
        if raw_limit is not None:
            if not raw_limit.isdigit() or int(raw_limit) < 1:
                return _error(400, "limit must be a positive whole number")
            limit = int(raw_limit)
        emitted = self.runtime.emits(workflow_id, limit)
        return JSONResponse({"workflow_id": workflow_id, "emits": emitted})

    async def healthz(self, request: Request) -> Response:
        health = await run_blocking(self.runtime, self.runtime.health)
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def sql(self, request: Request) -> Response:
        query_fn: Callable[[str], Any] | None = getattr(self.runtime, "sql_query", None)
        if query_fn is None:
            return _error(501, "this version of outbound has no SQL queries")
        try:
            body = await _read_body(request, self.config.max_payload_bytes)
            request_json = _load_json(body)
        except _PayloadTooLargeError:
            return _error(413, f"the body is larger than {self.config.max_payload_bytes} bytes")
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            return _error(400, f'the body must be JSON like {{"query": "SELECT ..."}}: {error}')
        query = request_json.get("query") if isinstance(request_json, dict) else None
        if not isinstance(query, str) or not query.strip():
            return _error(400, 'the body must be {"query": "SELECT ..."} with a non-empty query')
        if not self.config.database_url:
            return _error(503, "SQL is not configured: set OUTBOUND_DATABASE_URL")
        try:
            result = await run_blocking(self.runtime, query_fn, query)
        except (ValueError, PermissionError) as error:  # refused or invalid query
            return _error(400, str(error))
        except RuntimeError as error:  # not configured or not running
            return _error(503, str(error))
        except Exception as error:  # Postgres refused it (has a SQLSTATE), or queries are off
            return _error(_sql_error_status(error), f"{type(error).__name__}: {error}")
        return JSONResponse(result)  # already JSON-friendly values: no second copy


#: SQLSTATE classes that are the server's trouble, not the query's: connection,
#: resources, operator intervention, system errors. `57014` (a statement timeout or
#: cancel) is the query's.
_SERVER_SQLSTATES = ("08", "53", "57", "58", "XX")


def _sql_error_status(error: BaseException) -> int:
    """400 for a query Postgres refused; 503 when queries cannot run at all (the query API
    is refused, Postgres is unreachable or busy)."""
    sqlstate = getattr(error, "sqlstate", None)
    if not sqlstate:
        return 503
    if sqlstate[:2] in _SERVER_SQLSTATES and sqlstate != "57014":
        return 503
    return 400


def _address(value: Any) -> tuple[Any, ...] | None:
    return tuple(value) if value else None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def create_app(runtime: Runtime) -> Starlette:
    """The Starlette app of `runtime`'s HTTP API (what `Runtime.asgi_app()` returns)."""
    api = Api(runtime)
    routes = [
        Route("/pipelines/{workflow_id}/sse", api.sse, methods=["GET"]),
        Route("/pipelines/{workflow_id}/sse", api.sse_preflight, methods=["OPTIONS"]),
        Route("/workflows/{workflow_id}/events", api.trigger, methods=["POST"]),
        Route("/workflows/{workflow_id}/emits", api.emits, methods=["GET"]),
        Route("/runs/{run_id}", api.run, methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/metrics", api.metrics_text, methods=["GET"]),
        Route("/sql", api.sql, methods=["POST"]),
    ]
    middleware = [Middleware(RequireToken, token=runtime.config.api_token, cors=api.cors)]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.api = api
    return app


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
        runtime: Runtime,
        host: str = "127.0.0.1",
        port: int = 0,
        graceful_timeout: float = 5.0,
    ) -> None:
        self.runtime = runtime
        self.host = host
        self.port = port
        self.graceful_timeout = graceful_timeout
        self.app = runtime.asgi_app()
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
        return self.runtime.sse_hub.close_all()

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
        open_streams = self.app.state.api.open_streams
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
