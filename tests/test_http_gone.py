"""410 Gone: the endpoint is marked gone, its sends fail at once until it is re-enabled."""

from __future__ import annotations

import threading
import time
from typing import Any

from outbound.destinations.http.endpoint_state import gone_error
from outbound.embedded import ReceivedRequest, SinkResponse


def wait_for(condition: Any, bound: float = 30.0) -> None:
    """Poll `condition` (at most `bound` s: a safety net, not a measure)."""
    give_up_at = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < give_up_at, "condition not met in time"
        time.sleep(0.01)


def test_the_gone_error_shows_no_credentials_or_query() -> None:
    error = gone_error("https://user:pw@hooks.example.com/in/42?token=s3cret")
    assert "https://hooks.example.com/in/42 answered 410 Gone" in error
    assert "pw" not in error and "s3cret" not in error and "rt.enable_endpoint(url)" in error


def test_an_endpoint_answering_410_is_gone_until_enabled_again(
    make_runtime: Any, make_sink: Any
) -> None:
    revived = threading.Event()

    def answer(request: ReceivedRequest) -> SinkResponse:
        if request.path == "/hooks/gone" and not revived.is_set():
            return SinkResponse(410, delay=0.3)  # the others queue up meanwhile
        return SinkResponse(200)

    sink = make_sink(answer)
    gone_url = sink.url + "/hooks/gone"
    rt = make_runtime(http_host_concurrency=1)

    def to_gone(count: int, ctx: Any) -> None:
        for _ in range(count):
            ctx.send.http(gone_url)

    rt.register("gone", to_gone)
    rt.register("other", lambda e, ctx: ctx.send.http(sink.url + "/hooks/other"))

    first = rt.run("gone", 5).run_id  # one on the wire, four queued behind it
    wait_for(lambda: all(d.final for d in rt.deliveries(first)))
    records = rt.deliveries(first)
    assert [d.status for d in records] == ["failed"] * 5
    assert sum(1 for r in sink.requests if r.path == "/hooks/gone") == 1
    for record in records:
        assert gone_url in (record.error or "") and "rt.enable_endpoint" in (record.error or "")
    assert rt.health()["destinations"]["http"]["gone_endpoints"] == 1
    assert rt.stats()["http"]["gone_endpoints"] == [gone_url]

    # Later sends fail at once, without a request; the host's other endpoints still work.
    later, other = rt.run("gone", 2).run_id, rt.run("other", None).run_id
    wait_for(lambda: all(d.final for d in rt.deliveries(later) + rt.deliveries(other)))
    assert [d.status for d in rt.deliveries(later)] == ["failed"] * 2
    assert all(d.attempts == 0 for d in rt.deliveries(later))
    assert [d.status for d in rt.deliveries(other)] == ["delivered"]
    assert sum(1 for r in sink.requests if r.path == "/hooks/gone") == 1

    revived.set()
    assert rt.enable_endpoint(gone_url) is True
    assert rt.enable_endpoint(gone_url) is False  # it is not gone any more
    again = rt.run("gone", 1).run_id
    wait_for(lambda: all(d.final for d in rt.deliveries(again)))
    assert [d.status for d in rt.deliveries(again)] == ["delivered"]
    assert rt.health()["destinations"]["http"]["gone_endpoints"] == 0
