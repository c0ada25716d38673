"""Backpressure: at most OUTBOUND_MAX_PENDING runs and sends in flight; callers wait, never drop."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from waiting import wait_until

import outbound
import outbound.api.app
from outbound import Busy, Config, Runtime
from outbound.admission import Admission
from outbound.embedded import HttpSink, ReceivedRequest, S3Server, SinkResponse

HOLD = 30.0  # longest a gated answer is held: a test that goes wrong must not hang


class Gate:
    """A sink's responder that answers nothing until `open()`: an endpoint that is slow until then.

    It holds the sink's loop, so no request is answered (or even read) meanwhile.
    """

    def __init__(self) -> None:
        self._opened = threading.Event()
        self.sink: HttpSink | None = None

    def __call__(self, request: ReceivedRequest) -> SinkResponse:
        self._opened.wait(HOLD)
        return SinkResponse()

    def open(self) -> None:
        self._opened.set()

    @property
    def url(self) -> str:
        assert self.sink is not None
        return self.sink.url

    def numbers(self) -> list[int]:
        """The `n` of every request the sink received, sorted."""
        assert self.sink is not None
        return sorted(request.json()["n"] for request in self.sink.requests)


@pytest.fixture
def gate(make_sink: Callable[..., HttpSink]) -> Iterator[Gate]:
    gate = Gate()
    gate.sink = make_sink(gate)
    yield gate
    gate.open()  # before the sink stops (its teardown runs after this one)


def one_send(url: str) -> Callable[[Any, Any], None]:
    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(url, data={"n": event})

    return workflow


def test_busy_is_a_public_timeout_error() -> None:
    assert "Busy" in outbound.__all__
    assert issubclass(Busy, TimeoutError)


def test_a_run_counts_once_then_once_per_send_until_final() -> None:
    admission = Admission(limit=2)
    admission.admit(timeout=0)
    admission.handed_off(5)  # its sends exist already: counted, even past the limit
    assert admission.in_flight == 5
    with pytest.raises(Busy):
        admission.admit(timeout=0)
    admission.settle(4)  # four sends became final
    admission.admit(timeout=0)
    admission.handed_off(0)  # a run that sent nothing gives its unit back
    assert admission.in_flight == 1


def test_max_pending_is_read_from_the_environment() -> None:
    assert Config.from_env({"OUTBOUND_MAX_PENDING": "25"}).max_pending == 25
    with pytest.raises(ValueError, match="max_pending"):
        Config(max_pending=0)


def test_submit_raises_busy_when_full_and_succeeds_once_deliveries_free_room(
    make_runtime: Callable[..., Runtime], gate: Gate
) -> None:
    rt = make_runtime(max_pending=3, http_timeout=60)
    rt.register("p", one_send(gate.url))
    admitted = [rt.submit("p", n) for n in range(3)]

    with pytest.raises(Busy, match="OUTBOUND_MAX_PENDING") as raised:
        rt.submit("p", 3, timeout=0.2)
    assert isinstance(raised.value, TimeoutError)
    with pytest.raises(Busy):
        rt.run("p", 3, timeout=0.2)
    assert rt.stats()["runs"] == {"succeeded": 3}  # the refused runs never started

    gate.open()
    later = rt.submit("p", 3, timeout=HOLD)
    assert rt.flush(HOLD)
    assert gate.numbers() == [0, 1, 2, 3]  # nothing submitted before was lost
    for future in [*admitted, later]:
        [delivery] = rt.deliveries(future.result().run_id)
        assert delivery.status == "delivered", delivery.error


def test_in_flight_never_exceeds_the_limit_and_every_send_is_delivered(
    make_runtime: Callable[..., Runtime], make_sink: Callable[..., HttpSink]
) -> None:
    sink = make_sink(lambda request: SinkResponse(delay=0.01))
    rt = make_runtime(max_pending=4, http_timeout=60)
    rt.register("p", one_send(sink.url))
    for n in range(60):
        rt.submit("p", n)
        stats = rt.stats()
        # Only this thread submits: what it reads can only have shrunk since.
        assert stats["runs_in_flight"] + stats["unfinished"] <= 4
    assert rt.flush(HOLD)
    assert sorted(request.json()["n"] for request in sink.requests) == list(range(60))


def test_listener_runs_that_send_do_not_deadlock_at_a_tiny_limit(
    make_runtime: Callable[..., Runtime], make_sink: Callable[..., HttpSink]
) -> None:
    sink = make_sink(lambda request: SinkResponse(delay=0.01))
    rt = make_runtime(max_pending=1, http_timeout=60)

    def emitter(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url, data={"n": event, "by": "emitter"})
        ctx.send.emit(raw_event={"n": event})

    def listener(event: Any, ctx: Any) -> None:
        for _ in range(2):
            ctx.send.http(sink.url, data={"n": event["n"], "by": "listener"})

    rt.register("p_emitter", emitter)
    rt.register("p_listener", listener, listens_to=["p_emitter"])
    for n in range(10):
        rt.submit("p_emitter", n, timeout=HOLD)
    assert rt.flush(HOLD)
    destinations = rt.stats()["destinations"]
    assert destinations["http"]["delivered"] == 30
    assert destinations["emit"]["delivered"] == 10
    by = sorted((request.json()["by"], request.json()["n"]) for request in sink.requests)
    expected = [("emitter", n) for n in range(10)] + [("listener", n) for n in range(10)] * 2
    assert by == sorted(expected)


def test_stop_drains_while_a_submitter_waits_for_room(
    make_runtime: Callable[..., Runtime], gate: Gate
) -> None:
    rt = make_runtime(max_pending=2, http_timeout=60)
    rt.register("p", one_send(gate.url))
    for n in range(2):
        rt.submit("p", n)
    outcome: list[Any] = []

    def submit_one_more() -> None:
        try:
            outcome.append(rt.submit("p", 2))
        except RuntimeError as error:
            outcome.append(error)

    waiter = threading.Thread(target=submit_one_more)
    waiter.start()
    wait_until(lambda: rt.stats()["admission"]["waiting"] == 1)
    reports: list[Any] = []
    stopper = threading.Thread(target=lambda: reports.append(rt.stop(drain=True, timeout=60)))
    stopper.start()
    waiter.join(HOLD)  # told at once, while stop() still drains the two admitted runs
    assert not waiter.is_alive()
    [refused] = outcome
    assert isinstance(refused, RuntimeError)
    assert "stopping" in str(refused)

    gate.open()
    stopper.join(90)
    assert not stopper.is_alive()
    [report] = reports
    assert report.drained and report.dead_lettered == 0
    assert gate.numbers() == [0, 1]


def test_flush_completes_while_a_submitter_waits_for_room(
    make_runtime: Callable[..., Runtime], gate: Gate
) -> None:
    rt = make_runtime(max_pending=2, http_timeout=60)
    rt.register("p", one_send(gate.url))
    for n in range(2):
        rt.submit("p", n)
    waiter = threading.Thread(target=lambda: rt.submit("p", 2))
    waiter.start()
    wait_until(lambda: rt.stats()["admission"]["waiting"] == 1)
    flushed: list[bool] = []
    flusher = threading.Thread(target=lambda: flushed.append(rt.flush(60)))
    flusher.start()

    gate.open()
    flusher.join(90)
    waiter.join(HOLD)
    assert flushed == [True]
    assert not waiter.is_alive()
    assert rt.flush(HOLD)
    assert gate.numbers() == [0, 1, 2]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_arun_waits_for_room_without_blocking_the_event_loop(
    make_runtime: Callable[..., Runtime], gate: Gate, backend: str
) -> None:
    rt = make_runtime(max_pending=1, http_timeout=60)
    rt.register("p", one_send(gate.url))
    rt.submit("p", 0)
    order: list[str] = []

    async def main() -> None:
        async def open_the_gate_later() -> None:
            for _ in range(5):  # runs only if the loop is free while arun waits
                await anyio.sleep(0.01)
            order.append("gate opened")
            gate.open()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(open_the_gate_later)
            result = await rt.arun("p", 1)
            order.append(f"run {result.status}")

    anyio.run(main, backend=backend)
    assert order == ["gate opened", "run succeeded"]
    assert rt.flush(HOLD)
    assert gate.numbers() == [0, 1]


def test_trigger_answers_503_with_retry_after_while_full(
    make_runtime: Callable[..., Runtime],
    make_api: Callable[..., Any],
    gate: Gate,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outbound.api.app, "TRIGGER_WAIT", 0.2)
    rt = make_runtime(max_pending=1, http_timeout=60)
    rt.register("p", one_send(gate.url))
    rt.submit("p", 0)
    api = make_api(rt)
    with httpx.Client(base_url=api.url, timeout=HOLD) as client:
        full = client.post("/workflows/p/events", json=1)
        assert full.status_code == 503
        assert full.headers["retry-after"] == str(outbound.api.app.TRIGGER_RETRY_AFTER)
        assert "OUTBOUND_MAX_PENDING" in full.json()["error"]

        gate.open()
        assert rt.flush(HOLD)
        accepted = client.post("/workflows/p/events", json=2)
        assert accepted.status_code == 202
    assert rt.flush(HOLD)
    assert gate.numbers() == [0, 2]  # the refused event was not run


def test_a_workflow_that_submits_is_admitted_without_waiting(
    make_runtime: Callable[..., Runtime], make_sink: Callable[..., HttpSink]
) -> None:
    """A run waiting for room that only its own end would free would wait for ever."""
    sink = make_sink()
    rt = make_runtime(max_pending=1, http_timeout=60)
    rt.register("p_inner", one_send(sink.url))

    def outer(event: Any, ctx: Any) -> None:
        rt.submit("p_inner", event)  # on a pool worker: counted, not held back

    rt.register("p_outer", outer)
    for n in range(5):
        rt.submit("p_outer", n, timeout=HOLD)
    assert rt.flush(HOLD)
    assert sorted(request.json()["n"] for request in sink.requests) == list(range(5))


def test_batched_sends_wait_for_their_batch_without_holding_back_submits(
    s3_server: S3Server, s3_client: Any, make_runtime: Callable[..., Runtime]
) -> None:
    """S3/SQL sends are bounded by OUTBOUND_BATCH_MEMORY_CAP once handed off, not by the
    count: a batch that waits to fill must not make submitters wait for it."""
    rt = make_runtime(
        max_pending=2, batch_max_age=3600, s3_create_buckets=True, **s3_server.config()
    )

    def three_objects(event: Any, ctx: Any) -> None:
        for part in range(3):
            ctx.send.s3(bucket="backpressure", prefix="runs/", payload={"n": event, "part": part})

    rt.register("p", three_objects)
    for n in range(10):
        rt.submit("p", n, timeout=10)  # 30 sends buffered, far past the limit of 2: no Busy
    assert rt.ledger.wait_runs(HOLD)
    assert rt.stats()["destinations"]["s3"]["delivered"] == 0  # nothing cut the batch short
    assert rt.flush(HOLD)
    [item] = s3_client.list_objects_v2(Bucket="backpressure")["Contents"]
    body = s3_client.get_object(Bucket="backpressure", Key=item["Key"])["Body"].read()
    lines = [json.loads(line) for line in gzip.decompress(body).splitlines()]
    assert sorted((line["n"], line["part"]) for line in lines) == [
        (n, part) for n in range(10) for part in range(3)
    ]


def test_stats_and_metrics_show_admission_and_waiting_callers(
    make_runtime: Callable[..., Runtime], gate: Gate
) -> None:
    from outbound.api.metrics import metrics_for

    rt = make_runtime(max_pending=2, http_timeout=60)
    rt.register("p", one_send(gate.url))
    admitted = [rt.submit("p", n) for n in range(2)]
    waiter = threading.Thread(target=lambda: rt.submit("p", 2, timeout=HOLD))
    waiter.start()
    try:
        wait_until(lambda: rt.stats()["admission"]["waiting"] == 1)
        assert rt.stats()["admission"] == {"in_flight": 2, "limit": 2, "waiting": 1}
        text = metrics_for(rt).render().decode()
        assert "outbound_admission_waiting 1.0" in text
        assert "outbound_admission_limit 2.0" in text
        assert "outbound_admitted 2.0" in text
    finally:
        gate.open()
        waiter.join(HOLD)
    assert rt.flush(HOLD)
    assert [future.result().status for future in admitted] == ["succeeded"] * 2
    assert rt.stats()["admission"]["in_flight"] == 0 and gate.numbers() == [0, 1, 2]
