"""One span per HTTP delivery attempt, a child of the span of the run that sent it.

Owns `traced_attempt`, which wraps the workers' `perform` (one attempt of one
send): with an OpenTelemetry SDK configured, each attempt is a CLIENT span
(method, URL, delivery id, attempt number, status code or error), whose
parent is the send's `traceparent` (the run's span, kept on the payload, in
the journal too), and it is the active span while the request is made, so
the request's `traceparent` header names it (`headers.attempt_headers`).
Without an SDK there is no span: the send's own `traceparent`, if it has
one, goes out as it is. Must not import the runtime or another destination.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from outbound.destinations.delivery import Send
from outbound.destinations.tracing import context_of, tracer

Perform = Callable[..., Awaitable[Any]]


def traced_attempt(perform: Perform) -> Perform:
    """`perform(client, send, ...)` as a span per call when an SDK is configured."""

    @functools.wraps(perform)
    async def traced(client: Any, send: Send, *args: Any) -> Any:
        spans = tracer()
        if spans is None:  # no SDK: nothing to record, the send's traceparent goes as it is
            return await perform(client, send, *args)
        request = send.payload
        span = spans.start_span(
            request.method,
            context=context_of(request.traceparent),
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": request.method,
                "url.full": request.url,
                "outbound.delivery_id": send.id,
                "outbound.run_id": send.run_id,
                "outbound.attempt": send.attempts,
            },
        )
        with trace.use_span(span, end_on_exit=True, record_exception=True):
            outcome = await perform(client, send, *args)
            _record(span, outcome)
            return outcome

    return traced


def _record(span: trace.Span, outcome: Any) -> None:
    status_code = getattr(outcome, "status_code", None)
    if status_code is not None:
        span.set_attribute("http.response.status_code", status_code)
    error = getattr(outcome, "error", None)
    if error is not None:
        span.set_attribute("error.type", str(status_code) if status_code else "transport")
        span.set_status(Status(StatusCode.ERROR, error))
