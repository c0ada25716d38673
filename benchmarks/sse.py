"""SSE fan-out: ours (runs -> hub actor -> trio broadcaster) vs a bare sse-starlette app.

Both servers run the same way: hypercorn on a trio loop thread in this
process, fed by a producer thread at a fixed event rate; every event's data
carries its send time (`"t"`), stamped before the run starts (ours) or before
the hand-over to the loop (baseline). Subscribers are streaming clients in a
separate process (`benchmarks.sse_clients`), which measures latency from that
stamp to receipt. The baseline is what one would write without this project:
one bounded trio memory channel per client, a broadcaster putting each event
into every channel, sse-starlette encoding each event per client.

`--quick`: 200 subscribers x 50 events/s. The full run adds 1,000 subscribers
x 10 events/s and a ramp to the highest event rate each setup sustains.
A run with one stalled subscriber shows that it does not hold the others back.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from outbound import Config, Runtime
from outbound.api import ApiServer
from outbound.benchmarks.report import Report

PAD = "x" * 200  # event bodies of ~250 bytes
WORKFLOW = "p_bench"


# -- the baseline: a bare sse-starlette app --------------------------------------------


class BareBroadcaster:
    """One memory channel per client; each event goes into every channel (drop when full)."""

    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self.clients: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self.next_id = 0
        self.dropped = 0

    def broadcast(self, payload: dict[str, Any]) -> None:  # on the trio loop
        self.next_id += 1
        event = {"id": str(self.next_id), "event": "tick", "data": json.dumps(payload)}
        for channel in list(self.clients):
            try:
                channel.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError):
                self.dropped += 1
                self.clients.discard(channel)
                channel.close()

    async def stream(self, request: Request) -> EventSourceResponse:
        send, receive = trio.open_memory_channel[dict[str, Any]](self.queue_size)
        self.clients.add(send)

        async def events() -> Any:
            try:
                async for event in receive:
                    yield event
            finally:
                self.clients.discard(send)

        return EventSourceResponse(events(), ping=15)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/stream", self.stream)])


class BareServer:
    """The baseline app served by hypercorn on its own trio loop thread."""

    def __init__(self, queue_size: int) -> None:
        self.broadcaster = BareBroadcaster(queue_size)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), name="bare-sse")
        self.port = 0

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.backlog = 2048
        config.accesslog = None
        config.errorlog = logging.getLogger("outbound.benchmarks.sse.hypercorn")  # type: ignore[assignment]
        config.graceful_timeout = 2
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                functools.partial(
                    serve, self.broadcaster.app(), config, shutdown_trigger=self._stop.wait
                )
            )
            self.port = int(binds[0].rsplit(":", 1)[1])
            self._ready.set()

    def __enter__(self) -> BareServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        def shut() -> None:
            for channel in list(self.broadcaster.clients):
                channel.close()
            self._stop.set()

        self.token.run_sync_soon(shut)
        self._thread.join(15)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream"

    def publish(self, payload: dict[str, Any]) -> None:
        self.token.run_sync_soon(self.broadcaster.broadcast, payload)

    def subscribers(self) -> int:
        return len(self.broadcaster.clients)


Served = tuple[str, Callable[[dict], None], Callable[[], int], Callable[[], int]]
"""(stream URL, publish(payload), live subscribers(), subscribers cut off())"""


# -- ours ---------------------------------------------------------------------------------


@contextmanager
def our_server(queue_size: int) -> Iterator[Served]:
    data_dir = tempfile.mkdtemp(prefix="outbound-sse-bench-")
    runtime = Runtime(Config(data_dir=data_dir, sse_queue=queue_size, gc_tuning=True))

    @runtime.workflow(WORKFLOW)
    def bench(event: dict[str, Any], ctx: Any) -> None:
        ctx.send.sse(channel="tick", payload=event)

    with runtime:
        server = ApiServer(runtime).start()
        try:
            yield (
                f"{server.url}/pipelines/{WORKFLOW}/sse",
                lambda payload: runtime.submit(WORKFLOW, payload),
                lambda: runtime.sse_hub.subscribers,
                lambda: runtime.sse_hub.disconnected,
            )
        finally:
            server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@contextmanager
def bare_server(queue_size: int) -> Iterator[Served]:
    with BareServer(queue_size) as server:
        yield server.url, server.publish, server.subscribers, lambda: server.broadcaster.dropped


# -- one measurement ----------------------------------------------------------------------


def _produce(publish: Callable[[dict], None], rate: float, seconds: float) -> int:
    interval = 1.0 / rate
    started = time.perf_counter()
    sent = 0
    while True:
        due = started + sent * interval
        if due - started >= seconds:
            return sent
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        publish({"seq": sent, "t": time.time(), "pad": PAD})
        sent += 1


def measure(
    setup: Callable[[int], Any],
    clients: int,
    rate: float,
    seconds: float,
    stalled: int = 0,
    queue_size: int = 100,
) -> dict[str, Any]:
    """Serve, connect the client fan, produce for `seconds`, and collect its figures."""
    with setup(queue_size) as (url, publish, subscribers, disconnected):
        fan = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "outbound.benchmarks.sse_clients",
                "--url",
                url,
                "--clients",
                str(clients),
                "--stalled",
                str(stalled),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert fan.stdout is not None
            assert fan.stdout.readline().strip() == "ready", "the client fan did not connect"
            deadline = time.monotonic() + 10
            while subscribers() < clients + stalled and time.monotonic() < deadline:
                time.sleep(0.01)
            sent = _produce(publish, rate, seconds)
            time.sleep(1.0)  # let the tail arrive
            fan.terminate()
            summary = json.loads(fan.stdout.readline())
            fan.wait(10)
        finally:
            if fan.poll() is None:
                fan.kill()
                fan.wait(5)
        cut_off = disconnected()
    expected = sent * clients
    return {
        "delivered_per_s": round(summary["received"] / seconds, 1),
        "subscribers": clients,
        "event_rate": rate,
        "complete": round(summary["received"] / expected, 4) if expected else 0.0,
        "p50_ms": round(summary["p50_ms"], 2),
        "p99_ms": round(summary["p99_ms"], 2),
        "max_ms": round(summary["max_ms"], 2),
        "stalled": stalled,
        "disconnected": cut_off,
        "failures": len(summary["failures"]),
    }


def _sustains(result: dict[str, Any]) -> bool:
    return result["complete"] >= 0.99 and result["p99_ms"] <= 1000


def highest_rate(setup: Callable[[int], Any], clients: int, rates: list[float]) -> float:
    best = 0.0
    for rate in rates:
        result = measure(setup, clients, rate, seconds=4)
        if not _sustains(result):
            break
        best = rate
    return best


def run(quick: bool) -> Report:
    report = Report("sse")
    seconds = 5.0 if quick else 10.0
    ours = measure(our_server, 200, 50, seconds)
    bare = measure(bare_server, 200, 50, seconds)
    ours_stalled = measure(our_server, 200, 50, seconds, stalled=1)
    report.results["ours 200 subs x 50/s"] = ours
    report.results["bare sse-starlette 200x50/s"] = bare
    report.results["ours, 1 stalled subscriber"] = ours_stalled
    report.ratios["vs_bare_sse"] = round(
        ours["delivered_per_s"] / max(bare["delivered_per_s"], 1e-9), 3
    )
    report.targets["vs_bare_sse"] = ">= 0.8"
    report.ratios["p99_ms"] = ours["p99_ms"]
    report.targets["p99_ms"] = "<= 250"
    report.ratios["p99_ms_with_stalled"] = ours_stalled["p99_ms"]
    report.targets["p99_ms_with_stalled"] = "<= 250"
    report.ratios["p99_vs_bare"] = round(ours["p99_ms"] / max(bare["p99_ms"], 0.001), 3)
    if not quick:
        report.results["ours 1000 subs x 10/s"] = measure(our_server, 1000, 10, seconds)
        report.results["bare 1000 subs x 10/s"] = measure(bare_server, 1000, 10, seconds)
        rates = [50, 100, 200, 400, 800]
        ours_max = highest_rate(our_server, 200, rates)
        bare_max = highest_rate(bare_server, 200, rates)
        report.results["highest sustained rate, 200 subs"] = {
            "ours_events_per_s": ours_max,
            "bare_events_per_s": bare_max,
        }
        if bare_max:
            report.ratios["max_rate_vs_bare"] = round(ours_max / bare_max, 3)
    report.notes.append(
        "subscribers are streaming clients in a separate process; latency is send "
        "(before the run starts) to client receipt; sustained = >= 99% delivered and "
        "p99 <= 1 s; the stalled subscriber reads nothing with a 4 KiB receive buffer "
        "(queue 100 events: it is disconnected once its socket buffers are full)"
    )
    return report
