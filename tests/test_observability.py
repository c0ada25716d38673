"""What an operator sees: WARNING lines for failed runs and failed deliveries (a storm of
failures summarized), JSON log lines, and `/metrics` (dead letters, runs per workflow
bounded, journal lag, no series that cannot move). `outbound serve`'s own JSON logs are
in test_serve.py."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from outbound import Runtime
from outbound.api.metrics import LABELLED_WORKFLOWS, OTHER_WORKFLOWS
from outbound.destinations.deadletter import FailureLog
from outbound.destinations.delivery import Send
from outbound.embedded import HttpSink, SinkResponse
from outbound.logs import JsonFormatter

PASSWORD = "hunter2-observability"


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    answer = httpx.get(f"{url}/metrics", timeout=10)
    assert answer.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """A JSON-formatted handler on the `outbound` logger, as an app (or `outbound serve`
    with OUTBOUND_LOG_FORMAT=json) would add one; removed afterwards."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("outbound")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_failed_run_and_failed_delivery_are_warning_json_lines(
    make_runtime: Callable[..., Runtime],
    make_sink: Callable[..., HttpSink],
    json_lines: io.StringIO,
) -> None:
    sink = make_sink(lambda _request: SinkResponse(422, body=b"no"))
    rt = make_runtime()

    def reserve(event: Any) -> None:
        raise KeyError(event["sku"])

    @rt.workflow("p_reserve")
    def fails(event: Any, ctx: Any) -> None:
        reserve(event)

    @rt.workflow("p_hook")
    def hook(event: Any, ctx: Any) -> None:
        ctx.send.http(f"{sink.url}/hook", data=event, auth=("user", PASSWORD))

    failed_run = rt.run("p_reserve", {"sku": "A-7"})
    sent = rt.run("p_hook", {"n": 1})
    assert rt.flush(timeout=10)
    (delivery,) = rt.deliveries(sent.run_id)
    assert delivery.status == "failed"

    lines = parsed(json_lines)  # every line is one JSON object
    (run_line,) = [line for line in lines if line["logger"] == "outbound.run"]
    assert run_line["level"] == "WARNING" and run_line["time"].endswith("Z")
    assert run_line["run_id"] == failed_run.run_id and run_line["workflow_id"] == "p_reserve"
    assert run_line["message"].endswith("failed: KeyError: 'A-7'")
    assert run_line["exception"].startswith("Traceback (most recent call last):")
    assert "in reserve" in run_line["exception"]
    (delivery_line,) = [line for line in lines if "dead-lettered" in line["message"]]
    assert delivery_line["level"] == "WARNING"
    assert delivery_line["destination"] == "http"
    assert delivery_line["delivery_ids"] == [delivery.id]
    assert delivery_line["error"] == "HTTP 422" and delivery_line["failed_sends"] == 1
    assert delivery.id in delivery_line["message"] and "HTTP 422" in delivery_line["message"]
    assert PASSWORD not in json_lines.getvalue()


def test_a_storm_of_failed_deliveries_logs_a_few_lines_and_a_summary(
    make_runtime: Callable[..., Runtime],
    make_sink: Callable[..., HttpSink],
    make_api: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = make_sink(lambda _request: SinkResponse(400))
    rt = make_runtime()
    # The limit as the runtime has it, in a window no test run outlasts.
    rt.ledger.dead_letters.failure_log = FailureLog(limit=5, window=3600)

    @rt.workflow("p_hooks")
    def hooks(event: Any, ctx: Any) -> None:
        for number in range(event["count"]):
            ctx.send.http(f"{sink.url}/hook/{number}", data={"n": number})

    api = make_api(rt)
    with caplog.at_level(logging.WARNING, logger="outbound.destinations.deadletter"):
        for _ in range(8):  # failures one after another: a dead-letter write each
            rt.run("p_hooks", {"count": 1})
            assert rt.flush(timeout=10)
        rt.run("p_hooks", {"count": 32})  # and many at once: written together
        assert rt.flush(timeout=20)
        samples = metrics(api.url)
        api.stop()
        rt.stop(timeout=10)  # tells what the last window has not
    assert samples[("outbound_dead_letters_total", (("destination", "http"),))] == 40
    failed = (("destination", "http"), ("status", "failed"))
    assert samples[("outbound_deliveries_total", failed)] == 40
    assert samples[("outbound_dead_letter_errors_total", (("destination", "http"),))] == 0

    records = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert all(r.levelno == logging.WARNING and r.destination == "http" for r in records)
    *each, summary = records
    assert len(each) == 5  # then one summary, not a line per failure
    assert "summarized" in each[-1].getMessage()
    assert "more failed 'http' send(s)" in summary.getMessage()
    assert "HTTP 400" in summary.getMessage()
    assert sum(r.failed_sends for r in records) == 40


def test_failure_log_summarizes_a_window_when_the_next_one_opens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    log = FailureLog(limit=2, window=10.0, clock=lambda: now[0])  # a clock: a unit test

    def fail(count: int) -> list[Send]:
        sends = [Send("email", id=f"d{number}") for number in range(count)]
        for send in sends:
            send.outcome.error = "SMTP 550"
        return sends

    with caplog.at_level(logging.WARNING, logger="outbound.destinations.deadletter"):
        for _ in range(5):
            log.written("email", fail(3), "/data/dead-letter/email.jsonl")
        assert len(caplog.records) == 2  # the limit: 3 writes (9 sends) are counted
        now[0] = 10.0
        log.written("email", fail(1), "/data/dead-letter/email.jsonl")
        log.flush()  # nothing left to tell: the new window logged its one write
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 4
    assert messages[2].startswith("dead-lettered 9 more failed 'email' send(s) in 3 writes")
    assert messages[3].startswith("dead-lettered 1 failed 'email' send(s)")
    assert "d0: SMTP 550; d1: SMTP 550; d2: SMTP 550" in messages[0]


def test_runs_total_has_a_bounded_workflow_label(
    make_runtime: Callable[..., Runtime], make_api: Callable[..., Any]
) -> None:
    rt = make_runtime()
    names = [f"p_{number:02d}" for number in range(LABELLED_WORKFLOWS + 5)]
    for name in names:
        rt.register(name, lambda event, ctx: None)
    for name in names:
        rt.run(name, {})
    rt.run(names[0], {})
    samples = metrics(make_api(rt).url)
    runs = {
        dict(labels)["workflow"]: value
        for (name, labels), value in samples.items()
        if name == "outbound_runs_total" and dict(labels)["status"] == "succeeded"
    }
    assert runs == {
        **{name: 1.0 for name in names[:LABELLED_WORKFLOWS]},
        names[0]: 2.0,
        OTHER_WORKFLOWS: 5.0,
    }
    assert rt.stats()["runs_by_workflow"][names[-1]] == {"succeeded": 1}


def test_metrics_show_journal_lag_and_batch_series_only_where_they_move(
    make_runtime: Callable[..., Runtime], make_api: Callable[..., Any], sink: HttpSink
) -> None:
    rt = make_runtime(journal="local")

    @rt.workflow("p_orders")
    def orders(event: Any, ctx: Any) -> None:
        ctx.send.http(f"{sink.url}/orders", data=event)

    rt.run("p_orders", {"id": 1})
    assert rt.flush(timeout=10)
    samples = metrics(make_api(rt).url)
    assert samples[("outbound_journal_connected", ())] == 1
    assert samples[("outbound_journal_open_entries", ())] == rt.stats()["journal"]["open_entries"]
    assert samples[("outbound_journal_appends_waiting", ())] == 0
    assert samples[("outbound_journal_server_restarts_total", ())] == 0
    assert samples[("outbound_retries_total", (("destination", "http"),))] == 0
    assert ("outbound_retries_total", (("destination", "sse"),)) not in samples
    assert not any(name == "outbound_batch_flushes_total" for name, _ in samples)


def test_the_library_configures_no_logging(make_runtime: Callable[..., Runtime]) -> None:
    """An embedding app's logging setup is its own: a runtime adds no handler and sets no
    level (only `outbound serve` and `outbound replay` do, for their own process)."""
    root, ours = logging.getLogger(), logging.getLogger("outbound")
    before = (list(root.handlers), root.level, list(ours.handlers), ours.level)
    rt = make_runtime()
    rt.register("p_fails", lambda event, ctx: 1 / 0)
    assert rt.run("p_fails", {}).status == "failed"
    rt.stop(timeout=5)
    assert (list(root.handlers), root.level, list(ours.handlers), ours.level) == before
