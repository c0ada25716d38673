"""The HTTP API of a runtime as a Starlette app: triggers, runs, emits, health, metrics, SQL.

Owns `create_app(runtime)` (what `Runtime.asgi_app()` returns) and the
endpoints but SSE (`outbound.api.sse`):

- `GET /pipelines/{workflow_id}/sse`: the workflow's stream (`outbound.api.sse`).
- `POST /workflows/{workflow_id}/events`: JSON body -> a run; 202 with `run_id`
  once the event is journaled (with a journal); 503 with `Retry-After` when the
  runtime stays full, or the journal does not answer, for `TRIGGER_WAIT` s.
- `GET /runs/{run_id}`: the run's result and its delivery records.
- `GET /workflows/{workflow_id}/emits`: the events a workflow emitted.
- `GET /healthz`, `GET /metrics` (Prometheus), `POST /sql` (`{"query": ...}`).
- The inspector's page and reads (`GET /inspector`, `/runs`, `/stats`): `outbound.api.inspector`.

Access rules are `outbound.api.auth`'s; JSON bodies nested deeper than
`MAX_JSON_DEPTH` are refused with 400. Reads the runtime only through
`RuntimeView` (its public methods); delivery logic is not here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from outbound.admission import Busy, poll_admission
from outbound.api.auth import Cors, RequireToken
from outbound.api.inspector import Inspector, inspector_routes
from outbound.api.loop_bridge import run_blocking
from outbound.api.messages import PayloadTooLargeError, error_response, load_json, read_body
from outbound.api.metrics import CONTENT_TYPE, metrics_for
from outbound.api.sse import SseEndpoint
from outbound.api.view import Record, RuntimeView
from outbound.journal.settings import journal_mode
from outbound.tracing import in_current_context, incoming_trace

TRIGGER_WAIT = 2.0  # seconds POST /workflows/{id}/events waits for room before answering 503
TRIGGER_RETRY_AFTER = 1  # ... and the Retry-After (seconds) of that 503


class Api:
    """The endpoint functions of one runtime's app (but SSE's)."""

    def __init__(self, runtime: RuntimeView) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.cors = Cors(self.config.cors_origins)
        self.metrics = metrics_for(runtime)

    def _known(self, workflow_id: str) -> bool:
        return workflow_id in self.runtime.workflows

    async def trigger(self, request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        if not self._known(workflow_id):
            return error_response(404, f"no workflow {workflow_id!r}")
        limit = self.config.max_payload_bytes
        try:
            body = await read_body(request, limit)
        except PayloadTooLargeError:
            return error_response(413, f"the body is larger than {limit} bytes")
        try:
            event = load_json(body)
        except (UnicodeDecodeError, ValueError) as error:
            return error_response(400, f"the body must be JSON: {error}")
        try:
            with incoming_trace(request.headers):  # its traceparent: the run joins that trace
                run_id = await self._start_run(workflow_id, event)
        except Busy as error:  # full (backpressure), or the journal did not answer in time
            return error_response(503, str(error), {"Retry-After": str(TRIGGER_RETRY_AFTER)})
        except RuntimeError as error:  # not running (starting or stopping)
            return error_response(503, str(error))
        return JSONResponse(
            {"run_id": run_id, "workflow_id": workflow_id, "status": "accepted"},
            status_code=202,
            headers={"Location": f"{request.scope.get('root_path', '')}/runs/{run_id}"},
        )

    async def _start_run(self, workflow_id: str, event: Any) -> str:
        """The run of a posted event; with a journal, only once the event is journaled.

        Without a journal: `submit`, polled while full, so the loop never blocks.
        With one: `publish` on a worker thread (it waits for the journal's answer).
        Either way at most `TRIGGER_WAIT` s, then `Busy`.
        """
        if self.config.journal == "off":
            submit = functools.partial(self.runtime.submit, workflow_id, event, timeout=0)
            future = await poll_admission(submit, timeout=TRIGGER_WAIT)
            return future.run_id
        publish = in_current_context(  # the trace (incoming_trace) goes to the worker thread
            functools.partial(self.runtime.publish, workflow_id, event, TRIGGER_WAIT)
        )
        return await run_blocking(self.runtime, publish)  # type: ignore[no-any-return]

    async def run(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        if self.runtime.run_in_progress(run_id):
            return JSONResponse({"run_id": run_id, "status": "running", "deliveries": []})
        # Blocking: in a cluster, a run of another node is read from the cluster.
        found = await run_blocking(self.runtime, self._run_and_deliveries, run_id)
        if found is None:
            # In a cluster another node's run is known here once it ended and its record
            # was stored (about a second later): until then it is a 404 here.
            clustered = journal_mode(self.runtime.config.journal) == "nats"
            elsewhere = ", still running on another node" if clustered else ""
            return error_response(
                404, f"no run {run_id!r} (unknown{elsewhere}, or older than the run history)"
            )
        result, deliveries = found
        records = [record.as_dict() for record in deliveries]
        return JSONResponse(
            {
                **result.as_dict(),
                "delivered": sum(1 for record in records if record["status"] == "delivered"),
                "deliveries": records,
            }
        )

    def _run_and_deliveries(self, run_id: str) -> tuple[Record, Sequence[Record]] | None:
        result = self.runtime.run_result(run_id)
        if result is None:
            return None
        try:
            return result, self.runtime.deliveries(run_id)
        except KeyError:  # dropped from the history in between
            return None

    async def emits(self, request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        if not self._known(workflow_id):
            return error_response(404, f"no workflow {workflow_id!r}")
        raw_limit = request.query_params.get("limit")
        limit = None
        if raw_limit is not None:
            if not raw_limit.isdigit() or int(raw_limit) < 1:
                return error_response(400, "limit must be a positive whole number")
            limit = int(raw_limit)
        emitted = self.runtime.emits(workflow_id, limit)
        return JSONResponse({"workflow_id": workflow_id, "emits": emitted})

    async def healthz(self, request: Request) -> Response:
        health = await run_blocking(self.runtime, self.runtime.health)
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def sql(self, request: Request) -> Response:
        try:
            body = await read_body(request, self.config.max_payload_bytes)
            request_json = load_json(body)
        except PayloadTooLargeError:
            return error_response(
                413, f"the body is larger than {self.config.max_payload_bytes} bytes"
            )
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            return error_response(
                400, f'the body must be JSON like {{"query": "SELECT ..."}}: {error}'
            )
        query = request_json.get("query") if isinstance(request_json, dict) else None
        if not isinstance(query, str) or not query.strip():
            return error_response(
                400, 'the body must be {"query": "SELECT ..."} with a non-empty query'
            )
        if not self.config.database_url:
            return error_response(503, "SQL is not configured: set OUTBOUND_DATABASE_URL")
        try:
            result = await run_blocking(self.runtime, self.runtime.sql_query, query)
        except (ValueError, PermissionError) as error:  # refused or invalid query
            return error_response(400, str(error))
        except RuntimeError as error:  # not configured or not running
            return error_response(503, str(error))
        except Exception as error:  # Postgres refused it (has a SQLSTATE), or queries are off
            return error_response(_sql_error_status(error), f"{type(error).__name__}: {error}")
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


def create_app(runtime: RuntimeView) -> Starlette:
    """The Starlette app of `runtime`'s HTTP API (what `Runtime.asgi_app()` returns)."""
    api = Api(runtime)
    sse = SseEndpoint(runtime, api.cors)
    routes = [
        Route("/pipelines/{workflow_id}/sse", sse.stream, methods=["GET"]),
        Route("/pipelines/{workflow_id}/sse", sse.preflight, methods=["OPTIONS"]),
        Route("/workflows/{workflow_id}/events", api.trigger, methods=["POST"]),
        Route("/workflows/{workflow_id}/emits", api.emits, methods=["GET"]),
        Route("/runs/{run_id}", api.run, methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/metrics", api.metrics_text, methods=["GET"]),
        Route("/sql", api.sql, methods=["POST"]),
    ]
    inspector = Inspector(runtime, sse)  # GET /inspector, /inspector/events, /runs, /stats
    routes += inspector_routes(inspector)
    middleware = [Middleware(RequireToken, token=runtime.config.api_token, cors=api.cors)]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.sse = sse
    app.state.inspector = inspector
    return app
