"""Runs in traces: the span of a run, and the trace a run starts in.

Owns `RunTrace` and its steps, which `outbound.run` calls: `start_run_trace`
(when a run starts: a span named `run <workflow>`, child of the trace its
caller was in; without an OpenTelemetry SDK no span, only the caller's trace
context, if any, to pass on), `call_in_trace` / `await_in_trace` (the
workflow function runs with that span active, so its `ctx.send.http(...)`
calls take its `traceparent`, and the application's own spans nest under
it), and `end_run_trace`. The trace a run starts in is captured when it is
submitted (`RunStarter`, with `current_traceparent`); `incoming_trace` makes
the `traceparent` header of `POST /workflows/{id}/events` the current
context while the API starts the run. A run outside any trace, with no SDK,
costs one lookup of the current span and one of the tracer provider. Takes
what it needs as arguments; must not import the runtime facade.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from outbound.destinations.tracing import context_of, current_traceparent, tracer

if TYPE_CHECKING:
    from outbound.send import RunInfo

__all__ = [
    "RunTrace",
    "await_in_trace",
    "call_in_trace",
    "current_traceparent",
    "end_run_trace",
    "in_current_context",
    "incoming_trace",
    "start_run_trace",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RunTrace:
    """What a traced run carries: the context its workflow runs in, and its span (with an SDK)."""

    context: otel_context.Context
    span: trace.Span | None


def start_run_trace(info: RunInfo) -> RunTrace | None:
    """The span of a run starting now; None when there is nothing to trace (no SDK, no parent)."""
    spans = tracer()
    parent = context_of(info.traceparent) if info.traceparent is not None else None
    if spans is None:
        if parent is None:
            return None
        return RunTrace(parent, None)  # no SDK: the caller's trace passes through as it is
    span = spans.start_span(
        f"run {info.workflow_id}",
        context=parent,
        attributes={"outbound.workflow_id": info.workflow_id, "outbound.run_id": info.run_id},
    )
    return RunTrace(trace.set_span_in_context(span, parent), span)


def call_in_trace(run_trace: RunTrace | None, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` with the run's span as the active one."""
    if run_trace is None:
        return fn(*args)
    token = otel_context.attach(run_trace.context)
    try:
        return fn(*args)
    finally:
        otel_context.detach(token)


async def await_in_trace(
    run_trace: RunTrace | None, fn: Callable[..., Awaitable[T]], *args: Any
) -> T:
    """`await fn(*args)` with the run's span as the active one (an async workflow)."""
    if run_trace is None:
        return await fn(*args)
    token = otel_context.attach(run_trace.context)
    try:
        return await fn(*args)
    finally:
        otel_context.detach(token)


def end_run_trace(run_trace: RunTrace, status: str, sends: int, error: str | None) -> None:
    """End the run's span with how the run ended (a failed run's span is an error)."""
    span = run_trace.span
    if span is None:
        return
    span.set_attribute("outbound.status", status)
    span.set_attribute("outbound.sends", sends)
    if status == "failed":
        span.set_status(Status(StatusCode.ERROR, error or "failed"))
    span.end()


@contextlib.contextmanager
def incoming_trace(headers: Mapping[str, str]) -> Iterator[None]:
    """A request's `traceparent` header as the current trace context, for the run it starts."""
    parent = context_of(headers.get("traceparent"))
    if parent is None:
        yield
        return
    token = otel_context.attach(parent)
    try:
        yield
    finally:
        otel_context.detach(token)


def in_current_context(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` to be called on another thread in this thread's context (its trace included)."""
    return functools.partial(contextvars.copy_context().run, fn)
