"""`outbound demo`: a stream of sample events through every destination, against real services.

Owns the demo: it starts the embedded services (Postgres via pgserver, an
S3-protocol server, an SMTP server, an HTTP sink) and the API server, runs a
paced stream of orders through a workflow that uses every destination, shows
live progress, and ends with a summary per destination read back from the
services themselves: requests the sink received, objects in the bucket and
the lines in them, rows in the table, emails received, SSE events a real
client read. Exits 1 if anything was not delivered.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from outbound.api import ApiServer
from outbound.config import Config
from outbound.embedded import (
    EmbeddedPostgres,
    HttpSink,
    ReceivedRequest,
    S3Server,
    SinkResponse,
    SmtpServer,
)
from outbound.gc_tuning import tune_for_command
from outbound.runtime import Runtime
from outbound.serve import JOURNAL_DEFAULT

DEFAULT_EVENTS = 400
DEFAULT_RATE = 50.0  # events per second: a stream, not a burst
BUCKET = "outbound-demo"
FLAKY_SHARE = 0.1  # the sink answers this share of first attempts with 503
BIG_ORDER = 240.0  # orders above this emit an alert, which sends an email
WORKFLOW = "p_orders"


class FlakySink:
    """Answers 503 to some first attempts, so the demo shows retries succeeding."""

    def __init__(self, seed: int = 7) -> None:
        self._random = random.Random(seed)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, request: ReceivedRequest) -> SinkResponse:
        key = request.headers.get("idempotency-key", "")
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
            flaky = first and self._random.random() < FLAKY_SHARE
        if flaky:
            return SinkResponse(503, headers={"Retry-After": "0"})
        return SinkResponse(200, body=b'{"ok":true}', headers={"content-type": "application/json"})


def sample_order(number: int) -> dict[str, Any]:
    return {
        "id": number,
        "customer": f"customer-{number % 37}",
        "amount": round(5 + (number * 7.31) % 250, 2),
        "currency": "EUR",
        "items": [f"sku-{(number * 3 + k) % 100}" for k in range(1 + number % 3)],
        "placed_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "express": number % 4 == 0,
    }


def build_runtime(config: Config, sink_url: str, node_id: str = "") -> Runtime:
    """The demo's workflows; with `node_id` (a node of `outbound demo --nodes`), its SSE
    events name the node that ran them, so the SSE client can tell."""
    rt = Runtime(config)
    node = {"node": node_id} if node_id else {}

    @rt.workflow(WORKFLOW)
    def orders(event: dict[str, Any], ctx: Any) -> str:
        ctx.send.http(url=f"{sink_url}/orders", data=event, headers={"X-Demo": "outbound"})
        ctx.send.s3(bucket=BUCKET, prefix="orders/", payload=event)
        ctx.send.sql(table="orders", payload=event)
        ctx.send.sse(
            channel="orders", payload={"id": event["id"], "amount": event["amount"], **node}
        )
        if event["amount"] > BIG_ORDER:
            ctx.send.emit(raw_event={"order": event["id"], "amount": event["amount"]})
        return "accepted"

    @rt.workflow("p_alerts", listens_to=[WORKFLOW])
    def alerts(event: dict[str, Any], ctx: Any) -> None:
        ctx.send.email(
            subject=f"Big order #{event['order']}: {event['amount']:.2f} EUR",
            text=f"Order {event['order']} is worth {event['amount']:.2f} EUR.",
            html=f"<p>Order <b>{event['order']}</b> is worth {event['amount']:.2f} EUR.</p>",
        )

    return rt


@dataclass
class SseCounter:
    """A real SSE client on the demo's stream, counting the events it reads (and, when their
    data names one, the node that sent each)."""

    url: str
    received: int = 0
    by_node: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> SseCounter:
        self._thread = threading.Thread(target=self._read, name="demo-sse-client", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(5.0, read=None)) as client,
                client.stream("GET", self.url) as response,
            ):
                for line in response.iter_lines():
                    if line.startswith("event: orders"):
                        self.received += 1
                    elif line.startswith("data: {"):
                        node = json.loads(line.removeprefix("data: ")).get("node")
                        if node:
                            self.by_node[node] += 1
                    if self._stop.is_set():
                        return
        except httpx.HTTPError as error:
            if not self._stop.is_set():
                self.error = f"{type(error).__name__}: {error}"

    def stop(self) -> None:
        self._stop.set()

    def describe(self) -> str:
        text = f"{self.received} events read by a live SSE client"
        if self.by_node:
            nodes = ", ".join(f"{node} {count}" for node, count in sorted(self.by_node.items()))
            plural = "s" if len(self.by_node) > 1 else ""
            text += f", from {len(self.by_node)} node{plural} ({nodes})"
        return text


@contextlib.contextmanager
def demo_data_dir() -> Iterator[str]:
    """OUTBOUND_DATA_DIR if set; else a temporary one (its journal and dead letters are
    about services that end with the demo, so the next demo must not deliver them again)."""
    configured = os.environ.get("OUTBOUND_DATA_DIR")
    if configured:
        yield configured
        return
    with tempfile.TemporaryDirectory(prefix="outbound-demo-") as data_dir:
        yield data_dir


def service_settings(s3: S3Server, postgres: EmbeddedPostgres, smtp: SmtpServer) -> dict[str, Any]:
    """The `Config` fields that point a runtime at the embedded services, with the demo's
    short batch age and retries (`outbound demo --nodes` passes them to each node)."""
    return {
        **s3.config(),
        **smtp.config(),
        "database_url": postgres.url,
        "s3_create_buckets": True,
        "batch_max_age": 2.0,
        "retry_base": 0.05,
        "retry_cap": 1.0,
    }


@contextlib.contextmanager
def embedded_services() -> Iterator[tuple[HttpSink, S3Server, EmbeddedPostgres, SmtpServer]]:
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(HttpSink(FlakySink(), record=True))
        s3 = stack.enter_context(S3Server())
        postgres = stack.enter_context(EmbeddedPostgres())
        smtp = stack.enter_context(SmtpServer())
        yield sink, s3, postgres, smtp


def run_demo(arguments: argparse.Namespace) -> int:
    events = arguments.events
    if events is None and arguments.duration is None:
        events = DEFAULT_EVENTS
    print("Starting embedded services: HTTP sink, S3 (moto), Postgres (pgserver), SMTP ...")
    started = time.monotonic()
    with embedded_services() as (sink, s3, postgres, smtp), demo_data_dir() as data_dir:
        config = Config.from_env(
            journal=os.environ.get("OUTBOUND_JOURNAL") or JOURNAL_DEFAULT,
            data_dir=data_dir,
            **service_settings(s3, postgres, smtp),
        )
        rt = build_runtime(config, f"{sink.url}")
        tune_for_command()  # this command owns its process (see outbound.gc_tuning)
        with rt, ApiServer(rt) as api:
            sse_url = f"{api.url}/pipelines/{WORKFLOW}/sse"
            print(f"Services up in {time.monotonic() - started:.1f} s.")
            print(f"  SSE stream (open it in a browser while the demo runs): {sse_url}")
            print(f"  Run inspector: {api.url}/runs/<run_id>   Metrics: {api.url}/metrics")
            sse_client = SseCounter(sse_url).start()
            time.sleep(0.2)  # let the client subscribe before the first event
            submitted = stream_events(rt, events, arguments.duration)
            rt.flush(timeout=60)
            time.sleep(0.3)  # the SSE client reads the last events
            show_progress(rt.stats(), submitted, started, final=True)
            if arguments.keep_running:
                keep_running(sse_url)
            sse_client.stop()
            summary = Summary.read(
                rt.stats(), rt.sql_query, rt.emits(WORKFLOW), sink, s3, smtp, sse_client, submitted
            )
    return summary.print(time.monotonic() - started)


def stream_events(rt: Runtime, events: int | None, duration: float | None) -> int:
    started = time.monotonic()
    return pace(
        lambda number: rt.submit(WORKFLOW, sample_order(number)),
        lambda submitted: show_progress(rt.stats(), submitted, started),
        events,
        duration,
    )


def pace(
    send: Callable[[int], None],
    progress: Callable[[int], None],
    events: int | None,
    duration: float | None,
) -> int:
    """`send(0)`, `send(1)`, ... at DEFAULT_RATE (a stream, not a burst) until `events` were
    sent or `duration` seconds passed, `progress(sent)` every half second; returns how many."""
    started = time.monotonic()
    interval = 1.0 / DEFAULT_RATE
    sent = 0
    next_progress = started
    while (events is None or sent < events) and (
        duration is None or time.monotonic() - started < duration
    ):
        send(sent)
        sent += 1
        now = time.monotonic()
        if now >= next_progress:
            progress(sent)
            next_progress = now + 0.5
        delay = started + sent * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return sent


_drawn_lines = 0


def show_progress(
    stats: dict[str, Any],
    submitted: int,
    started: float,
    final: bool = False,
    more: list[str] | None = None,
) -> None:
    """`stats` (the shape of `rt.stats()`) as a table, then the `more` lines."""
    runs = stats["runs"]
    lines = [
        f"[{time.monotonic() - started:5.1f}s] events {submitted}  runs: "
        + ", ".join(f"{status} {count}" for status, count in sorted(runs.items()))
    ]
    for name, counters in sorted(stats["destinations"].items()):
        lines.append(
            f"    {name:<6} sent {counters.get('accepted', 0):>5}  delivered "
            f"{counters.get('delivered', 0):>5}  pending {counters.get('pending', 0):>5}  "
            f"retries {counters.get('retries', 0):>4}  failed {counters.get('failed', 0):>3}"
        )
    draw(lines + (more or []), submitted, final)


def draw(lines: list[str], submitted: int, final: bool) -> None:
    """A live table on a terminal; plain lines when the output is not one."""
    global _drawn_lines
    if sys.stdout.isatty():
        if _drawn_lines:
            sys.stdout.write(f"\x1b[{_drawn_lines}F\x1b[J")
        sys.stdout.write("\n".join(lines) + "\n")
        _drawn_lines = 0 if final else len(lines)
    elif final or submitted % 100 < 25:
        sys.stdout.write(" | ".join(line.strip() for line in lines) + "\n")
    sys.stdout.flush()


def keep_running(sse_url: str) -> None:
    print(f"Keeping everything up; the SSE stream is {sse_url}. Press Ctrl+C to stop.")
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(1)


@dataclass
class Summary:
    """What each service says it received, next to what the runtime accepted."""

    rows: list[tuple[str, int, int, str]]  # destination, accepted, found in the service, detail
    runs: dict[str, int]
    problems: list[str]

    @classmethod
    def read(
        cls,
        stats: dict[str, Any],
        sql_query: Callable[[str], dict[str, Any]],
        emitted: list[dict[str, Any]],
        sink: HttpSink,
        s3: S3Server,
        smtp: SmtpServer,
        sse_client: SseCounter,
        submitted: int,
    ) -> Summary:
        """`stats` in the shape of `rt.stats()`, `sql_query` like `rt.sql_query`, `emitted`
        like `rt.emits(WORKFLOW)`: one runtime's, or a cluster's added up."""
        accepted = {name: c.get("accepted", 0) for name, c in stats["destinations"].items()}
        rows: list[tuple[str, int, int, str]] = []

        distinct = {request.headers.get("idempotency-key") for request in sink.requests}
        rows.append(
            ("http", accepted.get("http", 0), len(distinct),
             f"{len(sink.requests)} requests received for {len(distinct)} distinct sends")
        )  # fmt: skip

        keys, lines = read_bucket(s3)
        sample = f", e.g. {keys[0]}" if keys else ""
        rows.append(("s3", accepted.get("s3", 0), lines, f"{len(keys)} objects{sample}"))

        count = sql_query("SELECT count(*) AS n FROM orders")["rows"][0][0]
        columns = sql_query(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'orders' ORDER BY ordinal_position"
        )["rows"]
        typed = ", ".join(f"{name} {kind}" for name, kind in columns)
        rows.append(("sql", accepted.get("sql", 0), int(count), f"table orders ({typed})"))

        rows.append(
            ("email", accepted.get("email", 0), len(smtp.messages),
             f"{len(smtp.messages)} emails received by the SMTP server")
        )  # fmt: skip
        rows.append(("sse", accepted.get("sse", 0), sse_client.received, sse_client.describe()))
        started_runs = sum(len(record["listener_runs"]) for record in emitted)
        rows.append(
            ("emit", accepted.get("emit", 0), started_runs,
             f"{len(emitted)} events emitted, {started_runs} listener runs started")
        )  # fmt: skip

        problems = [
            f"{name}: {accepted_count} sent but {found} found in the service"
            for name, accepted_count, found, _ in rows
            if found < accepted_count
        ]
        for name, counters in stats["destinations"].items():
            if counters.get("failed") or counters.get("pending"):
                problems.append(
                    f"{name}: {counters.get('failed', 0)} failed, "
                    f"{counters.get('pending', 0)} pending"
                )
        if sse_client.error:
            problems.append(f"sse client: {sse_client.error}")
        if sum(stats["runs"].values()) < submitted:
            problems.append(f"only {sum(stats['runs'].values())} of {submitted} runs finished")
        return cls(rows, stats["runs"], problems)

    def print(self, seconds: float) -> int:
        print(f"\nSummary after {seconds:.1f} s; runs: {self.runs}")
        print(f"  {'destination':<11} {'sent':>6} {'found':>6}  read back from the service")
        for name, accepted, found, detail in self.rows:
            print(f"  {name:<11} {accepted:>6} {found:>6}  {detail}")
        if self.problems:
            print("NOT EVERYTHING WAS DELIVERED:")
            for problem in self.problems:
                print(f"  - {problem}")
            return 1
        print("Everything was delivered.")
        return 0


def read_bucket(s3: S3Server) -> tuple[list[str], int]:
    """Object keys in the demo bucket, and the NDJSON lines inside them."""
    from minio import Minio

    client = Minio(
        f"{s3.host}:{s3.port}",
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        region=s3.region,
        secure=False,
    )
    keys: list[str] = []
    lines = 0
    for item in client.list_objects(BUCKET, recursive=True):
        keys.append(item.object_name)
        response = client.get_object(BUCKET, item.object_name)
        try:
            body = gzip.decompress(response.read())
        finally:
            response.close()
            response.release_conn()
        lines += sum(1 for line in body.splitlines() if json.loads(line))
    return sorted(keys), lines
