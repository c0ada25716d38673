"""Rate limits per host (OUTBOUND_HTTP_RATE_LIMIT) and per endpoint (rt.http_endpoint)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from outbound import Config
from outbound.destinations.http.limits import RateLimit, TokenBucket

# Requests may arrive closer together than they started (a stalled thread on
# either side under load): a window of arrivals may hold the starts of this many
# seconds more than one.
STALL = 0.25


def wait_for(condition: Any, bound: float = 30.0) -> None:
    """Poll `condition` (at most `bound` s: a safety net, not a measure)."""
    give_up_at = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < give_up_at, "condition not met in time"
        time.sleep(0.01)


def allowed_in_one_second(limit: str) -> int:
    """What a token bucket may start within one second (and a stall), by its rules."""
    rate = RateLimit.parse(limit)
    return int(rate.burst + rate.per_second * (1 + STALL))


def most_in_one_second(times: list[float]) -> int:
    """The most requests that arrived within any one-second window."""
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))


def test_rate_limits_are_read_and_checked() -> None:
    assert RateLimit.parse("100/s").per_second == 100
    assert Config.from_env({"OUTBOUND_HTTP_RATE_LIMIT": "6000/min"}).http_rate_limit == (
        RateLimit(100.0, "6000/min")
    )
    assert Config().http_rate_limit is None
    for bad in ("fast", "0/s", "10/week", "-5/s"):
        with pytest.raises(ValueError, match="OUTBOUND_HTTP_RATE_LIMIT must be .* per s, min"):
            Config(http_rate_limit=bad)


def test_a_bucket_lets_a_short_burst_through_then_one_request_per_interval() -> None:
    bucket = TokenBucket(RateLimit.parse("20/s"), now=0.0)  # bursts of 2
    for _ in range(2):
        assert bucket.wait(0.0) == 0.0
        bucket.take(0.0)
    assert bucket.wait(0.0) == pytest.approx(0.05)
    assert bucket.wait(0.05) == 0.0


def test_a_host_rate_limit_bounds_what_the_host_sees(make_runtime: Any, make_sink: Any) -> None:
    sink = make_sink()
    rt = make_runtime(http_rate_limit="20/s")

    def hook(count: int, ctx: Any) -> None:
        for n in range(count):
            ctx.send.http(sink.url + f"/{n}")

    rt.register("hook", hook)
    run_id = rt.run("hook", 50).run_id
    wait_for(lambda: all(d.final for d in rt.deliveries(run_id)))
    assert [d.status for d in rt.deliveries(run_id)] == ["delivered"] * 50
    # At most a burst (2) and a second's worth (20) within any second (unlimited: all 50).
    assert most_in_one_second([r.received_at for r in sink.requests]) <= allowed_in_one_second(
        "20/s"
    )


def test_an_endpoint_rate_limit_holds_back_only_that_endpoint(
    make_runtime: Any, make_sink: Any
) -> None:
    sink = make_sink()
    rt = make_runtime()
    rt.http_endpoint(sink.url + "/slow", rate_limit="10/s")
    with pytest.raises(ValueError, match="rate_limit must be"):
        rt.http_endpoint(sink.url + "/other", rate_limit="ten a second")

    def hook(_event: Any, ctx: Any) -> None:
        for n in range(20):
            ctx.send.http(sink.url + f"/slow/{n}")
            ctx.send.http(sink.url + f"/fast/{n}")

    rt.register("hook", hook)
    run_id = rt.run("hook", None).run_id
    wait_for(lambda: all(d.final for d in rt.deliveries(run_id)))
    assert [d.status for d in rt.deliveries(run_id)] == ["delivered"] * 40
    slow = sorted(r.received_at for r in sink.requests if r.path.startswith("/slow/"))
    fast = sorted(r.received_at for r in sink.requests if r.path.startswith("/fast/"))
    assert most_in_one_second(slow) <= allowed_in_one_second("10/s")  # a burst of 1, 10 a second
    # The same host's other sends do not queue behind the limited endpoint's.
    assert fast[-1] < slow[9]
