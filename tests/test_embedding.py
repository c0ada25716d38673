"""Embedding a runtime in an application: async workflows that block, a runtime that
starts again, the run future and runs in progress, failed runs' tracebacks, the API
mounted under a prefix, deeply nested JSON bodies, and draining on SIGTERM.

Everything runs against real servers on loopback (Postgres, an S3-protocol server,
HTTP sinks, hypercorn) and, for signals, a real subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import trio
from sse_support import collect
from starlette.applications import Starlette
from starlette.routing import Mount
from waiting import wait_until

from outbound import Config, RunFuture, Runtime
from outbound.actors.ids import new_id
from outbound.embedded import ReceivedRequest, SinkResponse

REPO = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token"


def count_rows(postgres_url: str, table: str) -> int:
    """Rows in `table`, read with a connection of the test's own (not the code under test)."""

    async def count() -> int:
        connection = await asyncpg.connect(postgres_url)
        try:
            return int(await connection.fetchval(f'SELECT count(*) FROM "{table}"'))
        finally:
            await connection.close()

    return asyncio.run(count())


def statuses(rt: Runtime, run_id: str) -> list[str]:
    return [delivery.status for delivery in rt.deliveries(run_id)]


# -- async workflows run on a loop of their own ----------------------------------------


def test_an_async_workflow_that_blocks_its_loop_does_not_stall_sql_loads(
    make_runtime, postgres_url
):
    table = f"t_{new_id()[:16]}"
    rt = make_runtime(database_url=postgres_url, batch_max_events=1)
    blocking, loaded = threading.Event(), threading.Event()

    @rt.workflow("p_blocks")
    async def blocks(event: Any, ctx: Any) -> bool:
        blocking.set()
        # A blocking call in async code (like time.sleep): it holds its loop
        # until the row below is in Postgres, or gives up.
        return loaded.wait(timeout=30)

    @rt.workflow("p_loads")
    def loads(event: Any, ctx: Any) -> None:
        ctx.send.sql(table=table, payload=event)

    sleeper = rt.submit("p_blocks")
    assert blocking.wait(10)
    load = rt.run("p_loads", {"n": 1})
    wait_until(lambda: statuses(rt, load.run_id) == ["delivered"], timeout=20)
    try:
        assert statuses(rt, load.run_id) == ["delivered"], "the load waited for the workflow"
        assert count_rows(postgres_url, table) == 1
        assert not sleeper.done(), "the row was loaded while the workflow still blocked"
    finally:
        loaded.set()
    result = sleeper.result(30)
    assert result.status == "succeeded" and result.value is True


# -- a stopped runtime starts again ------------------------------------------------------


def test_start_stop_start_stop_delivers_in_each_cycle(
    make_runtime, make_api, sink, s3_server, s3_client, postgres_url
):
    bucket, table = f"restart-{new_id()[:12]}", f"t_{new_id()[:16]}"
    s3_client.create_bucket(Bucket=bucket)
    rt = make_runtime(start=False, database_url=postgres_url, **s3_server.config())

    @rt.workflow("p_orders")
    def orders(event: Any, ctx: Any) -> None:
        ctx.send.http(url=f"{sink.url}/orders", method="POST", data=event)
        ctx.send.sse(channel="orders", payload=event)
        ctx.send.s3(bucket=bucket, prefix="orders/", payload=event)
        ctx.send.sql(table=table, payload=event)

    results = []
    for cycle in (1, 2, 3):
        with rt:
            api = make_api(rt)
            result = rt.run("p_orders", {"cycle": cycle})
            assert rt.flush(30)
            streamed = collect(f"{api.url}/pipelines/p_orders/sse", lambda got: got.events)
            api.stop()
        results.append(result)
        assert statuses(rt, result.run_id) == ["delivered"] * 4, rt.deliveries(result.run_id)
        # The stream's history goes on across restarts.
        assert [json.loads(e.data) for e in streamed.events] == [
            {"cycle": n} for n in range(1, cycle + 1)
        ]
        assert [r.json() for r in sink.requests] == [{"cycle": n} for n in range(1, cycle + 1)]
        assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == cycle
        assert count_rows(postgres_url, table) == cycle
    assert not rt.running
    # The history of every cycle is still there.
    assert [rt.run_result(r.run_id) for r in results] == results
    assert rt.stats()["destinations"]["http"]["delivered"] == 3


def test_a_runtime_started_again_is_still_freed_once_dropped(data_dir):
    """Restarts keep the destination factories; they must not tie the runtime into
    reference cycles (the first start in a process freezes the GC's view of it)."""

    def cycles() -> weakref.ref[Runtime]:
        rt = Runtime(Config(data_dir=data_dir))
        rt.register("p", lambda event, ctx: ctx.send.sse(channel="c", payload=event))
        for _ in range(2):
            with rt:
                rt.run("p", {})
                assert rt.flush(10)
        return weakref.ref(rt)

    dropped = [cycles(), cycles()]
    gc.collect()  # the stopped actors' own cycles
    assert [ref() is None for ref in dropped] == [True, True]


# -- the run future, runs in progress, run_result ------------------------------------------


def test_submit_returns_a_run_future_and_a_run_in_progress_is_known_by_id(make_runtime, make_api):
    rt = make_runtime()
    release = threading.Event()
    rt.register("p_waits", lambda event, ctx: release.wait(30))
    api = make_api(rt)
    try:
        future = rt.submit("p_waits", {})
        assert isinstance(future, RunFuture) and isinstance(future.run_id, str)
        assert rt.run_in_progress(future.run_id)
        assert rt.run_result(future.run_id) is None
        answer = httpx.get(f"{api.url}/runs/{future.run_id}", timeout=10)
        assert answer.status_code == 200
        assert answer.json() == {"run_id": future.run_id, "status": "running", "deliveries": []}
    finally:
        release.set()
    result = future.result(10)
    assert result.run_id == future.run_id
    assert not rt.run_in_progress(future.run_id)
    assert rt.run_result(future.run_id) == result
    finished = httpx.get(f"{api.url}/runs/{future.run_id}", timeout=10)
    assert finished.status_code == 200 and finished.json()["status"] == "succeeded"
    assert rt.run_result("no-such-run") is None
    assert httpx.get(f"{api.url}/runs/no-such-run", timeout=10).status_code == 404


# -- failed runs: WARNING with the traceback, kept in the result --------------------------------


def test_a_failed_run_is_logged_at_warning_with_its_traceback(make_runtime, make_api, caplog):
    rt = make_runtime()

    def check_stock(event: Any) -> None:
        raise LookupError(f"no stock for {event['sku']}")

    @rt.workflow("p_fails")
    def fails(event: Any, ctx: Any) -> None:
        check_stock(event)

    api = make_api(rt)
    with caplog.at_level(logging.INFO, logger="outbound.run"):
        result = rt.run("p_fails", {"sku": "A-1"})
    assert result.status == "failed" and result.error == "LookupError: no stock for A-1"
    assert result.traceback is not None
    assert result.traceback.startswith("Traceback (most recent call last):")
    assert "in check_stock" in result.traceback and result.traceback.endswith(result.error)
    [record] = [r for r in caplog.records if result.run_id in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "LookupError: no stock for A-1" in record.getMessage()
    # The traceback is the record's exception: a log line shows it after the message.
    assert "in check_stock" in logging.Formatter().format(record)
    assert (record.workflow_id, record.run_id) == ("p_fails", result.run_id)  # JSON fields
    assert result.as_dict()["traceback"] == result.traceback
    answer = httpx.get(f"{api.url}/runs/{result.run_id}", timeout=10)
    assert answer.json()["traceback"] == result.traceback
    assert rt.run("p_fails", {"sku": "B"}).traceback != result.traceback  # per run


def test_a_run_that_succeeds_has_no_traceback(make_runtime):
    rt = make_runtime()
    rt.register("p", lambda event, ctx: "fine")
    result = rt.run("p", {})
    assert result.traceback is None and result.as_dict()["traceback"] is None


# -- the API mounted under a prefix --------------------------------------------------------


class HypercornServer:
    """A Starlette app served by hypercorn on a trio loop of its own thread, on 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = 0
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), name="mounted")

    async def _main(self) -> None:
        from hypercorn.config import Config as HypercornConfig
        from hypercorn.trio import serve

        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.graceful_timeout = 2
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            serving = functools.partial(serve, self.app, config, shutdown_trigger=self._stop.wait)
            binds = await nursery.start(serving)
            self.port = int(binds[0].rsplit(":", 1)[1])
            self._ready.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> HypercornServer:
        self._thread.start()
        assert self._ready.wait(10), "hypercorn did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._token is not None and self._stop is not None
        self._token.run_sync_soon(self._stop.set)
        self._thread.join(10)


def test_mounted_under_a_prefix_the_token_rules_still_hold(make_runtime):
    rt = make_runtime(api_token=TOKEN)
    rt.register("p_orders", lambda event, ctx: ctx.send.sse(channel="orders", payload=event))
    app = Starlette(routes=[Mount("/outbound", app=rt.asgi_app())])
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with HypercornServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        health = client.get("/outbound/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert client.post("/outbound/workflows/p_orders/events", json={}).status_code == 401
        accepted = client.post("/outbound/workflows/p_orders/events", json={"n": 1}, headers=bearer)
        assert accepted.status_code == 202
        location = accepted.headers["location"]
        assert location == f"/outbound/runs/{accepted.json()['run_id']}"
        assert wait_until(
            lambda: client.get(location, headers=bearer).json()["status"] != "running"
        )
        assert client.get(location).status_code == 401
        stream = f"{server.url}/outbound/pipelines/p_orders/sse"
        assert collect(stream, lambda got: True).status == 401
        streamed = collect(f"{stream}?token={TOKEN}", lambda got: got.events)
        assert streamed.status == 200
        assert [json.loads(event.data) for event in streamed.events] == [{"n": 1}]
        wrong = collect(f"{stream}?token=wrong", lambda got: True)
        assert wrong.status == 401


# -- deeply nested JSON bodies ----------------------------------------------------------


def nested(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


@pytest.mark.parametrize("depth", [100_000, 1_000, 129])
def test_json_nested_too_deeply_answers_400_on_every_json_endpoint(make_runtime, make_api, depth):
    rt = make_runtime()
    rt.register("p_echo", lambda event, ctx: event)
    api = make_api(rt)
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=api.url, timeout=10) as client:
        for path in ("/workflows/p_echo/events", "/sql"):
            answer = client.post(path, content=nested(depth), headers=headers)
            assert answer.status_code == 400, (path, answer.text)
            assert "nested deeper than 128 levels" in answer.json()["error"]
        # Within the limit: accepted, run, and its value (the event) is shown.
        accepted = client.post("/workflows/p_echo/events", content=nested(128), headers=headers)
        assert accepted.status_code == 202
        run_id = accepted.json()["run_id"]
        assert wait_until(lambda: client.get(f"/runs/{run_id}").json()["status"] != "running")
        shown = client.get(f"/runs/{run_id}")
        assert shown.status_code == 200 and shown.json()["status"] == "succeeded"
        assert json.dumps(shown.json()["value"]).replace(" ", "") == nested(128).decode()
        # Many brackets, in strings and side by side, are not depth.
        flat = {"text": '[{\\"' * 300, "items": [[n] for n in range(300)]}
        answer = client.post("/workflows/p_echo/events", content=json.dumps(flat).encode("utf-16"))
        assert answer.status_code == 202, answer.text
        assert client.get("/healthz").status_code == 200


# -- SIGTERM drains an embedded runtime --------------------------------------------------------

EMBEDDED = textwrap.dedent(
    """
    import os
    import threading
    from outbound import Config, Runtime

    # A long timeout: the test holds the answers back until the drain has begun.
    rt = Runtime(Config(data_dir=os.environ["DATA_DIR"], http_timeout=60))
    SINK = os.environ["SINK_URL"]
    rt.register("p", lambda event, ctx: ctx.send.http(url=SINK + "/x", method="POST", data=event))
    rt.install_signal_handlers()
    rt.start()
    try:
        for n in range(10):
            rt.submit("p", {"n": n})
        print("submitted", flush=True)
        threading.Event().wait()  # the program's own work; a signal ends it
    finally:
        print("delivered", rt.stats()["destinations"]["http"]["delivered"], flush=True)
    """
)


def test_sigterm_drains_an_embedded_runtime_then_exits(make_sink, tmp_path):
    gate = threading.Event()

    def held(_request: ReceivedRequest) -> SinkResponse:
        gate.wait(30)  # no answer until the process has begun draining
        return SinkResponse()

    sink = make_sink(held)
    process = subprocess.Popen(
        [sys.executable, "-c", EMBEDDED],
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "SINK_URL": sink.url,
            "DATA_DIR": str(tmp_path / "data"),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            lines.put(line)

    reader = threading.Thread(target=read, name="embedded-output")
    reader.start()

    def wait_line(text: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if text in lines.get(timeout=0.2):
                    return
            except queue.Empty:
                if process.poll() is not None:
                    break
        raise AssertionError(f"no line with {text!r}: {''.join(output)}")

    try:
        wait_line("submitted")
        process.send_signal(signal.SIGTERM)
        wait_line("received SIGTERM: draining")
        gate.set()
        code = process.wait(60)
    finally:
        gate.set()
        if process.poll() is None:
            process.kill()
            process.wait(5)
        reader.join(5)
    text = "".join(output)
    assert code == 128 + signal.SIGTERM, text
    assert sorted(request.json()["n"] for request in sink.requests) == list(range(10))
    assert "delivered 10" in text
    assert "every delivery is final" in text
    assert not (tmp_path / "data" / "dead-letter").exists()


def test_signal_handlers_can_only_be_installed_from_the_main_thread(make_runtime):
    rt = make_runtime(start=False)
    before = signal.getsignal(signal.SIGTERM)
    errors: list[BaseException] = []

    def install() -> None:
        try:
            rt.install_signal_handlers()
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join(10)
    assert len(errors) == 1 and "main thread" in str(errors[0])
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("during_a_state_change", [False, True])
def test_sigint_drains_then_reaches_the_previous_handler(make_runtime, sink, during_a_state_change):
    """After draining, the handler that was there before gets the signal: SIGINT's
    default raises KeyboardInterrupt in the main thread (where pytest runs tests).

    The handler runs on the main thread between two bytecodes: when that thread is
    inside a state transition (holding the runtime's state lock, as in `stop()`), the
    handler's own `stop()` must not wait for that lock forever."""
    rt = make_runtime()
    rt.register("p", lambda event, ctx: ctx.send.http(url=f"{sink.url}/x", data=event))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    handlers = rt.install_signal_handlers()
    try:
        assert rt.install_signal_handlers() is handlers  # once per runtime
        result = rt.run("p", {"n": 1})
        held = rt._lifecycle.lock if during_a_state_change else contextlib.nullcontext()
        with pytest.raises(KeyboardInterrupt), held:
            signal.raise_signal(signal.SIGINT)
        assert not rt.running
        assert statuses(rt, result.run_id) == ["delivered"]
    finally:
        handlers.restore()
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGINT) is previous
