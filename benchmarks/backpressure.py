"""`backpressure`: peak RSS growth while submitting as fast as possible toward a slow endpoint.

For `SECONDS` s one thread calls `rt.submit(...)` in a loop (futures not kept),
each run making one HTTP send to a sink that answers after 0.3 s: deliveries
go at about `concurrency / 0.3` per second, far below the submit rate, so
everything the runtime accepts piles up somewhere. Ours (the default
`OUTBOUND_MAX_PENDING`) makes the submitter wait once that many runs and sends
are in flight; the baseline is the same runtime with the bound effectively off
(main's behaviour before it existed). Each is measured in a new interpreter
(one's memory does not count in the other's), which exits without draining.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from outbound.benchmarks.common import rss_bytes, sink_process
from outbound.benchmarks.report import Report

SECONDS = 15.0
DELAY = 0.3  # seconds the sink takes to answer each request
UNBOUNDED = 10**12  # max_pending "off"
RSS_CAP_MIB = 1536  # the baseline stops submitting past this growth: the machine is shared
PAYLOAD = {"id": 1, "name": "Luke Skywalker", "tags": ["jedi", "pilot"], "score": 9.5}
MiB = 1024 * 1024


def measure(url: str, seconds: float, max_pending: int, rss_cap_mib: float) -> dict[str, Any]:
    """In this process: submit for `seconds` s; return submits, deliveries and peak RSS growth."""
    from outbound import Config, Runtime

    data_dir = tempfile.mkdtemp(prefix="outbound-backpressure-")
    rt = Runtime(Config(max_pending=max_pending, data_dir=data_dir, gc_tuning=True))
    rt.register("p_slow", lambda event, ctx: ctx.send.http(url, data=PAYLOAD))
    rt.start()
    rt.run("p_slow", 0)  # warm up imports, the pool and a connection
    assert rt.flush(60), "the warm-up send was not delivered"
    gc.collect()
    base = rss_bytes()
    peak = base
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampling.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    submit = rt.submit
    submitted, capped = 0, False
    started = time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline:
        for n in range(submitted, submitted + 100):
            submit("p_slow", n)
        submitted += 100
        if (peak - base) / MiB > rss_cap_mib:
            capped = True
            break
    elapsed = time.monotonic() - started
    sampling.set()
    sampler.join()
    peak = max(peak, rss_bytes())
    delivered = rt.stats()["destinations"]["http"]["delivered"] - 1  # not the warm-up
    return {
        "deliveries_per_s": delivered / elapsed,
        "runs_submitted": submitted,
        "submits_per_s": submitted / elapsed,
        "peak_rss_growth_mib": round((peak - base) / MiB, 1),
        "seconds": round(elapsed, 1),
        "capped": capped,
    }


def measure_apart(url: str, seconds: float, max_pending: int) -> dict[str, Any]:
    """`measure` in a new interpreter, which exits at once after (no drain of what is left)."""
    arguments = json.dumps([url, seconds, max_pending, RSS_CAP_MIB])
    output = subprocess.run(
        [sys.executable, "-m", "outbound.benchmarks.backpressure", "--child", arguments],
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def run(quick: bool = False, seconds: float = SECONDS) -> Report:
    from outbound import Config

    limit = Config().max_pending
    rounds = 1 if quick else 3
    ours: list[dict[str, Any]] = []
    unbounded: list[dict[str, Any]] = []
    with sink_process(delay=DELAY) as url:
        for _ in range(rounds):
            ours.append(measure_apart(url, seconds, limit))
            unbounded.append(measure_apart(url, seconds, UNBOUNDED))
    # The worst round of ours (the target holds for it), the median round of the baseline.
    ours_worst = max(ours, key=lambda result: result["peak_rss_growth_mib"])
    baseline = sorted(unbounded, key=lambda result: result["peak_rss_growth_mib"])[rounds // 2]
    notes = [
        f"one thread submits for {seconds:g} s, one HTTP send per run, to a sink that answers "
        f"in {DELAY:g} s (a child process on 127.0.0.1); HTTP concurrency 16",
        "each setup in a new interpreter; peak RSS sampled every 20 ms, minus RSS after warm-up",
        f"ours: worst of {rounds} round(s); unbounded: median of {rounds}; peak RSS growth "
        f"of every round: ours {[result['peak_rss_growth_mib'] for result in ours]}, "
        f"unbounded {[result['peak_rss_growth_mib'] for result in unbounded]} MiB",
    ]
    if baseline["capped"]:
        notes.append(
            f"the unbounded baseline stopped submitting after {baseline['seconds']} s, past "
            f"{RSS_CAP_MIB} MiB of growth (so its figure is a floor)"
        )
    growth = ours_worst["peak_rss_growth_mib"]
    return Report(
        "backpressure",
        results={
            f"ours (OUTBOUND_MAX_PENDING={limit})": ours_worst,
            "unbounded (bound off)": baseline,
        },
        ratios={
            "peak_rss_growth_mib": growth,
            "vs_unbounded": growth / max(baseline["peak_rss_growth_mib"], 0.1),
        },
        targets={"peak_rss_growth_mib": "<= 100"},
        notes=notes,
    )


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backpressure")
    parser.add_argument("--child", metavar="JSON", required=True, help="[url, s, limit, cap]")
    url, seconds, max_pending, cap = json.loads(parser.parse_args(argv).child)
    result = measure(url, seconds, max_pending, cap)
    print(json.dumps(result), flush=True)
    # What is still pending is not the benchmark's business: leave without draining it.
    os._exit(0)


if __name__ == "__main__":
    _child(sys.argv[1:])
