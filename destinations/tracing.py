"""W3C trace context through `opentelemetry-api`: what runs and deliveries share.

Owns `tracer()` (the tracer of the configured OpenTelemetry SDK, or None
while none is: then nothing makes spans and the API's no-op path is not even
entered), `current_traceparent()` (the active span as a `traceparent`
header value, None outside a trace) and `context_of(traceparent)` (a header
value back as the context a span starts in). The runtime makes run spans
with them (`outbound.tracing`), the HTTP destination its attempt spans
(`destinations/http/tracing.py`). Only the API package is needed; an
application that installs and configures the SDK gets the spans. No I/O;
must not import the runtime.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

#: The name (instrumentation scope) of Outbound's spans.
TRACER_NAME = "outbound"
_W3C = TraceContextTextMapPropagator()
_current_context = otel_context.get_current
_tracers: dict[int, tuple[Any, trace.Tracer]] = {}  # id(provider) -> (provider, its tracer)
_UNCONFIGURED = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
_ASK = object()

# A provider named by OTEL_PYTHON_TRACER_PROVIDER is loaded by the API's
# get_tracer_provider() at its first call: `tracer()` asks it then.
_PROVIDER_IN_ENVIRONMENT = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def tracer() -> trace.Tracer | None:
    """The tracer of the SDK the application configured, or None without one (no spans).

    Looked up at each use, not kept from import time: the application may set
    its provider after importing Outbound (and tests set one per test). It
    reads the API's global provider as the API's own `ProxyTracer` does, not
    through `get_tracer_provider()`, whose check of the environment cost more
    than a microsecond a call (measured), on every run and every attempt.
    """
    provider = getattr(trace, "_TRACER_PROVIDER", _ASK)
    if provider is _ASK or (provider is None and _PROVIDER_IN_ENVIRONMENT):
        provider = trace.get_tracer_provider()  # (an API without that global, or one to load)
    if provider is None or isinstance(provider, _UNCONFIGURED):
        return None
    known = _tracers.get(id(provider))
    if known is None or known[0] is not provider:
        known = (provider, provider.get_tracer(TRACER_NAME))
        _tracers.clear()  # one provider at a time in practice; no growth if they change
        _tracers[id(provider)] = known
    return known[1]


def current_traceparent() -> str | None:
    """The active span (the caller's, or a run's) as a W3C `traceparent`; None outside a trace."""
    context = _current_context()
    if not context:  # nothing attached (no span, no baggage): the usual case, and cheap
        return None
    span_context = trace.get_current_span(context).get_span_context()
    if not span_context.is_valid:
        return None
    return traceparent_of(span_context)


def traceparent_of(span_context: trace.SpanContext) -> str:
    """`00-<trace id>-<span id>-<flags>` (W3C Trace Context, version 00)."""
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{span_context.trace_flags:02x}"
    )


def context_of(traceparent: str | None) -> Context | None:
    """A `traceparent` value as the (remote) parent context of a span; None if absent or invalid."""
    if not traceparent:
        return None
    context = _W3C.extract({"traceparent": traceparent})
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def valid_traceparent(value: Any) -> str | None:
    """`value` if it is a valid W3C `traceparent` (as a header or a caller gave it), else None."""
    if not isinstance(value, str) or context_of(value) is None:
        return None
    return value.strip().lower()
