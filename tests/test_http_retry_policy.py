"""Retry policies per send and per endpoint (README: HTTP), against a real sink answering 503.

What a user sees: `ctx.send.http(..., retry=RetryPolicy(max_attempts=2))` stops
at 2 attempts and is dead-lettered while the global default is higher; a policy
registered with `rt.http_endpoint(prefix, retry=...)` applies to the sends whose
URL starts with the prefix (the longest wins) and to no others; a send's own
policy wins over its endpoint's, field by field; a server's `Retry-After` still
sets the wait; bad values fail at the call naming the field; and a journaled send
keeps its policy across a restart (and in a dead-letter file, for a replay).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

from outbound import Config, RetryPolicy, Runtime, SendError
from outbound.destinations.deadletter import jsonable
from outbound.destinations.delivery import new_send
from outbound.destinations.http.endpoints import Endpoints, EndpointSettings
from outbound.destinations.http.send import HttpRequest, from_dead_letter
from outbound.embedded import HttpSink, SinkResponse
from outbound.journal.codec import decode_sends, encode_sends


def always_503(_request: Any) -> SinkResponse:
    return SinkResponse(503, body=b"busy")


def run_and_flush(rt: Runtime, fn: Callable[..., Any]) -> dict[str, Any]:
    """Run `fn` once, wait until every send is final; the records by URL path."""
    rt.register("p_test", fn)
    result = rt.run("p_test", None, timeout=10)
    assert result.status == "succeeded", result.error
    assert rt.flush(timeout=30)
    return {
        record.detail["url"].split("/", 3)[3]: record for record in rt.deliveries(result.run_id)
    }


def requests_by_path(sink: HttpSink) -> dict[str, int]:
    return dict(collections.Counter(request.path.lstrip("/") for request in sink.requests))


def dead_lettered_ids(data_dir: Path) -> set[str]:
    folder = data_dir / "dead-letter"
    return {
        json.loads(line)["delivery_id"]
        for path in folder.glob("*.jsonl")
        for line in path.read_text().splitlines()
    }


def test_a_send_with_its_own_policy_stops_at_its_attempts_dead_lettered(
    make_runtime: Callable[..., Runtime], make_sink: Callable[..., HttpSink], data_dir: Path
) -> None:
    sink = make_sink(always_503)
    rt = make_runtime(http_max_attempts=5)

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url + "/own", data={"a": 1}, retry=RetryPolicy(max_attempts=2))
        ctx.send.http(sink.url + "/global", data={"a": 2})

    records = run_and_flush(rt, workflow)
    own, default = records["own"], records["global"]
    assert own.status == "failed" and own.attempts == 2
    assert own.error == "HTTP 503 (gave up after 2 attempts)"
    assert default.status == "failed" and default.attempts == 5
    assert requests_by_path(sink) == {"own": 2, "global": 5}
    assert {own.id, default.id} <= dead_lettered_ids(data_dir)


def test_an_endpoint_policy_applies_to_its_sends_only_and_a_sends_own_wins(
    make_runtime: Callable[..., Runtime], make_sink: Callable[..., HttpSink]
) -> None:
    sink = make_sink(always_503)
    # Twelve failures in a row to one host: the circuit breaker (README: HTTP) would
    # pause it after five; this test is about attempts only.
    rt = make_runtime(http_max_attempts=4, http_circuit_failures=100)
    hooks = rt.http_endpoint(sink.url + "/hooks", retry=RetryPolicy(max_attempts=2))
    assert hooks == EndpointSettings(sink.url + "/hooks", retry=RetryPolicy(max_attempts=2))
    rt.http_endpoint(sink.url + "/hooks/special", retry=RetryPolicy(max_attempts=3))

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url + "/hooks/a")  # the endpoint's 2
        ctx.send.http(sink.url + "/hooks/special/b")  # the longest prefix: 3
        ctx.send.http(sink.url + "/other")  # no endpoint: the global 4
        ctx.send.http(sink.url + "/hooks/c", retry=RetryPolicy(max_attempts=1))  # its own
        # Its own policy sets only the backoff: the endpoint's attempts still hold.
        ctx.send.http(sink.url + "/hooks/d", retry=RetryPolicy(base=0.001, cap=0.01))

    records = run_and_flush(rt, workflow)
    attempts = {path: record.attempts for path, record in records.items()}
    assert attempts == {
        "hooks/a": 2,
        "hooks/special/b": 3,
        "other": 4,
        "hooks/c": 1,
        "hooks/d": 2,
    }
    assert requests_by_path(sink) == attempts
    assert all(record.status == "failed" for record in records.values())


def test_an_endpoint_registered_again_replaces_its_settings(
    make_runtime: Callable[..., Runtime], make_sink: Callable[..., HttpSink]
) -> None:
    sink = make_sink(always_503)
    rt = make_runtime(http_max_attempts=4)
    rt.http_endpoint(sink.url + "/hooks", retry=RetryPolicy(max_attempts=2))
    rt.http_endpoint(sink.url + "/hooks", retry=RetryPolicy(max_attempts=3))
    records = run_and_flush(rt, lambda event, ctx: ctx.send.http(sink.url + "/hooks/x"))
    assert records["hooks/x"].attempts == 3


def test_retry_after_still_wins_over_the_policys_backoff(
    make_runtime: Callable[..., Runtime], make_sink: Callable[..., HttpSink]
) -> None:
    answers = iter([SinkResponse(503, headers={"Retry-After": "1"}), SinkResponse(200)])
    sink = make_sink(lambda _request: next(answers))
    rt = make_runtime()
    fast = RetryPolicy(max_attempts=2, base=0.001, cap=0.01)  # its own wait would be ~instant
    records = run_and_flush(rt, lambda event, ctx: ctx.send.http(sink.url + "/x", retry=fast))
    assert records["x"].status == "delivered" and records["x"].attempts == 2
    first, second = sink.requests
    assert second.received_at - first.received_at >= 0.95


def test_a_policys_retry_window_ends_retrying_naming_the_policy(
    make_runtime: Callable[..., Runtime], make_sink: Callable[..., HttpSink]
) -> None:
    sink = make_sink(always_503)
    rt = make_runtime(http_max_attempts=10_000, retry_base=0.02, retry_cap=0.05)
    rt.http_endpoint(sink.url + "/hooks", retry=RetryPolicy(retry_for=0.3))

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url + "/x", retry=RetryPolicy(retry_for=0.3))
        ctx.send.http(sink.url + "/hooks/y")

    records = run_and_flush(rt, workflow)
    own, endpoint = records["x"], records["hooks/y"]
    assert own.status == "failed" and 1 < own.attempts < 10_000
    assert "retry window of 0.3 s (RetryPolicy.retry_for) is over" in own.error
    assert endpoint.status == "failed" and 1 < endpoint.attempts < 10_000
    assert f"(retry_for of rt.http_endpoint('{sink.url}/hooks')) is over" in endpoint.error


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_attempts": 0}, "RetryPolicy.max_attempts must be an int of at least 1, got 0"),
        ({"max_attempts": 2.5}, "RetryPolicy.max_attempts must be an int of at least 1"),
        ({"max_attempts": True}, "RetryPolicy.max_attempts must be an int of at least 1"),
        ({"base": -1}, "RetryPolicy.base must be seconds of at least 0, got -1"),
        ({"cap": 0}, "RetryPolicy.cap must be positive seconds, got 0"),
        ({"cap": "5"}, "RetryPolicy.cap must be positive seconds"),
        ({"retry_for": float("inf")}, "RetryPolicy.retry_for must be positive seconds"),
        ({"retry_for": float("nan")}, "RetryPolicy.retry_for must be positive seconds"),
    ],
)
def test_bad_policy_values_fail_naming_the_field(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        RetryPolicy(**values)
    assert message in str(caught.value)


def test_a_send_whose_retry_is_not_a_policy_fails_at_the_call_and_nothing_is_sent(
    make_runtime: Callable[..., Runtime], sink: HttpSink
) -> None:
    rt = make_runtime()
    errors: list[SendError] = []

    def workflow(event: Any, ctx: Any) -> None:
        try:
            ctx.send.http(sink.url + "/x", retry={"max_attempts": 2})
        except SendError as error:
            errors.append(error)

    rt.register("p_test", workflow)
    rt.run("p_test", None, timeout=10)
    assert rt.flush(timeout=10)
    [error] = errors
    assert error.field == "retry" and "must be a RetryPolicy" in error.rule
    assert sink.requests == []


def test_bad_endpoint_settings_fail_naming_the_field(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(start=False)
    with pytest.raises(ValueError, match="url_prefix must start with http:// or https://"):
        rt.http_endpoint("ftp://example.com/x", retry=RetryPolicy(max_attempts=2))
    with pytest.raises(ValueError, match="url_prefix must be a non-empty string"):
        rt.http_endpoint("")
    with pytest.raises(ValueError, match="retry must be a RetryPolicy"):
        rt.http_endpoint("https://example.com/", retry=3)  # type: ignore[arg-type]


def test_the_longest_registered_prefix_wins() -> None:
    endpoints = Endpoints()
    short = EndpointSettings("https://api.example.com/", retry=RetryPolicy(max_attempts=2))
    long = EndpointSettings("https://api.example.com/hooks/", retry=RetryPolicy(max_attempts=3))
    endpoints.register(long)
    endpoints.register(short)
    assert endpoints.lookup("https://api.example.com/hooks/1") == long
    assert endpoints.lookup("https://api.example.com/other") == short
    assert endpoints.lookup("https://example.org/") is None
    assert endpoints.remove("https://api.example.com/hooks/")
    assert endpoints.lookup("https://api.example.com/hooks/1") == short


def test_a_journal_entry_and_a_dead_letter_line_keep_the_policy() -> None:
    policy = RetryPolicy(max_attempts=2, cap=1.5)
    request = HttpRequest("POST", "http://127.0.0.1/x", {}, None, b"{}", retry=policy)
    [back] = decode_sends(encode_sends([new_send("http", "d1", "r1", "w", 1.5, request, 2, 0)]))
    assert back.payload == request and back.payload.retry == policy
    line = json.loads(json.dumps({"payload": request}, default=jsonable))
    replayed, _size = from_dead_letter(line)
    assert replayed.retry == policy


def test_a_journaled_send_keeps_its_policy_across_a_restart(
    make_sink: Callable[..., HttpSink], data_dir: Path
) -> None:
    # 503 with a Retry-After of 2 s: the send is waiting out its backoff when the first
    # runtime stops; with the journal on the global default would retry hundreds of times.
    sink = make_sink(lambda _request: SinkResponse(503, headers={"Retry-After": "2"}))
    config = Config(journal="local", data_dir=data_dir, retry_base=0.01, retry_cap=0.2)
    policy = RetryPolicy(max_attempts=2)

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url + "/x", retry=policy)

    first = Runtime(config)
    first.register("p_test", workflow)
    first.start()
    try:
        result = first.run("p_test", None, timeout=10)
        wait_until(lambda: len(sink.requests) == 1, timeout=10)
    finally:
        report = first.stop(timeout=0.2)
    assert report.left_in_journal == 1

    second = Runtime(config)
    second.register("p_test", workflow)
    final: list[Any] = []
    second.ledger.add_listener(lambda send: final.append(send.snapshot()))
    second.start()
    try:
        assert second.flush(timeout=30)
    finally:
        second.stop(timeout=5)
    [record] = final
    assert record.run_id == result.run_id
    assert record.status == "failed" and record.attempts == 2
    assert "gave up after 2 attempts" in record.error
    assert len(sink.requests) == 2
    assert record.id in dead_lettered_ids(data_dir)
