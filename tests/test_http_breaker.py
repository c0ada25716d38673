"""Circuit breaker per host: failing hosts are paused, probed after a cool-down, then resumed."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from outbound.destinations.delivery import Send
from outbound.destinations.http.hosts import HostQueues
from outbound.destinations.http.limits import BreakerSettings, Circuit
from outbound.destinations.http.send import HttpRequest
from outbound.embedded import SinkResponse


def wait_for(condition: Any, bound: float = 30.0) -> None:
    """Poll `condition` (at most `bound` s: a safety net, not a measure)."""
    give_up_at = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < give_up_at, "condition not met in time"
        time.sleep(0.01)


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    answer = httpx.get(f"{url}/metrics", timeout=10)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def send_to(url: str) -> Send:
    return Send(destination="http", payload=HttpRequest(method="POST", url=url), size=0)


def test_a_circuit_opens_after_failures_in_a_row_and_a_probe_closes_it() -> None:
    circuit = Circuit("http://h", BreakerSettings(failures_to_open=3, cool_down=5.0))
    assert not circuit.failed(0.0, "HTTP 503")
    circuit.succeeded()  # an answer in between starts the count again
    for _ in range(2):
        assert not circuit.failed(1.0, "HTTP 503")
    assert circuit.failed(1.0, "HTTP 503")  # the third in a row opens it
    assert circuit.wait(1.0) == 5.0 and circuit.wait(6.0) == 0.0
    circuit.started()  # the probe
    assert circuit.wait(6.0) == math.inf  # nothing else until it ends
    circuit.failed(7.0, "ConnectError")  # it failed: twice the cool-down
    assert circuit.is_open and circuit.wait(7.0) == 10.0
    circuit.started()
    assert circuit.succeeded() and not circuit.is_open and circuit.wait(17.0) == 0.0


def test_an_open_hosts_sends_wait_in_their_queue_while_other_hosts_go() -> None:
    queues = HostQueues(8, 2, breaker=BreakerSettings(failures_to_open=1, cool_down=5.0))
    sends = [
        send_to(url) for url in ("http://bad/1", "http://bad/2", "http://good/1", "http://bad/3")
    ]
    queues.add(sends[0], "http://bad/1")
    send, host = queues.take(0.0) or (None, None)
    assert send is sends[0] and host is not None
    queues.done(host, 0.0, answered=False, error="HTTP 503")  # opens the circuit
    queues.add(sends[1], "http://bad/2")
    queues.add(sends[2], "http://good/1")
    assert queues.take(1.0) == (sends[2], queues.hosts["http://good"])
    assert queues.take(1.0) is None  # bad's send waits for the cool-down
    assert queues.next_wake() == 5.0
    assert list(queues.open_circuits(1.0, 101.0)) == ["http://bad"]
    probe = queues.take(5.0)
    assert probe is not None and probe[0] is sends[1]
    queues.add(sends[3], "http://bad/3")
    assert queues.take(5.0) is None and queues.next_wake() is None  # until the probe ends
    queues.done(probe[1], 5.5, answered=True)
    assert queues.take(5.5) == (sends[3], probe[1])
    assert queues.open_circuits(5.5, 105.5) == {}


def test_a_failing_host_is_paused_then_probed_and_every_send_is_delivered(
    make_runtime: Any, make_sink: Any, make_api: Any
) -> None:
    healthy = threading.Event()
    refused: list[float] = []

    def answer(_request: Any) -> SinkResponse:
        if healthy.is_set():
            return SinkResponse(200)
        refused.append(time.monotonic())
        return SinkResponse(503)

    sink = make_sink(answer)
    # One request at a time, so the circuit opens after exactly three requests;
    # four attempts a send, backoff at most 50 ms: without the breaker, every
    # send runs out of attempts long before the 1.5 s cool-down is over.
    rt = make_runtime(
        http_host_concurrency=1,
        http_max_attempts=4,
        retry_cap=0.05,
        http_circuit_failures=3,
        http_circuit_cool_down=1.5,
    )
    rt.register("hook", lambda e, ctx: ctx.send.http(sink.url + f"/{e}"))
    api = make_api(rt)
    run_ids = [rt.run("hook", n).run_id for n in range(5)]

    wait_for(lambda: rt.health()["destinations"]["http"]["open_circuits"])
    assert sink.count == 3  # then the sends wait, their attempts not spent
    circuits = rt.health()["destinations"]["http"]["open_circuits"]
    assert list(circuits) == [sink.url]
    assert circuits[sink.url]["failures"] >= 3 and circuits[sink.url]["last_error"] == "HTTP 503"
    samples = metrics(api.url)
    assert samples[("outbound_http_open_circuits", ())] == 1
    assert samples[("outbound_http_circuit_open", (("host", sink.url),))] == 1

    healthy.set()  # the server recovers: the probe after the cool-down succeeds
    wait_for(lambda: all(d.final for r in run_ids for d in rt.deliveries(r)))
    records = [d for r in run_ids for d in rt.deliveries(r)]
    assert [d.status for d in records] == ["delivered"] * 5
    # A probe that came before the recovery (a slow test thread) failed: the next one,
    # twice the cool-down later, succeeded. Then each send went once.
    failed_probes = len(refused) - 3
    assert sink.count == 3 + failed_probes + 5
    assert sum(d.attempts for d in records) == sink.count  # no attempt without a request
    assert rt.health()["destinations"]["http"]["open_circuits"] == {}
    assert metrics(api.url)[("outbound_http_open_circuits", ())] == 0
