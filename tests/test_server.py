"""The HTTP API over real HTTP on loopback: triggers, run inspector, health, metrics, auth."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sse_support import collect

from outbound import Runtime

TOKEN = "s3cret-token"


def _runtime(make_runtime: Any, sink_url: str | None = None, **config: Any) -> Runtime:
    runtime = make_runtime(start=False, **config)

    @runtime.workflow("p_orders")
    def orders(event: Any, ctx: Any) -> None:
        if sink_url is not None:
            ctx.send.http(url=f"{sink_url}/orders", method="POST", data=event)
            ctx.send.http(url=f"{sink_url}/audit", method="PUT", data={"id": event["id"]})
        ctx.send.sse(channel="orders", payload=event)

    @runtime.workflow("p_slow")
    def slow(event: Any, ctx: Any) -> None:
        time.sleep(event["seconds"])

    @runtime.workflow("p_fails")
    def fails(event: Any, ctx: Any) -> None:
        raise RuntimeError("boom")

    return runtime.start()


def _wait_run(client: httpx.Client, run_id: str, done: Any, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        answer = client.get(f"/runs/{run_id}")
        if answer.status_code == 200 and done(answer.json()):
            return answer.json()
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.02)


def test_posted_event_runs_and_its_sends_are_delivered(make_runtime, make_api, sink):
    runtime = _runtime(make_runtime, sink.url)
    api = make_api(runtime)
    with httpx.Client(base_url=api.url, timeout=10) as client:
        answer = client.post("/workflows/p_orders/events", json={"id": 42, "item": "book"})
        assert answer.status_code == 202
        run_id = answer.json()["run_id"]
        assert answer.headers["location"] == f"/runs/{run_id}"
        received = sink.wait_for(2)
        run = _wait_run(
            client, run_id, lambda run: all(d["status"] == "delivered" for d in run["deliveries"])
        )
    by_path = {request.path: request for request in received}
    assert by_path["/orders"].json() == {"id": 42, "item": "book"}
    assert by_path["/audit"].method == "PUT"
    assert run["status"] == "succeeded"
    assert run["workflow_id"] == "p_orders"
    assert run["delivered"] == 3
    assert [d["destination"] for d in run["deliveries"]] == ["http", "http", "sse"]
    assert run["deliveries"][0]["detail"]["status_code"] == 200
    assert run["deliveries"][2]["detail"]["event_id"] == 1


def test_failed_run_is_reported_by_the_inspector(make_runtime, make_api):
    runtime = _runtime(make_runtime)
    api = make_api(runtime)
    with httpx.Client(base_url=api.url, timeout=10) as client:
        run_id = client.post("/workflows/p_fails/events", json={}).json()["run_id"]
        run = _wait_run(client, run_id, lambda run: run["status"] != "running")
    assert run["status"] == "failed"
    assert "boom" in run["error"]


def test_run_still_running_is_reported_as_running(make_runtime, make_api):
    runtime = _runtime(make_runtime)
    api = make_api(runtime)
    with httpx.Client(base_url=api.url, timeout=10) as client:
        run_id = client.post("/workflows/p_slow/events", json={"seconds": 0.5}).json()["run_id"]
        running = client.get(f"/runs/{run_id}")
        assert running.status_code == 200
        assert running.json()["status"] == "running"
        run = _wait_run(client, run_id, lambda run: run["status"] != "running")
    assert run["status"] == "succeeded"


def test_trigger_rejects_bad_requests(make_runtime, make_api):
    runtime = _runtime(make_runtime, max_payload_bytes=1024)
    api = make_api(runtime)
    with httpx.Client(base_url=api.url, timeout=10) as client:
        unknown = client.post("/workflows/p_nope/events", json={})
        assert unknown.status_code == 404
        assert "p_nope" in unknown.json()["error"]
        invalid = client.post("/workflows/p_orders/events", content=b"{not json")
        assert invalid.status_code == 400
        assert "JSON" in invalid.json()["error"]
        big = client.post("/workflows/p_orders/events", json={"id": 1, "pad": "x" * 2000})
        assert big.status_code == 413

        def chunks():  # no Content-Length: the limit holds while reading too
            for _ in range(3):
                yield b" " * 600

        streamed = client.post("/workflows/p_orders/events", content=chunks())
        assert streamed.status_code == 413
        assert client.get("/runs/0123456789abcdef").status_code == 404
    assert runtime.stats()["runs"] == {}


def test_healthz_shows_destination_actors(make_runtime, make_api):
    runtime = _runtime(make_runtime)
    api = make_api(runtime)
    answer = httpx.get(f"{api.url}/healthz", timeout=10)
    assert answer.status_code == 200
    health = answer.json()
    assert health["status"] == "ok"
    assert health["destinations"]["sse"]["alive"] is True
    assert health["destinations"]["http"]["alive"] is True


def _metrics(url: str, **kwargs: Any) -> dict[tuple[str, tuple], float]:
    answer = httpx.get(f"{url}/metrics", timeout=10, **kwargs)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_exposition_has_the_expected_series(make_runtime, make_api, sink):
    runtime = _runtime(make_runtime, sink.url)
    api = make_api(runtime)
    for number in range(3):
        runtime.run("p_orders", {"id": number})
    runtime.run("p_fails", {})
    assert runtime.flush(10)
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{api.url}/pipelines/p_orders/sse"),
    ):
        deadline = time.monotonic() + 5
        while runtime.sse_hub.subscribers < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        samples = _metrics(api.url)

    def runs(workflow: str, status: str) -> float:
        return samples[("outbound_runs_total", (("status", status), ("workflow", workflow)))]

    assert runs("p_orders", "succeeded") == 3 and runs("p_orders", "failed") == 0
    assert runs("p_fails", "failed") == 1
    assert runs("p_slow", "succeeded") == 0  # registered, never run: shown from the start
    assert samples[("outbound_sends_total", (("destination", "http"),))] == 6
    delivered = (("destination", "http"), ("status", "delivered"))
    assert samples[("outbound_deliveries_total", delivered)] == 6
    assert (
        samples[("outbound_deliveries_total", (("destination", "sse"), ("status", "delivered")))]
        == 3
    )
    assert samples[("outbound_retries_total", (("destination", "http"),))] == 0
    assert samples[("outbound_dead_letters_total", (("destination", "http"),))] == 0
    # Only series that can move: SSE never retries, nothing here batches, no journal.
    assert ("outbound_retries_total", (("destination", "sse"),)) not in samples
    names = {name for name, _labels in samples}
    assert not names & {"outbound_batch_flushes_total", "outbound_buffered_bytes"}
    assert not any(name.startswith("outbound_journal_") for name in names)
    assert samples[("outbound_sse_subscribers", ())] == 1
    assert samples[("outbound_delivery_latency_seconds_count", delivered)] == 6
    bucket = tuple(sorted((*delivered, ("le", "+Inf"))))
    assert samples[("outbound_delivery_latency_seconds_bucket", bucket)] == 6


def test_auth_token_guards_every_endpoint_but_healthz(make_runtime, make_api):
    runtime = _runtime(make_runtime, api_token=TOKEN)
    api = make_api(runtime)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=api.url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        for method, path in [
            ("POST", "/workflows/p_orders/events"),
            ("GET", "/runs/abc"),
            ("GET", "/metrics"),
            ("POST", "/sql"),
            ("GET", "/pipelines/p_orders/sse"),
        ]:
            answer = client.request(method, path, json={})
            assert answer.status_code == 401, path
            assert answer.headers["www-authenticate"].startswith("Bearer")
            wrong = client.request(method, path, json={}, headers={"Authorization": "Bearer no"})
            assert wrong.status_code == 401, path
        # The query token is for SSE only (browsers' EventSource cannot send headers).
        assert client.get(f"/metrics?token={TOKEN}").status_code == 401
        accepted = client.post("/workflows/p_orders/events", json={"id": 1}, headers=bearer)
        assert accepted.status_code == 202
        assert client.get("/metrics", headers=bearer).status_code == 200
    url = f"{api.url}/pipelines/p_orders/sse"
    assert collect(url).status == 401
    with_header = collect(url, lambda got: len(got.events) >= 1, headers=bearer)
    assert with_header.status == 200 and with_header.ids == [1]
    with_query = collect(f"{url}?token={TOKEN}", lambda got: len(got.events) >= 1)
    assert with_query.status == 200 and with_query.ids == [1]
    refused = collect(f"{url}?token=wrong")
    assert refused.status == 401
    assert refused.headers["access-control-allow-origin"] == "*"


def test_sse_cors_preflight(make_runtime, make_api):
    runtime = _runtime(make_runtime, api_token=TOKEN, cors_origins="http://page.example")
    api = make_api(runtime)
    answer = httpx.options(
        f"{api.url}/pipelines/p_orders/sse",
        headers={"Origin": "http://page.example", "Access-Control-Request-Method": "GET"},
    )
    assert answer.status_code == 204
    assert answer.headers["access-control-allow-origin"] == "http://page.example"
    assert "Authorization" in answer.headers["access-control-allow-headers"]


def test_sql_endpoint_without_a_database_says_how_to_enable_it(make_runtime, make_api):
    runtime = _runtime(make_runtime)
    api = make_api(runtime)
    answer = httpx.post(f"{api.url}/sql", json={"query": "SELECT 1"}, timeout=10)
    assert answer.status_code in (501, 503)
    message = answer.json()["error"]
    assert "OUTBOUND_DATABASE_URL" in message or "no SQL" in message


@pytest.mark.parametrize("body", [b"{bad", b'{"query": ""}', b"[1]"])
def test_sql_endpoint_rejects_malformed_bodies(make_runtime, make_api, body):
    runtime = _runtime(make_runtime)
    api = make_api(runtime)
    answer = httpx.post(f"{api.url}/sql", content=body, timeout=10)
    if getattr(runtime, "sql_query", None) is None:
        assert answer.status_code == 501
        return
    assert answer.status_code == 400
    assert "query" in answer.json()["error"]


def test_sql_endpoint_answers_read_only_queries(make_runtime, make_api, postgres_url):
    runtime = make_runtime(start=False, database_url=postgres_url, batch_max_age=0.2)

    @runtime.workflow("p_rows")
    def rows(event: Any, ctx: Any) -> None:
        ctx.send.sql(table="api_sql_rows", payload=event)

    runtime.start()
    api = make_api(runtime)
    for number in range(3):
        runtime.run("p_rows", {"n": number, "name": f"row {number}"})
    assert runtime.flush(30)
    with httpx.Client(base_url=api.url, timeout=60) as client:
        answer = client.post("/sql", json={"query": "SELECT n, name FROM api_sql_rows ORDER BY n"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert [column["name"] for column in body["columns"]] == ["n", "name"]
        assert [row[1] for row in body["rows"]] == ["row 0", "row 1", "row 2"]
        refused = client.post("/sql", json={"query": "DELETE FROM api_sql_rows"})
        assert refused.status_code == 400
        assert "read-only" in refused.json()["error"].lower()


def test_run_inspector_answers_json(make_runtime, make_api):
    runtime = _runtime(make_runtime)
    api = make_api(runtime)
    result = runtime.run("p_orders", {"id": 5})
    assert runtime.flush(5)
    answer = httpx.get(f"{api.url}/runs/{result.run_id}", timeout=10)
    assert answer.status_code == 200
    body = answer.json()
    assert body["run_id"] == result.run_id
    assert json.dumps(body)  # plain JSON all the way down
    assert body["deliveries"][0]["status"] == "delivered"


def test_emits_endpoint_lists_what_a_workflow_emitted(make_runtime, make_api):
    runtime = make_runtime(start=False)
    runtime.register("p_a", lambda event, ctx: ctx.send.emit(raw_event={"n": event["n"]}))
    runtime.register("p_b", lambda event, ctx: None, listens_to=["p_a"])
    runtime.start()
    api = make_api(runtime)
    for n in range(3):
        runtime.run("p_a", {"n": n})
    assert runtime.flush(timeout=10)
    with httpx.Client(base_url=api.url, timeout=10) as client:
        listed = client.get("/workflows/p_a/emits").json()
        assert listed["workflow_id"] == "p_a"
        assert [item["raw_event"] for item in listed["emits"]] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert all(item["listener_runs"][0]["workflow_id"] == "p_b" for item in listed["emits"])
        latest = client.get("/workflows/p_a/emits", params={"limit": 1}).json()["emits"]
        assert [item["raw_event"] for item in latest] == [{"n": 2}]
        assert client.get("/workflows/p_a/emits", params={"limit": "x"}).status_code == 400
        assert client.get("/workflows/p_zzz/emits").status_code == 404
