"""`rt.health()` tells a destination that keeps failing, and SSE events it could not publish.

A batch that has been retrying longer than `health_retrying_after` (Postgres
unreachable here: nothing listens on the port) marks its destination
`retrying` with the error, and the runtime `degraded`. An SSE event that cannot
be published fails alone (the events around it are published), is
dead-lettered, and is counted in the SSE destination's health.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from waiting import wait_until

from outbound import Runtime
from outbound.destinations.sse.send import SseEvent
from outbound.embedded import free_port


def test_a_destination_whose_batches_keep_failing_is_reported_retrying(
    make_runtime: Callable[..., Runtime],
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens
    rt = make_runtime(database_url=url, batch_max_age=0.05, health_retrying_after=0.2)
    rt.register("load", lambda event, ctx: ctx.send.sql(table="health_rows", payload=event))
    assert rt.health()["destinations"]["sql"]["status"] == "running"
    rt.run("load", {"n": 1})
    # At once: the failing batch is counted (the inspector's "batches retrying")...
    wait_until(lambda: rt.health()["destinations"]["sql"].get("retrying_batches") == 1)
    # ... and once it has failed for longer than health_retrying_after, it is "retrying".
    wait_until(lambda: rt.health()["destinations"]["sql"]["status"] == "retrying")
    health = rt.health()
    sql = health["destinations"]["sql"]
    assert health["status"] == "degraded"
    assert sql["retrying_for"] > 0.2 and sql["alive"] is True and sql["retrying_batches"] == 1
    assert "Postgres" in sql["last_error"] or "connect" in sql["last_error"].lower()
    assert health["destinations"]["http"]["status"] == "running"
    report = rt.stop(timeout=0.2)
    assert report.per_destination == {"sql": 1}


def test_an_sse_event_that_cannot_be_published_fails_alone_and_is_counted(
    make_runtime: Callable[..., Runtime], data_dir: Path
) -> None:
    rt = make_runtime()

    @rt.workflow("p_orders")
    def orders(event: Any, ctx: Any) -> None:
        ctx.send.sse("orders", {"n": 1})
        # Past the checks of ctx.send.sse: data that is not UTF-8 cannot be framed.
        ctx.send.to("sse", SseEvent("orders", b"\xff not utf-8"))
        ctx.send.sse("orders", {"n": 2})

    result = rt.run("p_orders", {})
    assert rt.flush(timeout=10)
    records = rt.deliveries(result.run_id)
    assert [r.status for r in records] == ["delivered", "failed", "delivered"]
    assert [r.attempts for r in records] == [1, 1, 1]  # one publish each
    assert [r.detail.get("event_id") for r in (records[0], records[2])] == [1, 2]
    assert "UnicodeDecodeError" in records[1].error
    (line,) = [
        json.loads(text)
        for path in (data_dir / "dead-letter").glob("sse-*.jsonl")
        for text in path.read_text().splitlines()
    ]
    assert line["delivery_id"] == records[1].id
    health = rt.health()
    sse = health["destinations"]["sse"]
    assert sse["publish_errors"] == 1 and "UnicodeDecodeError" in sse["last_publish_error"]
    assert sse["status"] == "running"
