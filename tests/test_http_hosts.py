"""Per-host fairness of the HTTP destination: queues, limits and the host's share of admission."""

from __future__ import annotations

import time
from typing import Any

from outbound import Runtime
from outbound.admission import Admission
from outbound.destinations.delivery import Send
from outbound.destinations.http.hosts import HostQueues, host_of
from outbound.embedded import SinkResponse

SLOW_ANSWER = 5.0  # seconds the slow endpoint takes to answer


def wait_until_delivered(rt: Runtime, run_ids: list[str], bound: float = 30.0) -> None:
    """Wait (at most `bound` s, a safety net, not a measure) until these runs' sends settle."""
    give_up_at = time.monotonic() + bound
    while time.monotonic() < give_up_at:
        records = [record for run_id in run_ids for record in rt.deliveries(run_id)]
        if records and all(record.status != "pending" for record in records):
            return
        time.sleep(0.01)


def statuses(rt: Runtime, run_ids: list[str]) -> list[str]:
    return [record.status for run_id in run_ids for record in rt.deliveries(run_id)]


def test_a_fast_hosts_sends_are_delivered_while_a_slow_hosts_are_outstanding(
    make_runtime: Any, make_sink: Any
) -> None:
    slow = make_sink(lambda _r: SinkResponse(200, delay=SLOW_ANSWER))
    fast = make_sink()
    # Four request slots in all, two per host: before per-host queues, the six
    # slow sends took every slot and the fast ones waited out the slow answers.
    rt = make_runtime(http_concurrency=4, http_host_concurrency=2)
    rt.register("slow", lambda e, ctx: ctx.send.http(slow.url + f"/{e}", timeout=SLOW_ANSWER * 4))
    rt.register("fast", lambda e, ctx: ctx.send.http(fast.url + f"/fast/{e}"))
    slow_runs = [rt.run("slow", n).run_id for n in range(6)]
    fast_runs = [rt.run("fast", n).run_id for n in range(40)]

    wait_until_delivered(rt, fast_runs)
    assert statuses(rt, fast_runs) == ["delivered"] * 40
    assert len(fast.requests) == 40
    # Meanwhile the slow host's requests are all still outstanding, two at a time.
    assert statuses(rt, slow_runs) == ["pending"] * 6
    assert len(slow.requests) == 2
    rt.stop(drain=False)


def test_a_slow_hosts_backlog_leaves_room_in_admission_for_other_hosts(
    make_runtime: Any, make_sink: Any
) -> None:
    slow = make_sink(lambda _r: SinkResponse(200, delay=SLOW_ANSWER))
    fast = make_sink()
    # A host may hold half of OUTBOUND_MAX_PENDING; its later sends wait parked,
    # their units given back. Before, the slow host's 30 sends held 30 of the 40
    # units and the 11th fast run found the runtime full.
    rt = make_runtime(max_pending=40, http_concurrency=4, http_host_concurrency=2)

    def to_slow(event: Any, ctx: Any) -> None:
        for n in range(30):
            ctx.send.http(slow.url + f"/{n}", timeout=SLOW_ANSWER * 4)

    rt.register("slow", to_slow)
    rt.register("fast", lambda e, ctx: ctx.send.http(fast.url + f"/fast/{e}"))
    slow_run = rt.run("slow", None).run_id
    slow.wait_for(2)  # the slow sends are queued (and the newest parked) by now
    assert rt.stats()["admission"]["in_flight"] == 20

    submitted = [rt.submit("fast", n, timeout=0) for n in range(15)]  # no Busy
    fast_runs = [run.result(10).run_id for run in submitted]
    wait_until_delivered(rt, fast_runs)
    assert statuses(rt, fast_runs) == ["delivered"] * 15
    assert statuses(rt, [slow_run]) == ["pending"] * 30
    assert rt.stats()["admission"]["in_flight"] == 20
    rt.stop(drain=False)


def test_http_host_concurrency_is_a_setting() -> None:
    from outbound import Config

    assert Config().http_host_concurrency == 8
    assert Config.from_env({"OUTBOUND_HTTP_HOST_CONCURRENCY": "3"}).http_host_concurrency == 3


def make_send(url: str) -> Send:
    from outbound.destinations.http.send import HttpRequest

    return Send(destination="http", payload=HttpRequest(method="POST", url=url), size=0)


def test_hosts_take_turns_within_their_own_and_the_global_limit() -> None:
    queues = HostQueues(concurrency=3, host_concurrency=2)
    for n in range(4):
        queues.add(make_send(f"http://a.test/{n}"), f"http://a.test/{n}")
    queues.add(make_send("http://b.test/0"), "http://b.test/0")
    taken = [queues.take() for _ in range(4)]
    assert taken[3] is None  # three in flight: the global limit
    hosts = [host.name for _send, host in (item for item in taken if item is not None)]
    assert hosts == ["http://a.test", "http://b.test", "http://a.test"]
    first_a = taken[0]
    assert first_a is not None
    queues.done(first_a[1])
    next_up = queues.take()
    assert next_up is not None and next_up[1].name == "http://a.test"
    assert queues.take() is None  # a.test is at its own limit of two
    assert queues.backlog()["http://a.test"] == {"queued": 1, "parked": 0, "in_flight": 2}


def test_parked_sends_give_their_units_back_and_take_them_again_before_the_wire() -> None:
    admission = Admission(limit=8)  # a host's share: 4 units; parked sends: 4 at most
    queues = HostQueues(concurrency=1, host_concurrency=1, admission=admission)
    admission.take(10)  # ten sends handed off to one host: one unit each
    for n in range(10):
        queues.add(make_send(f"http://slow.test/{n}"), "http://slow.test")
    assert queues.backlog()["http://slow.test"]["parked"] == 4
    assert admission.in_flight == 6  # 4 held in its share, 2 past the cap on parked sends
    sent = 0
    while (next_up := queues.take()) is not None:
        _send, host = next_up
        queues.done(host)
        admission.settle(1)  # delivered: the ledger gives its unit back
        sent += 1
        assert admission.in_flight == 10 - sent - queues.parked
    assert sent == 10 and queues.parked == 0 and admission.in_flight == 0


def test_host_of_keys_by_scheme_host_and_port() -> None:
    assert host_of("https://User:pw@Example.COM:8443/a?b#c") == "https://example.com:8443"
    assert host_of("http://example.com?x=1") == "http://example.com"
    assert host_of("http://[::1]:80/") == "http://[::1]:80"
