"""`http`: deliveries per second to a local HTTP sink, ours vs raw httpx on trio.

Both use the same concurrency (the runtime's default, 16) against the same sink,
which runs in its own process. Ours is timed from the first run submitted to
the last delivery recorded; the baseline from the first request to the last
response.
"""

from __future__ import annotations

import json
from statistics import median
from typing import Any

import httpx
import trio

from outbound import Config, Runtime
from outbound.benchmarks.common import Stopwatch, rate, sink_process
from outbound.benchmarks.report import Report

PAYLOAD = {"id": 1, "name": "Luke Skywalker", "tags": ["jedi", "pilot"], "score": 9.5}


def measure_ours(
    url: str, requests: int, concurrency: int, per_run: int = 1, **settings: Any
) -> float:
    """Deliveries per second; `settings`: more `Config` fields (`durable` sets the journal)."""
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
    return rate(runs * per_run, watch.seconds)


def measure_raw_httpx(url: str, requests: int, concurrency: int) -> float:
    """One `AsyncClient` (a pool of `concurrency` connections), as httpx's docs show."""
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


def measure_raw_httpx_per_worker(url: str, requests: int, concurrency: int) -> float:
    """`concurrency` workers, each with a client of its own: how ours sends, without the runtime.

    The stricter baseline: httpcore's shared pool rescans its connections for
    every request, which costs a shared client of 16 about half its CPU here.
    """
    body = json.dumps(PAYLOAD).encode()
    headers = {"Content-Type": "application/json"}

    async def main() -> float:
        send_channel, receive_channel = trio.open_memory_channel[None](requests)
        for _ in range(requests):
            send_channel.send_nowait(None)
        send_channel.close()

        async def worker(client: httpx.AsyncClient) -> None:
            async for _ in receive_channel:
                response = await client.post(url, content=body, headers=headers)
                response.raise_for_status()

        clients = [httpx.AsyncClient() for _ in range(concurrency)]
        try:
            for client in clients:
                await client.post(url, content=body, headers=headers)
            with Stopwatch() as watch:
                async with trio.open_nursery() as nursery:
                    for client in clients:
                        nursery.start_soon(worker, client)
        finally:
            for client in clients:
                await client.aclose()
        return rate(requests, watch.seconds)

    return trio.run(main)


def run(
    quick: bool = False, requests: int | None = None, concurrency: int = 16, rounds: int = 3
) -> Report:
    requests = requests or (2_000 if quick else 20_000)
    raw: list[float] = []
    raw_per_worker: list[float] = []
    ours: list[float] = []
    with sink_process() as url:
        # Interleaved rounds, the median of each: this machine's noise (and its
        # occasional fast or slow minute) hits both alike.
        for _ in range(rounds):
            raw.append(measure_raw_httpx(url, requests, concurrency))
            raw_per_worker.append(measure_raw_httpx_per_worker(url, requests, concurrency))
            ours.append(measure_ours(url, requests, concurrency))
        ours_batched = measure_ours(url, requests, concurrency, per_run=10)
    per_worker = median(raw_per_worker)
    return Report(
        "http",
        results={
            "ours (1 send per run)": {"requests": requests, "deliveries_per_s": median(ours)},
            "ours (10 sends per run)": {"requests": requests, "deliveries_per_s": ours_batched},
            "raw_httpx_on_trio": {"requests": requests, "deliveries_per_s": median(raw)},
            "raw_httpx_client_per_worker": {"requests": requests, "deliveries_per_s": per_worker},
        },
        ratios={
            "vs_raw_httpx": median(ours) / median(raw),
            "vs_raw_httpx_10_per_run": ours_batched / median(raw),
            "vs_raw_httpx_client_per_worker": median(ours) / per_worker,
        },
        targets={"vs_raw_httpx": ">= 0.85"},
        notes=[
            f"concurrency {concurrency}, sink in a separate process on 127.0.0.1",
            "raw_httpx_on_trio: one AsyncClient with a pool of 16; client_per_worker: 16 "
            "workers with a client each, as ours sends (the stricter baseline)",
            f"median of {rounds} interleaved rounds: ours {[round(r) for r in ours]}, "
            f"raw {[round(r) for r in raw]}, per worker {[round(r) for r in raw_per_worker]} "
            "deliveries/s",
        ],
    )
