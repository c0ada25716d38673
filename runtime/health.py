"""`Runtime.health()`'s answer: the runtime's state and each destination actor's.

Owns how the answer is put together: each destination's status from the
supervisor (`Machinery.destination_health`: `failed` once given up on,
`retrying` once a batch has kept failing for longer than
`OUTBOUND_HEALTH_RETRYING_AFTER`), what the SSE hub could not publish, the
journal's state (degraded while it is disconnected), and the overall
`ok`/`degraded`. Takes what it needs as arguments; must not import the
runtime facade.
"""

from __future__ import annotations

from typing import Any

from outbound.destinations.sse.hub import SseHub
from outbound.machinery import Machinery


def health_report(
    state: str,
    machinery: Machinery | None,
    retrying_after: float,
    sse_hub: SseHub,
    supervisor_error: BaseException | None,
    http_endpoints: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`{status: ok|degraded, state, destinations: {name: {status, ...}}, error}`.

    `degraded` unless the runtime runs and every destination actor runs. The
    HTTP destination's entry also lists its `open_circuits` (by host) and
    `gone_endpoints` (`http_endpoints`): the endpoints' trouble, not the
    runtime's, so they do not make it degraded.
    """
    children = {} if machinery is None else machinery.destination_health(retrying_after)
    http = children.get("http")
    if http is not None and http_endpoints is not None:
        http.update(http_endpoints)
    sse = children.get("sse")
    if sse is not None:
        sse["publish_errors"] = sse_hub.publish_errors
        sse["last_publish_error"] = sse_hub.last_publish_error
    healthy = state == "running" and all(c["status"] == "running" for c in children.values())
    report = {
        "status": "ok" if healthy else "degraded",
        "state": state,
        "destinations": children,
        "error": str(supervisor_error) if supervisor_error else None,
    }
    journal = machinery.journal if machinery is not None else None
    if journal is not None:
        # Disconnected, or connected but not storing (a NATS cluster electing a leader):
        # runs wait for their sends to be stored, so the runtime is degraded.
        report["journal"] = journal.state()
        if not report["journal"]["connected"] or not report["journal"]["storing"]:
            report["status"] = "degraded"
    return report
