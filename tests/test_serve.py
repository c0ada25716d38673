"""`outbound serve` as a real subprocess: serves the API, and SIGTERM drains it and exits 0."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sse_support import StalledClient, collect

from outbound.embedded import SinkResponse
from outbound.serve import is_loopback, load_runtime

REPO = Path(__file__).resolve().parent.parent

APP = textwrap.dedent(
    """
    import os
    from outbound import Config, Runtime

    rt = Runtime(Config.from_env())
    SINK = os.environ["SINK_URL"]

    @rt.workflow("p_orders")
    def orders(event, ctx):
        ctx.send.http(url=SINK + "/orders", method="POST", data=event)
        ctx.send.sse(channel="orders", payload=event)
    """
)


class Served:
    """An `outbound serve` subprocess and the lines it prints."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "outbound.cli", "serve", "--port", "0", *args],
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(REPO), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, name="serve-output")
        self._reader.start()
        self.url = self._wait_for_url()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def _wait_for_url(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if "serving on " in line:
                return line.split("serving on ", 1)[1].split()[0]
        raise AssertionError(f"outbound serve did not start: {''.join(self.output)}")

    def terminate(self, timeout: float = 30.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._reader.join(5)


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator:
    started: list[Served] = []

    def start(args: list[str], env: dict[str, str]) -> Served:
        env = {"OUTBOUND_DATA_DIR": str(tmp_path / "data"), **env}
        served = Served(args, tmp_path, env)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


def test_sigterm_closes_streams_drains_deliveries_and_exits_0(serve_process, make_sink, tmp_path):
    # 40 deliveries of 1 s, 16 at a time, take 3 s: posting is done well before, even on
    # a loaded machine, so SIGTERM finds deliveries in flight.
    sink = make_sink(lambda _request: SinkResponse(delay=1.0))
    (tmp_path / "servedapp.py").write_text(APP)
    served = serve_process(["--app", "servedapp:rt"], {"SINK_URL": sink.url})
    url = f"{served.url}/pipelines/p_orders/sse"
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=served.url, timeout=10) as client:
        stream = pool.submit(collect, url, None, None, 30)  # reads until the server ends it
        for number in range(40):
            answer = client.post("/workflows/p_orders/events", json={"id": number})
            assert answer.status_code == 202
        assert sink.count < 40, "the sink is slow: some deliveries are still in flight"
        code = served.terminate()
        streamed = stream.result(30)
    output = "".join(served.output)
    assert code == 0, output
    assert sorted(request.json()["id"] for request in sink.requests) == list(range(40))
    assert "every delivery is final" in output
    assert not (tmp_path / "data" / "dead-letter").exists()
    assert streamed.status == 200
    assert streamed.ended, "SIGTERM must end open SSE streams"
    assert [json.loads(event.data)["id"] for event in streamed.events] == list(range(40))


def test_sigterm_does_not_wait_for_a_client_that_reads_nothing(serve_process, sink, tmp_path):
    (tmp_path / "servedapp.py").write_text(APP)
    served = serve_process(["--app", "servedapp:rt"], {"SINK_URL": sink.url})
    stalled = StalledClient(f"{served.url}/pipelines/p_orders/sse")
    try:
        with httpx.Client(base_url=served.url, timeout=10) as client:
            for number in range(30):  # 30 x 40 KB: more than the stalled socket takes
                client.post("/workflows/p_orders/events", json={"id": number, "pad": "x" * 40_000})
        time.sleep(0.5)
        started = time.monotonic()
        code = served.terminate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        stalled.close()
    assert code == 0, "".join(served.output)
    assert elapsed < 8, f"shutdown took {elapsed:.1f} s"


def test_serve_demo_streams_its_events(serve_process):
    served = serve_process(["--demo"], {})
    url = f"{served.url}/pipelines/p_demo/sse"
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(
            collect,
            url,
            lambda got: any(json.loads(e.data).get("hello") == "demo" for e in got.events),
            None,
            20,
        )
        time.sleep(0.3)
        answer = httpx.post(f"{served.url}/workflows/p_demo/events", json={"hello": "demo"})
        assert answer.status_code == 202
        got = stream.result(30)
    assert any(event.type == "events" for event in got.events)
    assert served.terminate() == 0


GC_APP = textwrap.dedent(
    """
    import gc
    from outbound import Config, Runtime

    rt = Runtime(Config.from_env())  # gc_tuning off: the command turns it on

    @rt.workflow("p_gc")
    def threshold(event, ctx):
        return {"threshold": gc.get_threshold()[0], "frozen": gc.get_freeze_count()}
    """
)


def test_serve_tunes_the_collector_of_its_process(serve_process, tmp_path):
    (tmp_path / "gcapp.py").write_text(GC_APP)
    served = serve_process(["--app", "gcapp:rt"], {})
    with httpx.Client(base_url=served.url, timeout=10) as client:
        run_id = client.post("/workflows/p_gc/events", json={}).json()["run_id"]
        deadline = time.monotonic() + 10
        while (run := client.get(f"/runs/{run_id}").json())["status"] == "running":
            assert time.monotonic() < deadline, "the run did not end"
            time.sleep(0.05)
    assert run["value"]["threshold"] == 5000 and run["value"]["frozen"] > 0
    assert served.terminate() == 0


FAILING_APP = textwrap.dedent(
    """
    import os
    from outbound import Config, Runtime

    rt = Runtime(Config.from_env())
    SINK = os.environ["SINK_URL"]

    def reserve(event):
        raise KeyError(event["sku"])

    @rt.workflow("p_reserve")
    def fails(event, ctx):
        reserve(event)

    @rt.workflow("p_hook")
    def hook(event, ctx):
        ctx.send.http(url=SINK + "/hook", data=event, auth=("user", os.environ["HOOK_PASSWORD"]))
    """
)
HOOK_PASSWORD = "hook-pass-8c1d"


def _served_failures(serve_process, sink, tmp_path, env: dict[str, str]) -> tuple[str, str, str]:
    """A failed run and a failed delivery in a served app: (run id, delivery id, output)."""
    (tmp_path / "failingapp.py").write_text(FAILING_APP)
    env = {"SINK_URL": sink.url, "HOOK_PASSWORD": HOOK_PASSWORD, "OUTBOUND_JOURNAL": "off", **env}
    served = serve_process(["--app", "failingapp:rt"], env)
    with httpx.Client(base_url=served.url, timeout=10) as client:
        failed = client.post("/workflows/p_reserve/events", json={"sku": "A-7"}).json()["run_id"]
        hooked = client.post("/workflows/p_hook/events", json={"n": 1}).json()["run_id"]
        deadline = time.monotonic() + 20
        while True:
            run = client.get(f"/runs/{hooked}").json()
            if run["status"] != "running" and all(
                d["status"] == "failed" for d in run["deliveries"]
            ):
                break
            assert time.monotonic() < deadline, run
            time.sleep(0.05)
        assert client.get(f"/runs/{failed}").json()["status"] == "failed"
    assert served.terminate() == 0
    return failed, run["deliveries"][0]["id"], "".join(served.output)


def test_serve_with_json_log_format_writes_one_json_object_per_line(
    serve_process, make_sink, tmp_path
):
    sink = make_sink(lambda _request: SinkResponse(422))
    run_id, delivery_id, output = _served_failures(  # journaled, as serve is by default
        serve_process, sink, tmp_path, {"OUTBOUND_LOG_FORMAT": "json", "OUTBOUND_JOURNAL": "local"}
    )
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any("serving on http://127.0.0.1:" in line["message"] for line in lines)
    (run_line,) = [line for line in lines if line.get("run_id") == run_id]
    assert run_line["level"] == "WARNING" and run_line["logger"] == "outbound.run"
    assert run_line["workflow_id"] == "p_reserve"
    assert "KeyError: 'A-7'" in run_line["message"] and "in reserve" in run_line["exception"]
    (delivery_line,) = [line for line in lines if delivery_id in line.get("delivery_ids", [])]
    assert delivery_line["level"] == "WARNING" and delivery_line["destination"] == "http"
    assert delivery_line["error"] == "HTTP 422"
    assert HOOK_PASSWORD not in output


def test_serve_logs_plain_lines_by_default(serve_process, make_sink, tmp_path):
    sink = make_sink(lambda _request: SinkResponse(422))
    run_id, delivery_id, output = _served_failures(serve_process, sink, tmp_path, {})
    lines = output.splitlines()
    (run_line,) = [line for line in lines if run_id in line]
    assert run_line.endswith(
        f"WARNING outbound.run: workflow 'p_reserve' run {run_id} failed: KeyError: 'A-7'"
    )
    assert "Traceback (most recent call last):" in output and "in reserve" in output
    (delivery_line,) = [line for line in lines if delivery_id in line]
    assert (
        " WARNING outbound.destinations.deadletter: dead-lettered 1 failed 'http'" in delivery_line
    )
    assert delivery_line.endswith(f"{delivery_id}: HTTP 422")
    assert HOOK_PASSWORD not in output


def test_is_loopback():
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("192.168.1.10")


def test_load_runtime_explains_bad_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notaruntime.py").write_text("thing = 42\n")
    with pytest.raises(SystemExit, match="module:attribute"):
        load_runtime("no_colon")
    with pytest.raises(SystemExit, match="cannot import"):
        load_runtime("missing_module_xyz:rt")
    with pytest.raises(SystemExit, match="no attribute"):
        load_runtime("notaruntime:rt")
    with pytest.raises(SystemExit, match="expected a runtime.Runtime"):
        load_runtime("notaruntime:thing")


def test_serve_on_a_busy_port_exits_1_with_a_clear_message(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "outbound.cli", "serve", "--demo", "--port", str(port)],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO), "OUTBOUND_DATA_DIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stdout


def test_the_api_token_never_reaches_the_output(serve_process):
    """Through the inspector (its page, the token in the notices stream's URL, the JSON
    reads, a wrong token, a run that fails), nothing `outbound serve` prints holds it."""
    token = "tok-7f3a9c1e5b"
    served = serve_process(["--demo"], {"OUTBOUND_API_TOKEN": token})
    bearer = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{served.url}/inspector", timeout=10).status_code == 401
    with ThreadPoolExecutor(1) as pool:
        notices = pool.submit(
            collect,
            f"{served.url}/inspector/events?token={token}",
            lambda got: got.events,
            None,
            20,
        )
        time.sleep(0.3)
        posted = httpx.post(
            f"{served.url}/workflows/p_demo/events", json={"n": 1}, headers=bearer, timeout=10
        )
        assert posted.status_code == 202
        assert notices.result(30).events
    assert httpx.get(f"{served.url}/runs", headers=bearer, timeout=10).status_code == 200
    wrong = {"Authorization": f"Bearer {token}-wrong"}
    assert httpx.get(f"{served.url}/runs", headers=wrong, timeout=10).status_code == 401
    assert httpx.get(f"{served.url}/inspector/events?token=x{token}", timeout=10).status_code == 401
    assert served.terminate() == 0
    printed = "".join(served.output)
    assert "serving on" in printed and token not in printed
