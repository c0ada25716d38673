"""`inline`: the seed's headline claim, sends that do not wait vs requests made inline.

Each workflow makes 4 HTTP requests to a sink that answers after 20 ms. Ours
uses `ctx.send.http` (delivered after the run); the baseline calls `httpx.post`
inline in the same workflow, run by the same runtime. Throughput is workflow
runs per second; every one of our requests must also be delivered.
"""

from __future__ import annotations

from typing import Any

import httpx

from outbound import Config, Runtime
from outbound.benchmarks.common import Stopwatch, rate, sink_process
from outbound.benchmarks.report import Report

REQUESTS_PER_RUN = 4


def measure(url: str, runs: int, inline: bool) -> tuple[float, float]:
    rt = Runtime(Config(gc_tuning=True))

    def with_send(event: Any, ctx: Any) -> None:
        for n in range(REQUESTS_PER_RUN):
            ctx.send.http(url, data={"event": event, "n": n})

    def with_inline_post(event: Any, ctx: Any) -> None:
        for n in range(REQUESTS_PER_RUN):
            httpx.post(url, json={"event": event, "n": n}, timeout=5).raise_for_status()

    rt.register("p", with_inline_post if inline else with_send)
    with rt:
        with Stopwatch() as runs_watch:
            futures = [rt.submit("p", n) for n in range(runs)]
            for future in futures:
                assert future.result().status == "succeeded"
        with Stopwatch() as delivery_watch:
            assert rt.flush(300)
        stats = rt.stats()["destinations"].get("http", {"delivered": 0, "failed": 0})
        if not inline:
            assert stats["delivered"] == runs * REQUESTS_PER_RUN and stats["failed"] == 0
    return rate(runs, runs_watch.seconds), runs_watch.seconds + delivery_watch.seconds


def run(quick: bool = False, runs: int | None = None) -> Report:
    runs = runs or (2_000 if quick else 20_000)
    inline_runs = max(40, runs // 50)
    with sink_process(delay=0.02) as url:
        ours, ours_total = measure(url, runs, inline=False)
        inline, _ = measure(url, inline_runs, inline=True)
    return Report(
        "inline",
        results={
            "ours (ctx.send.http)": {
                "runs": runs,
                "runs_per_s": ours,
                "all_delivered_after_s": ours_total,
            },
            "inline httpx.post": {"runs": inline_runs, "runs_per_s": inline},
        },
        ratios={"vs_inline": ours / inline},
        targets={"vs_inline": ">= 20"},
        notes=[f"{REQUESTS_PER_RUN} requests per run, sink answers after 20 ms"],
    )
