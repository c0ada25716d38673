"""The HTTP API wing of a runtime: `create_app(runtime)` and `ApiServer`.

    with rt, ApiServer(rt, port=8000) as server: ...   # or mount rt.asgi_app()

Modules: `view` (`RuntimeView`, the protocol of what the API reads from a
runtime), `app` (the Starlette app and its endpoints), `sse` (the stream
endpoint), `auth` (bearer token, CORS), `messages` (request bodies, error
answers), `metrics` (Prometheus), `loop_bridge` (awaiting the runtime's loop
threads from any event loop), `sockets` (cutting a wedged connection),
`server` (`ApiServer`, hypercorn on the runtime's trio loop), `inspector`
(the web page, `GET /runs`, `GET /stats`; its files in `inspector_page/`)
and `inspector_feed` (the page's live notices). This package
uses only a runtime's public methods and never imports `outbound.runtime`;
`Runtime.asgi_app()` imports it lazily.
"""

from outbound.api.app import create_app
from outbound.api.server import ApiServer
from outbound.api.view import RuntimeView

__all__ = ["ApiServer", "RuntimeView", "create_app"]
