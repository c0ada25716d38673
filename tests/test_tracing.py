"""W3C trace context and spans, checked with the OpenTelemetry SDK's in-memory exporter.

A run started inside a trace (an active span, or a `traceparent` header on
`POST /workflows/{id}/events`) is a span of that trace, each HTTP attempt of
its sends a child span, and the request carries the attempt's `traceparent`.
Without an SDK nothing makes spans, and the caller's `traceparent` goes out
as it came. Requests go to a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from outbound import Runtime
from outbound.embedded import SinkResponse

INCOMING = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """An SDK tracer provider for this test only, spans kept in memory.

    The API lets an application set its provider once per process; as
    opentelemetry's own test utilities do, the test sets the global for its
    duration and puts the unset one back, so no other test runs with an SDK.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield exporter
    provider.shutdown()


def by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    named: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        named.setdefault(span.name, []).append(span)
    return named


def traceparent(span: Any) -> str:
    context = span.get_span_context() if hasattr(span, "get_span_context") else span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def send_one(rt: Runtime, url: str) -> None:
    @rt.workflow("p_traced")
    def traced(event: Any, ctx: Any) -> None:
        ctx.send.http(url, data={"n": (event or {}).get("n")})


def post_events(rt: Runtime, make_api: Any, sink: Any, headers_by_n: dict[int, Any]) -> None:
    """POST one event `{"n": n}` per entry, with its headers, to the runtime's API; flush."""
    send_one(rt, sink.url)
    api = make_api(rt)
    for n, headers in headers_by_n.items():
        answer = httpx.post(api.url + "/workflows/p_traced/events", json={"n": n}, headers=headers)
        assert answer.status_code == 202
    assert rt.flush(timeout=20)


def test_a_run_in_a_trace_is_a_span_and_each_attempt_a_child(
    make_runtime: Any, make_sink: Any, spans: InMemorySpanExporter
) -> None:
    answers = iter([SinkResponse(status=503), SinkResponse(status=200)])
    sink = make_sink(lambda _request: next(answers))
    rt = make_runtime()
    send_one(rt, sink.url + "/hook")
    with trace.get_tracer("test").start_as_current_span("caller") as caller:
        result = rt.run("p_traced")
    assert rt.flush(timeout=20)
    (record,) = rt.deliveries(result.run_id)
    assert record.status == "delivered" and record.attempts == 2

    named = by_name(spans)
    (run,) = named["run p_traced"]
    failed, delivered = sorted(named["POST"], key=lambda span: span.start_time or 0)
    caller_context = caller.get_span_context()
    assert run.context.trace_id == caller_context.trace_id
    assert run.parent is not None and run.parent.span_id == caller_context.span_id
    assert run.attributes is not None and run.attributes["outbound.run_id"] == result.run_id
    for attempt, status in ((failed, 503), (delivered, 200)):
        assert attempt.kind is SpanKind.CLIENT
        assert attempt.parent is not None and attempt.parent.span_id == run.context.span_id
        assert attempt.attributes is not None
        assert attempt.attributes["http.response.status_code"] == status
        assert attempt.attributes["outbound.delivery_id"] == record.id
    assert failed.status.status_code is StatusCode.ERROR
    assert delivered.status.status_code is StatusCode.UNSET
    # Each request names its own attempt's span as the parent of whatever the receiver does.
    first, second = sink.wait_for(2)
    assert first.headers["traceparent"] == traceparent(failed)
    assert second.headers["traceparent"] == traceparent(delivered)


def test_a_failed_run_span_is_an_error(make_runtime: Any, spans: InMemorySpanExporter) -> None:
    rt = make_runtime()

    @rt.workflow("p_fails")
    def fails(event: Any, ctx: Any) -> None:
        raise RuntimeError("boom")

    assert rt.run("p_fails").status == "failed"
    (run,) = by_name(spans)["run p_fails"]
    assert run.parent is None  # outside any trace: a trace of its own
    assert run.status.status_code is StatusCode.ERROR and "boom" in (run.status.description or "")


def test_async_workflows_send_in_their_run_span(
    make_runtime: Any, sink: Any, spans: InMemorySpanExporter
) -> None:
    rt = make_runtime()

    @rt.workflow("p_async")
    async def in_async(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url, data={"id": 1})

    rt.run("p_async")
    assert rt.flush(timeout=20)
    named = by_name(spans)
    (run,) = named["run p_async"]
    (attempt,) = named["POST"]
    assert attempt.parent is not None and attempt.parent.span_id == run.context.span_id


def test_a_posted_traceparent_reaches_the_request_without_an_sdk(
    make_runtime: Any, make_api: Any, sink: Any
) -> None:
    post_events(make_runtime(), make_api, sink, {1: {"traceparent": INCOMING}, 2: {}})
    traced_request, untraced_request = sorted(
        sink.wait_for(2), key=lambda request: request.json()["n"]
    )
    assert traced_request.headers["traceparent"] == INCOMING  # no SDK: passed on as it came
    assert "traceparent" not in untraced_request.headers


def test_a_posted_traceparent_is_the_parent_of_the_run_span(
    make_runtime: Any, make_api: Any, sink: Any, spans: InMemorySpanExporter
) -> None:
    post_events(make_runtime(), make_api, sink, {1: {"traceparent": INCOMING}})
    named = by_name(spans)
    (run,) = named["run p_traced"]
    (attempt,) = named["POST"]
    assert f"{run.context.trace_id:032x}" == INCOMING.split("-")[1]
    assert run.parent is not None and f"{run.parent.span_id:016x}" == INCOMING.split("-")[2]
    assert sink.wait_for(1)[0].headers["traceparent"] == traceparent(attempt)


def test_untraced_runs_make_no_spans_and_send_no_traceparent(make_runtime: Any, sink: Any) -> None:
    rt = make_runtime()
    send_one(rt, sink.url)
    rt.run("p_traced")
    assert rt.flush(timeout=20)
    (request,) = sink.wait_for(1)
    assert "traceparent" not in request.headers
    assert request.headers["user-agent"].startswith("outbound/")


def test_a_published_event_keeps_its_trace_through_the_journal(
    make_runtime: Any, sink: Any, nats_server: Any, journal_cluster: str
) -> None:
    """In a cluster the event waits in the journal for any node: its trace goes with it."""
    rt = make_runtime(journal=nats_server.url, cluster=journal_cluster)
    send_one(rt, sink.url)
    token = context.attach(TraceContextTextMapPropagator().extract({"traceparent": INCOMING}))
    try:
        rt.publish("p_traced", {"n": 1})
    finally:
        context.detach(token)
    rt.publish("p_traced", {"n": 2})
    traced_request, untraced_request = sorted(
        sink.wait_for(2, timeout=30), key=lambda request: request.json()["n"]
    )
    assert traced_request.headers["traceparent"] == INCOMING
    assert "traceparent" not in untraced_request.headers
