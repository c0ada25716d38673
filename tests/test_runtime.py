"""The embedding API: runs, results, sends, custom destinations, flush and shutdown."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import trio

from outbound import Config, Runtime, SendError, UnknownWorkflowError
from outbound.destinations.base import Destination
from outbound.embedded import HttpSink


class Memory(Destination):
    """An in-memory custom destination: keeps payloads in a shared list."""

    def __init__(self, store: list[Any]) -> None:
        super().__init__()
        self.store = store

    def deliver(self, sends: list[Any]) -> None:
        for send in sends:
            self.store.append(send.payload)
            self.delivered(send, stored=len(self.store))


@pytest.fixture
def memory_runtime(make_runtime: Callable[..., Runtime]) -> tuple[Runtime, list[Any]]:
    store: list[Any] = []
    rt = make_runtime(start=False)
    rt.add_destination("memory", lambda _config: Memory.start(store))
    rt.start()
    return rt, store


def test_run_returns_result_and_deliveries(memory_runtime: tuple[Runtime, list[Any]]) -> None:
    rt, store = memory_runtime

    @rt.workflow("p_orders")
    def orders(event: dict[str, Any], ctx: Any) -> str:
        for item in event["items"]:
            ctx.send.to("memory", {"item": item})
        return "done"

    result = rt.run("p_orders", {"items": [1, 2, 3]})
    assert result.status == "succeeded" and result.value == "done" and result.sends == 3
    assert result.workflow_id == "p_orders" and result.error is None
    assert rt.flush(timeout=10)
    assert store == [{"item": 1}, {"item": 2}, {"item": 3}]
    deliveries = rt.deliveries(result.run_id)
    assert [d.status for d in deliveries] == ["delivered"] * 3
    assert [d.detail["stored"] for d in deliveries] == [1, 2, 3]
    assert all(d.destination == "memory" and d.attempts == 0 for d in deliveries)
    assert rt.run_result(result.run_id) == result
    stats = rt.stats()
    assert stats["runs"] == {"succeeded": 1}
    assert stats["destinations"]["memory"]["delivered"] == 3


def test_sends_before_an_exception_are_delivered(memory_runtime: Any) -> None:
    rt, store = memory_runtime

    @rt.workflow("p_fail")
    def fail(event: Any, ctx: Any) -> None:
        ctx.send.to("memory", "before")
        raise ValueError("bad event")

    result = rt.run("p_fail", {})
    assert result.status == "failed" and "ValueError: bad event" in result.error
    assert rt.flush(timeout=10)
    assert store == ["before"]
    assert rt.run("p_fail", {}).status == "failed"  # the runtime keeps running


def test_deliver_on_error_false_drops_sends_of_failed_runs(make_runtime: Any) -> None:
    store: list[Any] = []
    rt = make_runtime(start=False, deliver_on_error=False)
    rt.add_destination("memory", lambda _config: Memory.start(store))
    rt.start()

    @rt.workflow("p_fail")
    def fail(event: Any, ctx: Any) -> None:
        ctx.send.to("memory", "before")
        raise ValueError("bad")

    result = rt.run("p_fail", {})
    assert result.status == "failed" and result.sends == 0
    assert rt.flush(timeout=10)
    assert store == [] and rt.deliveries(result.run_id) == []


def test_ctx_end_delivers_earlier_sends_only(memory_runtime: Any) -> None:
    rt, store = memory_runtime

    @rt.workflow("p_end")
    def end(event: Any, ctx: Any) -> None:
        ctx.send.to("memory", "reached")
        try:
            ctx.end("nothing more to do")
        except Exception:  # a workflow's broad except must not swallow the end
            ctx.send.to("memory", "swallowed")
        ctx.send.to("memory", "never")

    result = rt.run("p_end", {})
    assert result.status == "ended" and result.value == "nothing more to do"
    assert rt.flush(timeout=10)
    assert store == ["reached"]


def test_caught_send_error_lets_the_run_continue(memory_runtime: Any) -> None:
    rt, store = memory_runtime

    @rt.workflow("p_validate")
    def validate(event: Any, ctx: Any) -> str:
        ctx.send.to("memory", 1)
        try:
            ctx.send.http(url="not a url")
        except SendError as error:
            ctx.send.to("memory", error.field)
        return "continued"

    result = rt.run("p_validate", {})
    assert result.status == "succeeded" and result.value == "continued" and result.sends == 2
    assert rt.flush(timeout=10)
    assert store == [1, "url"]


def test_unconfigured_destination_fails_the_send_not_silently(memory_runtime: Any) -> None:
    rt, _ = memory_runtime

    @rt.workflow("p_s3")
    def to_s3(event: Any, ctx: Any) -> None:
        ctx.send.s3(bucket="events", prefix="x/", payload=event)

    result = rt.run("p_s3", {"a": 1})
    assert result.status == "failed"
    assert "OUTBOUND_S3_ENDPOINT" in result.error


def test_async_workflows_run_on_the_event_loop(memory_runtime: Any) -> None:
    rt, store = memory_runtime

    @rt.workflow("p_async")
    async def handler(event: Any, ctx: Any) -> int:
        await asyncio.sleep(0.01)
        ctx.send.to("memory", event)
        if event == "end":
            ctx.end("early")
        if event == "fail":
            raise KeyError("missing")
        return 7

    assert rt.run("p_async", "ok").value == 7
    ended = rt.run("p_async", "end")
    assert (ended.status, ended.value) == ("ended", "early")
    failed = rt.run("p_async", "fail")
    assert failed.status == "failed" and "KeyError" in failed.error
    assert rt.flush(timeout=10)
    assert store == ["ok", "end", "fail"]


def test_arun_from_asyncio_and_trio(memory_runtime: Any) -> None:
    rt, _ = memory_runtime
    rt.register("p_echo", lambda event, ctx: event)

    async def from_asyncio() -> Any:
        return await asyncio.gather(*(rt.arun("p_echo", n) for n in range(20)))

    async def from_trio() -> list[Any]:
        results: list[Any] = []

        async def one(n: int) -> None:
            results.append(await rt.arun("p_echo", n))

        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(one, n)
        return results

    assert [r.value for r in asyncio.run(from_asyncio())] == list(range(20))
    assert sorted(r.value for r in trio.run(from_trio)) == list(range(20))


def test_submit_returns_a_future(memory_runtime: Any) -> None:
    rt, store = memory_runtime
    rt.register("p_one", lambda event, ctx: ctx.send.to("memory", event))
    futures = [rt.submit("p_one", n) for n in range(100)]
    assert {f.result(timeout=10).status for f in futures} == {"succeeded"}
    assert rt.flush(timeout=10)
    assert sorted(store) == list(range(100))


def test_ten_thousand_concurrent_runs_complete(memory_runtime: Any) -> None:
    rt, store = memory_runtime
    rt.register("p_many", lambda event, ctx: ctx.send.to("memory", event))
    futures = [rt.submit("p_many", n) for n in range(10_000)]
    results = [f.result(timeout=60) for f in futures]
    assert all(r.status == "succeeded" for r in results)
    assert rt.flush(timeout=60)
    assert sorted(store) == list(range(10_000))
    # Runs share the pool: no thread per run.
    assert threading.active_count() < 60


def test_unknown_workflow_is_a_clear_key_error(memory_runtime: Any) -> None:
    rt, _ = memory_runtime
    rt.register("p_known", lambda event, ctx: None)
    with pytest.raises(UnknownWorkflowError) as caught:
        rt.run("p_unknown", {})
    assert isinstance(caught.value, KeyError)
    assert "p_unknown" in str(caught.value) and "p_known" in str(caught.value)


def test_running_before_start_says_what_to_do(make_runtime: Any) -> None:
    rt = make_runtime(start=False)
    rt.register("p", lambda event, ctx: None)
    with pytest.raises(RuntimeError, match="rt.start"):
        rt.run("p", {})


def test_registration_errors(make_runtime: Any) -> None:
    rt = make_runtime(start=False)
    rt.register("p", lambda event, ctx: None)
    with pytest.raises(ValueError, match="already registered"):
        rt.register("p", lambda event, ctx: None)
    with pytest.raises(TypeError, match="not callable"):
        rt.register("q", "not a function")
    with pytest.raises(ValueError, match="already added"):
        rt.add_destination("http", lambda config: None)


def test_config_from_env_and_bad_values() -> None:
    config = Config.from_env(
        {
            "OUTBOUND_HTTP_TIMEOUT": "2.5",
            "OUTBOUND_HTTP_MAX_ATTEMPTS": "1",
            "OUTBOUND_S3_SECURE": "yes",
            "OUTBOUND_DATA_DIR": "/tmp/x",
        }
    )
    assert config.http_timeout == 2.5 and config.http_max_attempts == 1
    assert config.s3_secure is True and str(config.data_dir) == "/tmp/x"
    with pytest.raises(ValueError, match="OUTBOUND_HTTP_CONCURRENCY='many'"):
        Config.from_env({"OUTBOUND_HTTP_CONCURRENCY": "many"})
    with pytest.raises(ValueError, match="http_concurrency must be at least 1"):
        Config(http_concurrency=0)


def test_context_manager_stops_and_drains(data_dir: Any, sink: HttpSink) -> None:
    rt = Runtime(Config(data_dir=data_dir))
    rt.register("p_http", lambda event, ctx: ctx.send.http(sink.url + "/hook", data=event))
    with rt:
        for n in range(50):
            rt.submit("p_http", {"n": n})
    assert not rt.running
    bodies = sorted(json.loads(r.body)["n"] for r in sink.requests)
    assert bodies == list(range(50))
    assert not (data_dir / "dead-letter").exists()


def test_stop_dead_letters_what_is_undelivered(data_dir: Any, make_sink: Any) -> None:
    gate = threading.Event()

    def stuck(_request: Any) -> Any:
        gate.wait(10)
        from outbound.embedded import SinkResponse

        return SinkResponse(503)

    sink = make_sink(stuck)
    rt = Runtime(Config(data_dir=data_dir, http_concurrency=2, retry_base=0.01)).start()
    rt.register("p_http", lambda event, ctx: ctx.send.http(sink.url + "/x", data=event))
    run_ids = [rt.run("p_http", {"n": n}).run_id for n in range(5)]
    report = rt.stop(drain=True, timeout=0.5)
    gate.set()
    assert not report.drained and report.dead_lettered == 5
    assert report.per_destination == {"http": 5}
    files = list((data_dir / "dead-letter").glob("http-*.jsonl"))
    assert len(files) == 1
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert sorted(json.loads(line["payload"]["body"])["n"] for line in lines) == list(range(5))
    assert {line["run_id"] for line in lines} == set(run_ids)
    assert all(line["payload"]["url"] == sink.url + "/x" for line in lines)
    for run_id in run_ids:
        (record,) = rt.deliveries(run_id)
        assert record.status == "failed" and "dead-lettered" in record.error


def test_a_runtime_left_running_is_drained_at_interpreter_exit(tmp_path: Any) -> None:
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import atexit
        from outbound import Config, Runtime
        from outbound.embedded import HttpSink

        sink = HttpSink().start()
        atexit.register(lambda: print("sink received", sink.count))
        rt = Runtime(Config(data_dir={str(tmp_path)!r})).start()
        rt.register("p", lambda event, ctx: ctx.send.http(sink.url + "/x", data=event))
        for n in range(20):
            rt.submit("p", {{"n": n}})
        """
    )
    finished = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr
    assert "sink received 20" in finished.stdout
    assert "not stopped; stopping it" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_stopped_runtime_is_freed_once_dropped(data_dir: Any) -> None:
    """The first start in a process freezes the GC's view of what exists then (the
    runtime among it); a stopped runtime lets go of the machinery that ties it into
    reference cycles, so even that one is freed once dropped, with its records."""

    def start_and_stop() -> tuple[weakref.ref[Runtime], weakref.ref[Any]]:
        store: list[Any] = []
        rt = Runtime(Config(data_dir=data_dir))
        rt.add_destination("memory", lambda _config: Memory.start(store))
        rt.register("p", lambda event, ctx: ctx.send.to("memory", event))
        with rt:
            result = rt.run("p", {"n": 1})
            assert rt.flush(10)
        assert [d.status for d in rt.deliveries(result.run_id)] == ["delivered"]
        return weakref.ref(rt), weakref.ref(rt.ledger)

    dropped = [start_and_stop(), start_and_stop()]
    gc.collect()  # the stopped actors' own cycles
    assert [(rt() is None, ledger() is None) for rt, ledger in dropped] == [(True, True)] * 2


def test_sequential_runs_reach_a_destination_in_run_order(make_runtime: Any) -> None:
    # A caller that waits for each run (rt.run) sees its runs' sends arrive in the
    # order it made them, though runs go to different pool workers.
    from outbound import Destination

    received: list[int] = []

    class Recorder(Destination):
        def deliver(self, sends: list[Any]) -> None:
            for send in sends:
                received.append(send.payload)
                self.delivered(send)

    rt = make_runtime(start=False)
    rt.add_destination("recorder", lambda config: Recorder.start())
    rt.register("p", lambda event, ctx: ctx.send.to("recorder", event))
    rt.start()
    for n in range(300):
        rt.run("p", n)
    assert rt.flush(30)
    assert received == list(range(300))
