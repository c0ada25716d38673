"""Who may call the API: the bearer token, and CORS for the SSE endpoint.

Owns `RequireToken` (ASGI middleware: with `Config.api_token` set, every
request but `/healthz` and the inspector's page files needs `Authorization:
Bearer <token>`; the SSE streams, the inspector's notices included, also take
`?token=`, as browsers' EventSource cannot set headers), `carries_token`
(the same check, for the inspector's page, which answers 401 itself) and `Cors`
(the answer to an SSE request's `Origin`, from `Config.cors_origins`). The
rules match the route path below the app's mount point, so they hold when the
app is mounted under a prefix. Knows nothing of runtimes.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from outbound.api.messages import error_response

SSE_PREFIX = "/pipelines/"
SSE_SUFFIX = "/sse"


INSPECTOR_EVENTS = "/inspector/events"


def is_sse_path(path: str) -> bool:
    """A stream an EventSource reads: a workflow's, or the inspector's notices."""
    return (path.startswith(SSE_PREFIX) and path.endswith(SSE_SUFFIX)) or path == INSPECTOR_EVENTS


def is_public_path(path: str) -> bool:
    """Passed on without the token: `/healthz`, and the inspector's page and its script
    and style (files of the package, no data). The page itself answers 401 without the
    token (`carries_token`), with itself as the body: a browser shows it, and it asks for
    the token for its reads."""
    if path in ("/healthz", "/inspector"):
        return True
    name = path.removeprefix("/inspector/")
    return name != path and name != "events" and "/" not in name


def route_path(scope: Scope) -> str:
    """The path below the app's mount point: `/healthz` for `/outbound/healthz`
    when mounted at `/outbound` (ASGI puts the prefix in `root_path`)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path) and path[len(root_path) :].startswith("/"):
        return path[len(root_path) :]
    return path


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


class RequireToken:
    """ASGI middleware: a bearer token on every request but public ones (when one is
    configured)."""

    def __init__(self, app: ASGIApp, token: str | None, cors: Cors) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if is_public_path(path):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        sse = is_sse_path(path)
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
        await error_response(401, f"unauthorized: {reason}", headers)(scope, receive, send)


def carries_token(request: Request, token: str | None) -> bool:
    """Whether `request` may read the API: no token configured, or its bearer header is it."""
    if not token:
        return True
    offered = _bearer(request.headers.get("authorization"))
    return offered is not None and hmac.compare_digest(
        offered.encode("utf-8"), token.encode("utf-8")
    )


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
