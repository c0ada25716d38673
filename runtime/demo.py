"""`outbound demo`: a stream of sample events through every destination, against real services.

Owns the demo: it starts the embedded services (Postgres via pgserver, an
S3-protocol server, an SMTP server, an HTTP sink) and the API server, runs a
paced stream of orders through a workflow that uses every destination, shows
live progress (drawn by `outbound.demo_view`), and ends with a summary per
destination read back from the services themselves: requests the sink
received, objects in the bucket and the lines in them, rows in the table,
emails received, SSE events a real client read; every number explained (emit
listener runs, the sink's deliberate 503s, batches) and one real run linked by
its id. Exits 1 if anything was not delivered.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from outbound.api import ApiServer
from outbound.config import Config
from outbound.demo_view import NodeRow, ProgressView, Snapshot, write_chart
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
        self.refused = 0  # 503s answered: the summary explains the retries with them

    def __call__(self, request: ReceivedRequest) -> SinkResponse:
        key = request.headers.get("idempotency-key", "")
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
            flaky = first and self._random.random() < FLAKY_SHARE
            self.refused += flaky
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
            print_addresses({"SSE stream": sse_url, "Inspector": f"{api.url}/inspector"})
            sse_client = SseCounter(sse_url).start()
            time.sleep(0.2)  # let the client subscribe before the first event
            with ProgressView() as view:
                sample = SampleRun(api.url)
                submitted = stream_events(
                    rt, events, arguments.duration, view, started, sample, sse_client
                )
                settle(rt, view, submitted, events, started, sse_client)
                rt.flush(timeout=60)
                time.sleep(0.3)  # the SSE client reads the last events
                view.show(snapshot(rt.stats(), submitted, events, started, sse_client), True)
            sse_client.stop()
            summary = Summary.read(
                rt.stats(), rt.sql_query, rt.emits(WORKFLOW), sink, s3, smtp, sse_client, submitted
            )
            links = Links(api.url, sse_url, sample.read(), arguments.keep_running)
            code = summary.print(time.monotonic() - started, links)
            if arguments.chart:
                print(write_chart(arguments.chart, view.timeline))
            if arguments.keep_running:
                keep_running(sse_url)
    return code


def print_addresses(addresses: dict[str, str]) -> None:
    """The URLs to open while the demo runs, one a line (each fits 80 columns)."""
    print("Open while the demo runs (with --keep-running, also after it):")
    for name, url in addresses.items():
        print(f"  {name:<11} {url}")


def expected_sends(events: int | None) -> dict[str, int]:
    """The sends each destination ends with for `events` sample orders (none known
    with --duration): one per order, and an email and an emit per big order."""
    if events is None:
        return {}
    big = sum(1 for number in range(events) if sample_order(number)["amount"] > BIG_ORDER)
    every = dict.fromkeys(("http", "s3", "sql", "sse"), events)
    return every | {"email": big, "emit": big}


def snapshot(
    stats: dict[str, Any],
    posted: int,
    planned: int | None,
    started: float,
    sse_client: SseCounter,
    nodes: list[NodeRow] | None = None,
) -> Snapshot:
    return Snapshot(
        seconds=time.monotonic() - started,
        posted=posted,
        planned=planned,
        stats=stats,
        expected=expected_sends(planned),
        nodes=nodes or [],
        sse_read=sse_client.received,
        sse_nodes=len(sse_client.by_node),
    )


@dataclass
class SampleRun:
    """One run the summary shows by its id: the first order big enough to emit an alert
    (so its page shows an emit and its listener run too), read back by `GET /runs/{id}`."""

    api_url: str
    run_id: str = ""
    order: dict[str, Any] = field(default_factory=dict)

    def offer(self, run_id: str, order: dict[str, Any], api_url: str | None = None) -> None:
        """Keep this run if none is kept yet and its order is big (or none will be)."""
        if self.run_id and (self.order["amount"] > BIG_ORDER or order["amount"] <= BIG_ORDER):
            return
        self.run_id, self.order = run_id, order
        self.api_url = api_url or self.api_url

    def read(self, settle: float = 5.0) -> SampleRunView | None:
        """The run as `GET /runs/{id}` shows it, asked again (for at most `settle` s) while
        a delivery is not final: in a cluster another node's record lags by about a second."""
        if not self.run_id:
            return None
        deadline = time.monotonic() + settle
        while True:
            try:
                response = httpx.get(f"{self.api_url}/runs/{self.run_id}", timeout=10)
            except httpx.HTTPError as error:
                state = f"GET failed: {error}"
                return SampleRunView(self.api_url, self.run_id, self.order, state)
            if response.status_code == 200:
                found = response.json()
                deliveries = found.get("deliveries", [])
                final = all(record["status"] in ("delivered", "failed") for record in deliveries)
                if final or time.monotonic() >= deadline:
                    break
            elif time.monotonic() >= deadline:
                state = f"GET /runs/{{id}} answered {response.status_code}"
                return SampleRunView(self.api_url, self.run_id, self.order, state)
            time.sleep(0.2)
        destinations = ", ".join(sorted({record["destination"] for record in deliveries}))
        state = (
            f"{found.get('status')}, {found.get('delivered', 0)} of {len(deliveries)} "
            f"sends delivered ({destinations})"
        )
        return SampleRunView(self.api_url, self.run_id, self.order, state)


@dataclass
class SampleRunView:
    api_url: str
    run_id: str
    order: dict[str, Any]
    state: str  # what GET /runs/{id} said


@dataclass
class Links:
    """What the summary points at: the API, the SSE stream and one run."""

    api_url: str
    sse_url: str
    sample: SampleRunView | None
    alive: bool  # they serve after the summary (`outbound demo --keep-running`)


def stream_events(
    rt: Runtime,
    events: int | None,
    duration: float | None,
    view: ProgressView,
    started: float,
    sample: SampleRun,
    sse_client: SseCounter,
) -> int:
    def send(number: int) -> None:
        order = sample_order(number)
        sample.offer(rt.submit(WORKFLOW, order).run_id, order)

    return pace(
        send,
        lambda submitted: view.show(snapshot(rt.stats(), submitted, events, started, sse_client)),
        events,
        duration,
    )


def settle(
    rt: Runtime,
    view: ProgressView,
    submitted: int,
    planned: int | None,
    started: float,
    sse_client: SseCounter,
    timeout: float = 60.0,
) -> None:
    """Until every run ended and every send is final (or `timeout`), redrawing the view
    (`rt.flush` alone would wait with the view standing still)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = rt.stats()
        destinations = stats["destinations"]
        pending = sum(counters.get("pending", 0) for counters in destinations.values())
        listener_runs = destinations.get("emit", {}).get("accepted", 0)
        if not pending and sum(stats["runs"].values()) >= submitted + listener_runs:
            return
        view.show(snapshot(stats, submitted, planned, started, sse_client))
        time.sleep(0.25)


def pace(
    send: Callable[[int], None],
    progress: Callable[[int], None],
    events: int | None,
    duration: float | None,
) -> int:
    """`send(0)`, `send(1)`, ... at DEFAULT_RATE (a stream, not a burst) until `events` were
    sent or `duration` seconds passed, `progress(sent)` every quarter second; returns how many."""
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
            next_progress = now + 0.25
        delay = started + sent * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return sent


def keep_running(sse_url: str) -> None:
    print("Keeping everything up until you press Ctrl+C; the SSE stream:")
    print(f"  {sse_url}")
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(1)


@dataclass
class SummaryRow:
    """One destination: sends the runtime accepted, what its service holds, and how."""

    destination: str
    accepted: int
    found: int
    detail: str


@dataclass
class Summary:
    """What each service says it received, next to what the runtime accepted, and the
    facts that explain why the counts differ from the number of events."""

    rows: list[SummaryRow]
    runs: dict[str, int]
    problems: list[str]
    posted: int = 0
    listener_runs: int = 0
    emitted: int = 0
    http_requests: int = 0
    http_retries: int = 0
    deliberate_503s: int = 0
    s3_objects: int = 0
    sql_batches: int = 0

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
        destinations = stats["destinations"]
        accepted = {name: c.get("accepted", 0) for name, c in destinations.items()}
        rows: list[SummaryRow] = []

        distinct = {request.headers.get("idempotency-key") for request in sink.requests}
        rows.append(
            SummaryRow("http", accepted.get("http", 0), len(distinct),
                       f"{len(sink.requests)} requests for {len(distinct)} distinct sends")
        )  # fmt: skip

        keys, lines = read_bucket(s3)
        rows.append(
            SummaryRow("s3", accepted.get("s3", 0), lines,
                       f"{lines} NDJSON lines in {plural(len(keys), 'gzip object')}")
        )  # fmt: skip

        count = int(sql_query("SELECT count(*) AS n FROM orders")["rows"][0][0])
        rows.append(SummaryRow("sql", accepted.get("sql", 0), count, f"{count} rows in orders"))
        rows.append(
            SummaryRow("sse", accepted.get("sse", 0), sse_client.received,
                       f"{sse_client.received} events read by an SSE client")
        )  # fmt: skip
        rows.append(
            SummaryRow("email", accepted.get("email", 0), len(smtp.messages),
                       f"{len(smtp.messages)} emails at the SMTP server")
        )  # fmt: skip
        started_runs = sum(len(record["listener_runs"]) for record in emitted)
        rows.append(
            SummaryRow("emit", accepted.get("emit", 0), started_runs,
                       f"{len(emitted)} alerts, {started_runs} listener runs")
        )  # fmt: skip

        problems = [
            f"{row.destination}: {row.accepted} sent but {row.found} found in the service"
            for row in rows
            if row.found < row.accepted
        ]
        for name, counters in destinations.items():
            if counters.get("failed") or counters.get("pending"):
                problems.append(
                    f"{name}: {counters.get('failed', 0)} failed, "
                    f"{counters.get('pending', 0)} pending"
                )
        if sse_client.error:
            problems.append(f"sse client: {sse_client.error}")
        if sum(stats["runs"].values()) < submitted:
            problems.append(f"only {sum(stats['runs'].values())} of {submitted} runs finished")
        sse_detail = sse_client.describe()
        if sse_client.by_node:  # which nodes the events came from (all on node-1's stream)
            rows[3].detail = sse_detail[sse_detail.index("from ") :]
        refused = getattr(sink.responder, "refused", 0)
        return cls(
            rows,
            stats["runs"],
            problems,
            posted=submitted,
            listener_runs=started_runs,
            emitted=len(emitted),
            http_requests=len(sink.requests),
            http_retries=destinations.get("http", {}).get("retries", 0),
            deliberate_503s=refused,
            s3_objects=len(keys),
            sql_batches=destinations.get("sql", {}).get("batches_written", 0),
        )

    def lines(self, seconds: float, links: Links | None = None) -> list[str]:
        """The summary, every line within 80 columns, every number named and explained;
        short enough to stay on a 24-line screen with its verdict."""
        runs = sum(self.runs.values())
        statuses = ", ".join(
            f"{count} {status}" for status, count in sorted(self.runs.items()) if count
        )
        out = [f"Summary after {seconds:.1f} s"]
        out += wrap(
            f"Runs: {runs} for {self.posted} events: {self.posted} posted + "
            f"{self.listener_runs} emit listener runs (each order over {BIG_ORDER:.0f} EUR "
            f"emits an alert, which p_alerts turns into an email). {statuses or 'none'}."
        )
        header = f"  {'destination':<11} {'sent':>5} {'found':>5}"
        out.append(f"{header}  in the service (sent: sends accepted)")
        for row in self.rows:
            detail = row.detail if len(row.detail) <= 52 else row.detail[:51] + "…"
            out.append(f"  {row.destination:<11} {row.accepted:>5} {row.found:>5}  {detail}")
        http = next((row for row in self.rows if row.destination == "http"), None)
        if http is not None:
            out += wrap(
                f"- http: {self.http_requests} requests for {http.accepted} sends: "
                f"{self.http_retries} retries, because the demo's HTTP sink answers 503 to "
                f"~{FLAKY_SHARE:.0%} of first attempts on purpose ({self.deliberate_503s} "
                "times this run).",
                indent="  ",
            )
        out += wrap(
            f"- s3 and sql write batches: {self.posted} orders in "
            f"{plural(self.s3_objects, 'S3 object')} and {plural(self.sql_batches, 'SQL load')} "
            "(a batch is written when it is 2 s old or full).",
            indent="  ",
        )
        out += wrap(
            f"- email, emit: {self.emitted} of {self.posted} orders are over "
            f"{BIG_ORDER:.0f} EUR (an alert, a listener run, an email each).",
            indent="  ",
        )
        if links is not None:
            out += links_lines(links)
        return out

    def print(self, seconds: float, links: Links | None = None) -> int:
        print("\n" + "\n".join(self.lines(seconds, links)), flush=True)
        if self.problems:
            print("NOT EVERYTHING WAS DELIVERED:")
            for problem in self.problems:
                print(f"  - {problem}")
            return 1
        print("Everything was delivered.")
        return 0


def links_lines(links: Links) -> list[str]:
    out: list[str] = []
    sample = links.sample
    if sample is not None:
        order = sample.order
        out += wrap(
            f"One run: order #{order['id']} ({order['amount']:.2f} EUR), {sample.state}. "
            "Read it as JSON, or open the inspector at it:"
        )
        out.append(f"  GET {sample.api_url}/runs/{sample.run_id}")
        out.append(f"  {sample.api_url}/inspector#run={sample.run_id}")
    if links.alive:
        note = "it stays up, with the inspector, until Ctrl+C"
    else:
        note = "it served only while the demo ran: `outbound demo --keep-running` keeps it up"
    out += wrap(f"SSE stream: {links.sse_url} ({note})")
    return out


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def wrap(text: str, indent: str = "") -> list[str]:
    """`text` as lines within 80 columns; continuation lines indented two more spaces."""
    return textwrap.wrap(text, width=79, initial_indent=indent, subsequent_indent=indent + "  ")


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
