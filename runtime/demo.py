"""`outbound demo`: sample events through real destinations, with progress and a summary.

Owns the demo's workflow, its progress line and its closing summary. Every
service it talks to is a real one started on loopback by `runtime.embedded`,
and the summary is read back from those services (what the HTTP sink
received), not from our own counters. Exits non-zero if anything was not
delivered.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any

from runtime.config import Config
from runtime.embedded import HttpSink, ReceivedRequest, SinkResponse
from runtime.runtime import Runtime

DEFAULT_EVENTS = 500
FLAKY_SHARE = 0.1  # the sink answers this share of first attempts with 503


class FlakySink:
    """Answers 503 to some first attempts, so the demo shows retries succeeding."""

    def __init__(self, seed: int = 7) -> None:
        self._random = random.Random(seed)
        self._seen: set[str] = set()

    def __call__(self, request: ReceivedRequest) -> SinkResponse:
        key = request.headers.get("idempotency-key", "")
        first = key not in self._seen
        self._seen.add(key)
        if first and self._random.random() < FLAKY_SHARE:
            return SinkResponse(503, headers={"Retry-After": "0"})
        return SinkResponse(200, body=b'{"ok":true}', headers={"content-type": "application/json"})


def sample_event(number: int) -> dict[str, Any]:
    return {
        "id": number,
        "customer": f"customer-{number % 37}",
        "amount": round(5 + (number * 7.31) % 250, 2),
        "items": [f"sku-{(number * 3 + k) % 100}" for k in range(1 + number % 3)],
    }


def run_demo(arguments: argparse.Namespace) -> int:
    events = arguments.events or (None if arguments.duration else DEFAULT_EVENTS)
    with HttpSink(FlakySink()) as sink:
        config = Config.from_env(retry_base=0.05, retry_cap=1.0)
        rt = Runtime(config)

        @rt.workflow("p_orders")
        def orders(event: dict[str, Any], ctx: Any) -> str:
            ctx.send.http(url=f"{sink.url}/orders", data=event, headers={"X-Demo": "outbound"})
            if event["amount"] > 200:
                ctx.send.http(url=f"{sink.url}/big-orders", data={"id": event["id"]})
            return "ok"

        print(f"Outbound demo: HTTP sink at {sink.url}", flush=True)
        started = time.monotonic()
        with rt:
            submitted = 0
            deadline = started + arguments.duration if arguments.duration else None
            while (events is None or submitted < events) and (
                deadline is None or time.monotonic() < deadline
            ):
                rt.submit("p_orders", sample_event(submitted))
                submitted += 1
                if submitted % 50 == 0:
                    show_progress(rt, submitted, started)
            rt.flush(timeout=60)
            show_progress(rt, submitted, started, final=True)
            if arguments.keep_running:
                print("Keeping the services up; press Ctrl+C to stop.", flush=True)
                try:
                    while True:
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
            stats = rt.stats()
        return print_summary(stats, sink, submitted, time.monotonic() - started)


def show_progress(rt: Runtime, submitted: int, started: float, final: bool = False) -> None:
    stats = rt.stats()
    runs = sum(stats["runs"].values())
    parts = [f"runs {runs}/{submitted}"]
    for name, counters in sorted(stats["destinations"].items()):
        parts.append(
            f"{name}: {counters['delivered']} delivered, {counters.get('retries', 0)} retries, "
            f"{counters['failed']} failed, {counters['pending']} pending"
        )
    line = f"[{time.monotonic() - started:5.1f}s] " + " | ".join(parts)
    end = "\n" if final or not sys.stdout.isatty() else "\r"
    print(line.ljust(100), end=end, flush=True)


def print_summary(stats: dict[str, Any], sink: HttpSink, runs: int, seconds: float) -> int:
    http = stats["destinations"].get("http", {"accepted": 0, "delivered": 0, "failed": 0})
    received = {request.headers.get("idempotency-key") for request in sink.requests}
    answered_ok = len(received)
    print()
    print(f"Summary after {seconds:.1f} s: {runs} runs {stats['runs']}")
    print(
        f"  http: {http['accepted']} sends, {http['delivered']} delivered, "
        f"{http.get('retries', 0)} retries, {http['failed']} failed; "
        f"the sink received {len(sink.requests)} requests for {answered_ok} distinct sends"
    )
    undelivered = http["accepted"] - http["delivered"]
    if undelivered or answered_ok < http["accepted"]:
        print(f"NOT DELIVERED: {undelivered} sends", flush=True)
        return 1
    print("Everything was delivered.", flush=True)
    return 0
