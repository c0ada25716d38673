"""`http`: deliveries per second to a local HTTP sink: ours, raw aiohttp, raw httpx, the sink.

Every client uses the same concurrency (the runtime's default, 16) and
keep-alive against the same sink: `http_sink.py`'s minimal asyncio protocol in
its own process, whose own capacity (`sink_capacity`) is printed too, so the
sink is shown not to be the limit. Ours is timed from the first run submitted
(one send per run) to the last delivery recorded; the baselines from the first
request to the last response. The fairness line sends to a fast sink alone,
then with a slow one (every answer after `SLOW_ANSWER` s) taking half the runs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import tempfile
import time
from statistics import median
from typing import Any

import aiohttp
import httpx
import trio

from outbound import Config, Runtime
from outbound.benchmarks.common import Stopwatch, rate
from outbound.benchmarks.http_sink import fast_sink_process, sink_capacity
from outbound.benchmarks.report import Report

PAYLOAD = {"id": 1, "name": "Luke Skywalker", "tags": ["jedi", "pilot"], "score": 9.5}
SLOW_ANSWER = 5.0  # seconds the slow endpoint of the fairness line takes to answer
SLOW_SENDS = 64  # sends to it: enough to take every request slot of a shared pool four times


def measure_ours(
    url: str,
    requests: int,
    concurrency: int,
    per_run: int = 1,
    cpu: list[float] | None = None,
    **settings: Any,
) -> float:
    """Deliveries per second; `settings`: more `Config` fields (`durable` sets the journal).

    All `concurrency` requests may go to the one host, as the baselines send.
    `cpu`: the CPU seconds per delivery (this process, all threads) are appended.
    """
    settings.setdefault("http_host_concurrency", concurrency)
    rt = Runtime(Config(http_concurrency=concurrency, gc_tuning=True, **settings))

    def workflow(event: Any, ctx: Any) -> None:
        for _ in range(per_run):
            ctx.send.http(url, data=PAYLOAD)

    rt.register("p_http", workflow)
    with rt:
        rt.run("p_http", None)  # warm the connection pool
        assert rt.flush(60)
        runs = requests // per_run
        with Stopwatch() as watch:
            for _ in range(runs):
                rt.submit("p_http", None)
            assert rt.flush(300), "deliveries did not finish"
        stats = rt.stats()["destinations"]["http"]
        assert stats["failed"] == 0, stats
    if cpu is not None:
        cpu.append(watch.cpu_seconds / (runs * per_run))
    return rate(runs * per_run, watch.seconds)


def measure_fast_host_beside_slow(
    fast_url: str, slow_url: str | None, requests: int, concurrency: int, data_dir: str
) -> float:
    """Deliveries per second to `fast_url` while `SLOW_SENDS` runs send to `slow_url`.

    The slow runs are submitted among the first fast ones; timed from the first
    run submitted until every fast send is delivered, while the slow ones are
    still outstanding (each takes `SLOW_ANSWER` s). `slow_url=None`: the fast
    host alone, the same fast runs.
    """
    rt = Runtime(
        Config(http_concurrency=concurrency, gc_tuning=True, data_dir=data_dir, shutdown_timeout=1)
    )

    def fast(event: Any, ctx: Any) -> None:
        ctx.send.http(fast_url, data=PAYLOAD)

    def slow(event: Any, ctx: Any) -> None:
        ctx.send.http(slow_url, data=PAYLOAD, timeout=SLOW_ANSWER * 4)

    rt.register("p_fast", fast)
    rt.register("p_slow", slow)
    rt.start()
    try:
        rt.run("p_fast", None)  # warm the connection pool
        assert rt.flush(60)
        delivered_before = rt.stats()["destinations"]["http"]["delivered"]
        with Stopwatch() as watch:
            for index in range(requests):
                rt.submit("p_fast", None)
                if slow_url is not None and index < SLOW_SENDS:
                    rt.submit("p_slow", None)
            while rt.stats()["destinations"]["http"]["delivered"] - delivered_before < requests:
                time.sleep(0.002)
        assert rt.stats()["destinations"]["http"]["failed"] == 0
    finally:
        rt.stop(drain=False)  # the slow sends are dead-lettered, not waited for
    return rate(requests, watch.seconds)


def measure_raw_aiohttp(
    url: str, requests: int, concurrency: int, cpu: list[float] | None = None
) -> float:
    """One `ClientSession` (keep-alive pool of `concurrency`), `concurrency` tasks posting.

    `cpu`: the CPU seconds per request are appended."""
    body = json.dumps(PAYLOAD).encode()
    headers = {"Content-Type": "application/json"}

    async def main() -> float:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
            left = [requests]

            async def worker() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        assert response.status < 400

            with Stopwatch() as watch:
                await asyncio.gather(*(worker() for _ in range(concurrency)))
        if cpu is not None:
            cpu.append(watch.cpu_seconds / requests)
        return rate(requests, watch.seconds)

    return asyncio.run(main())


def measure_raw_httpx(url: str, requests: int, concurrency: int) -> float:
    """One `AsyncClient` (a pool of `concurrency` connections) on trio, as httpx's docs show."""
    body = json.dumps(PAYLOAD).encode()
    headers = {"Content-Type": "application/json"}

    async def main() -> float:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits) as client:
            await client.post(url, content=body, headers=headers)
            limiter = trio.CapacityLimiter(concurrency)

            async def one() -> None:
                async with limiter:
                    response = await client.post(url, content=body, headers=headers)
                    response.raise_for_status()

            with Stopwatch() as watch:
                async with trio.open_nursery() as nursery:
                    for _ in range(requests):
                        nursery.start_soon(one)
        return rate(requests, watch.seconds)

    return trio.run(main)


def run(
    quick: bool = False, requests: int | None = None, concurrency: int = 16, rounds: int = 3
) -> Report:
    requests = requests or (2_000 if quick else 20_000)
    rounds = 1 if quick else rounds
    raw_aiohttp: list[float] = []
    raw_httpx: list[float] = []
    ours: list[float] = []
    # CPU seconds per delivery: steadier than rates on a shared machine, where a
    # busy neighbour slows a single-threaded client more than our several threads.
    raw_aiohttp_cpu: list[float] = []
    ours_cpu: list[float] = []
    with fast_sink_process() as url:
        capacity = sink_capacity(url, seconds=1.0 if quick else 3.0)
        # Interleaved rounds, the median of each: this machine's noise (and its
        # occasional fast or slow minute) hits all alike.
        for _ in range(rounds):
            raw_aiohttp.append(measure_raw_aiohttp(url, requests, concurrency, raw_aiohttp_cpu))
            raw_httpx.append(measure_raw_httpx(url, requests // 4, concurrency))
            ours.append(measure_ours(url, requests, concurrency, cpu=ours_cpu))
        ours_batched = measure_ours(url, requests, concurrency, per_run=10)
        fair_requests = requests // 2
        with (
            fast_sink_process(delay=SLOW_ANSWER) as slow_url,
            tempfile.TemporaryDirectory() as data_dir,
        ):
            fair = functools.partial(
                measure_fast_host_beside_slow,
                url,
                requests=fair_requests,
                concurrency=concurrency,
                data_dir=data_dir,
            )
            alone: list[float] = []
            beside: list[float] = []
            for _ in range(max(2, rounds)):
                alone.append(fair(None))
                beside.append(fair(slow_url))
    # The best of each: a busy machine only ever slows a round down.
    fast_alone, fast_beside = max(alone), max(beside)
    ours_median, aiohttp_median = median(ours), median(raw_aiohttp)
    return Report(
        "http",
        results={
            "ours (1 send per run)": {
                "requests": requests,
                "deliveries_per_s": ours_median,
                "cpu_us_per_delivery": median(ours_cpu) * 1e6,
            },
            "ours (10 sends per run)": {"requests": requests, "deliveries_per_s": ours_batched},
            "raw_aiohttp": {
                "requests": requests,
                "deliveries_per_s": aiohttp_median,
                "cpu_us_per_delivery": median(raw_aiohttp_cpu) * 1e6,
            },
            "raw_httpx_on_trio": {"requests": requests // 4, "deliveries_per_s": median(raw_httpx)},
            "sink_capacity": {"requests_per_s": capacity},
            "fast_host_alone": {"requests": fair_requests, "deliveries_per_s": fast_alone},
            "fast_host_beside_slow": {"requests": fair_requests, "deliveries_per_s": fast_beside},
        },
        ratios={
            "vs_raw_aiohttp": ours_median / aiohttp_median,
            "vs_raw_aiohttp_10_per_run": ours_batched / aiohttp_median,
            "cpu_vs_raw_aiohttp": median(raw_aiohttp_cpu) / median(ours_cpu),
            "vs_raw_httpx": ours_median / median(raw_httpx),
            "fast_host_beside_slow_vs_alone": fast_beside / fast_alone,
            "sink_capacity_vs_raw_aiohttp": capacity / aiohttp_median,
        },
        targets={
            "vs_raw_aiohttp": ">= 0.5",
            "fast_host_beside_slow_vs_alone": ">= 0.8",
        },
        notes=[
            f"concurrency {concurrency}, keep-alive; the sink is a minimal asyncio protocol "
            "in its own process on 127.0.0.1 (sink_capacity: its answers/s to a cheap "
            "pipelining client, 16 connections x 16 requests)",
            f"fairness: {SLOW_SENDS} runs among the first fast ones send to a sink answering "
            f"after {SLOW_ANSWER:g} s; timed until every fast send is delivered (slow ones "
            f"still outstanding); best of {len(alone)} interleaved rounds each: alone "
            f"{[round(r) for r in alone]}, beside it {[round(r) for r in beside]} deliveries/s",
            "cpu_vs_raw_aiohttp: raw aiohttp's CPU time per request over ours per delivery "
            "(this process, every thread: runs, records and the request)",
            f"median of {rounds} interleaved rounds: ours {[round(r) for r in ours]}, "
            f"raw aiohttp {[round(r) for r in raw_aiohttp]}, "
            f"raw httpx {[round(r) for r in raw_httpx]} deliveries/s",
        ],
    )
