"""`outbound demo --nodes N`: the demo as a local cluster of N runtime processes on one NATS.

Owns the cluster demo: it starts the demo's embedded services (HTTP sink, S3,
Postgres, SMTP: `outbound.demo`), one embedded nats-server (the journal every
node shares), and N `outbound serve --app outbound.demo_cluster:node_runtime`
processes (`node-1` .. `node-N`, each with its own data directory and port,
configured by `OUTBOUND_*` variables alone, as any deployment would be). It
posts the sample orders round-robin to the nodes' `POST /workflows/p_orders/events`,
keeps one SSE client on node-1's stream, shows live progress from each node's
`GET /metrics`, and ends with a per-node summary (events posted to it, runs
it ran, its deliveries per destination) and `outbound.demo`'s summary per
destination, read back from the services. Exits 1 if anything accepted was
not delivered. Every node (SIGTERM, then SIGKILL) and the nats-server are
stopped on every path, Ctrl-C and SIGTERM included. Each run has a fresh
directory (`RunDirectory`) for the NATS store and the nodes' data and logs.

It knows the nodes only through their public contract (the CLI, the HTTP API,
`OUTBOUND_*`); the workflows are `outbound.demo.build_runtime`'s. It must not
change the single-process demo's behaviour (`outbound.demo` owns that).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from outbound.config import Config
from outbound.demo import (
    DEFAULT_EVENTS,
    WORKFLOW,
    Links,
    SampleRun,
    SampleRunView,
    SseCounter,
    Summary,
    build_runtime,
    embedded_services,
    keep_running,
    pace,
    sample_order,
    service_settings,
    snapshot,
)
from outbound.demo_view import NodeRow, ProgressView, write_chart
from outbound.embedded import HttpSink, S3Server, SmtpServer
from outbound.journal.server import EmbeddedNats, ServerOptions, die_with_parent
from outbound.runtime import Runtime
from outbound.signals import SignalHandlers

#: What each node serves (`outbound serve --app NODE_APP`).
NODE_APP = "outbound.demo_cluster:node_runtime"
#: Where the parent tells the nodes its HTTP sink listens (not a setting of the runtime).
SINK_URL_VARIABLE = "DEMO_CLUSTER_SINK_URL"
CLUSTER = "demo"
SERVING = re.compile(r"outbound: serving on (http://\S+)")
NODE_START_TIMEOUT = 60.0  # seconds for a node to answer GET /healthz
NODE_STOP_TIMEOUT = 20.0  # seconds to drain after SIGTERM before SIGKILL
DELIVERY_TIMEOUT = 60.0  # seconds after the last post for every send to be final
SSE_GRACE = 10.0  # seconds the SSE client may lag behind the last delivery (waited only if it does)


def node_runtime() -> Runtime:
    """The Runtime a node serves: the demo's workflows, configured from `OUTBOUND_*`."""
    config = Config.from_env()
    return build_runtime(config, os.environ[SINK_URL_VARIABLE], node_id=config.node_id)


def config_env(values: dict[str, Any]) -> dict[str, str]:
    """`Config` field values as the `OUTBOUND_*` variables `Config.from_env()` reads."""
    names = {f.name: f.metadata["env"] for f in dataclasses.fields(Config)}
    return {
        names[name]: str(int(value) if isinstance(value, bool) else value)
        for name, value in values.items()
    }


def stats_from_metrics(text: str) -> dict[str, Any]:
    """A node's `GET /metrics` in the shape of `rt.stats()` (runs, runs_in_flight and each
    destination's accepted, delivered, failed, pending, retries)."""
    stats: dict[str, Any] = {"runs": {}, "runs_in_flight": 0, "destinations": {}}
    destinations: dict[str, dict[str, int]] = stats["destinations"]
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            value = int(sample.value)
            destination = destinations.setdefault(sample.labels.get("destination", ""), {})
            if sample.name == "outbound_runs_total":  # one sample per workflow and status
                status = sample.labels["status"]
                stats["runs"][status] = stats["runs"].get(status, 0) + value
            elif sample.name == "outbound_runs_in_flight":
                stats["runs_in_flight"] = value
            elif sample.name == "outbound_sends_total":
                destination["accepted"] = value
            elif sample.name == "outbound_deliveries_total":
                destination[sample.labels["status"]] = value
            elif sample.name == "outbound_deliveries_pending":
                destination["pending"] = value
            elif sample.name == "outbound_retries_total":
                destination["retries"] = value
            elif sample.name == "outbound_deliveries_retrying":
                destination["retrying"] = value
            elif sample.name == "outbound_batch_flushes_total":
                destination["batches_written"] = value
    destinations.pop("", None)
    return stats


def add_stats(every: list[dict[str, Any]]) -> dict[str, Any]:
    """The nodes' `stats_from_metrics` added up: the cluster's."""
    total: dict[str, Any] = {"runs": Counter(), "runs_in_flight": 0, "destinations": {}}
    for stats in every:
        total["runs"].update(stats["runs"])
        total["runs_in_flight"] += stats["runs_in_flight"]
        for name, counters in stats["destinations"].items():
            total["destinations"].setdefault(name, Counter()).update(counters)
    total["runs"] = dict(total["runs"])
    return total


class Node:
    """One `outbound serve` process on a free loopback port; its output goes to `log_path`."""

    def __init__(self, node_id: str, env: dict[str, str], log_path: Path) -> None:
        self.node_id = node_id
        self.log_path = log_path
        self.url = ""
        self.exit_code: int | None = None
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "outbound.cli", "serve", "--app", NODE_APP]
                + ["--host", "127.0.0.1", "--port", "0"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops the nodes
                preexec_fn=die_with_parent(os.getpid()),  # the demo killed -9: so are they
            )

    def log_tail(self, characters: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

    def wait_ready(self, client: httpx.Client, deadline: float) -> None:
        """Wait until the node says where it serves and its `GET /healthz` answers 200."""
        while True:
            if self.process.poll() is not None:
                raise NodeError(f"{self.node_id} exited ({self.process.returncode}) at start")
            if time.monotonic() > deadline:
                raise NodeError(f"{self.node_id} did not answer GET /healthz in time")
            if not self.url:
                found = SERVING.search(self.log_path.read_text(errors="replace"))
                self.url = found.group(1) if found else ""
            if self.url:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/healthz").status_code == 200:
                        return
            time.sleep(0.05)

    def stats(self, client: httpx.Client) -> dict[str, Any]:
        response = client.get(f"{self.url}/metrics")
        response.raise_for_status()
        return stats_from_metrics(response.text)

    def terminate(self) -> None:
        """SIGTERM: the node stops serving, drains its deliveries and exits."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    def wait(self, deadline: float) -> None:
        """Wait for the exit until `deadline`; SIGKILL a node still running then."""
        try:
            self.exit_code = self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.exit_code = None  # killed: it did not drain


class NodeError(RuntimeError):
    """A node did not start; the message names it (its log is printed next)."""


class Nodes:
    """The demo's node processes; a context manager that stops every one on exit."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, count: int, base_env: dict[str, str], work_dir: Path) -> None:
        """Start `count` nodes side by side, then wait until each answers GET /healthz."""
        for number in range(1, count + 1):
            node_id = f"node-{number}"
            env = base_env | config_env(
                {"node_id": node_id, "data_dir": work_dir / node_id},
            )
            self.nodes.append(Node(node_id, env, work_dir / f"{node_id}.log"))
        deadline = time.monotonic() + NODE_START_TIMEOUT
        with httpx.Client(timeout=2) as client:
            for node in self.nodes:
                try:
                    node.wait_ready(client, deadline)
                except NodeError:
                    print(f"--- {node.node_id}'s output:\n{node.log_tail()}", file=sys.stderr)
                    raise

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every node at once (they drain side by side), wait, SIGKILL the rest.

        Returns each node's exit code (None: killed). Safe to call again."""
        try:
            for node in self.nodes:
                node.terminate()
            deadline = time.monotonic() + NODE_STOP_TIMEOUT
            for node in self.nodes:
                if node.exit_code is None:
                    node.wait(deadline)
        finally:  # a second Ctrl-C while they drain: none may outlive the demo
            for node in self.nodes:
                if node.process.poll() is None:
                    node.process.kill()
                    node.process.wait()
        return {node.node_id: node.exit_code for node in self.nodes}


@dataclass
class Posting:
    """What the round-robin poster saw: events acknowledged (202) by each node, and refusals."""

    accepted: Counter[str] = field(default_factory=Counter)
    refused: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.accepted.values())


@dataclass
class DemoServices:
    """The embedded services the summary reads back from."""

    sink: HttpSink
    s3: S3Server
    smtp: SmtpServer


@dataclass
class ClusterDemo:
    """A running cluster (`start_cluster`): its nodes, one HTTP client, the SSE client on
    node-1, the services, and what was posted."""

    cluster: Nodes
    client: httpx.Client
    sse_client: SseCounter
    services: DemoServices
    run_directory: RunDirectory
    started: float
    posting: Posting = field(default_factory=Posting)
    planned: int | None = None
    view: ProgressView = field(default_factory=ProgressView)
    sample: SampleRun = field(default_factory=lambda: SampleRun(""))
    sample_view: SampleRunView | None = None

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes

    def run(self, events: int | None, duration: float | None, keep: bool) -> Summary:
        """Post, wait until delivered, stop the nodes; the summary (the per-node part printed)."""
        wait_for_subscriber(self)
        self.planned = events
        with self.view:
            self.post(events, duration)
            self.wait_until_delivered()
            self.show_progress(final=True)
        self.sample_view = self.sample.read()
        if keep:
            keep_running(self.sse_client.url)
        every = self.node_stats()
        services = self.services
        summary = Summary.read(
            add_stats(list(every.values())),
            self.sql_query,
            self.emits(),
            services.sink,
            services.s3,
            services.smtp,
            self.sse_client,
            self.posting.total,
        )
        self.sse_client.stop()
        summary.problems += self.posting.refused + node_problems(self.cluster.stop())
        self.run_directory.keep = bool(summary.problems)
        print(f"\n{len(self.nodes)} nodes, {self.posting.total} events posted round-robin:")
        self.print_nodes(every)
        return summary

    def node_stats(self) -> dict[str, dict[str, Any]]:
        return {node.node_id: node.stats(self.client) for node in self.nodes}

    def show_progress(self, final: bool = False) -> None:
        every = self.node_stats()
        rows = [
            NodeRow(
                node_id=node_id,
                posted=self.posting.accepted[node_id],
                runs=sum(stats["runs"].values()),
                delivered=sum(c.get("delivered", 0) for c in stats["destinations"].values()),
                retrying=sum(c.get("retrying", 0) for c in stats["destinations"].values()),
                failed=sum(c.get("failed", 0) for c in stats["destinations"].values()),
            )
            for node_id, stats in every.items()
        ]
        total = add_stats(list(every.values()))
        view = snapshot(
            total, self.posting.total, self.planned, self.started, self.sse_client, rows
        )
        self.view.show(view, final)

    def links(self) -> Links:
        """The summary's links: node-1's SSE stream, and the sample run on the node it ran."""
        return Links(self.nodes[0].url, self.sse_client.url, self.sample_view, alive=False)

    def post(self, events: int | None, duration: float | None) -> None:
        """Post sample orders round-robin to the nodes at the demo's rate."""
        pace(
            lambda number: self._post_one(self.nodes[number % len(self.nodes)], number),
            lambda _sent: self.show_progress(),
            events,
            duration,
        )

    def _post_one(self, node: Node, number: int) -> None:
        """POST order `number`; a 503 (the node is full) is retried after its Retry-After."""
        order = sample_order(number)
        url = f"{node.url}/workflows/{WORKFLOW}/events"
        for _attempt in range(20):
            try:
                response = self.client.post(url, json=order)
            except httpx.HTTPError as error:
                self.posting.refused.append(f"order {order['id']} to {node.node_id}: {error}")
                return
            if response.status_code == 202:
                self.posting.accepted[node.node_id] += 1
                self.sample.offer(response.json()["run_id"], order, node.url)
                return
            if response.status_code != 503:
                break
            time.sleep(float(response.headers.get("retry-after", "1")))
        self.posting.refused.append(
            f"order {order['id']} to {node.node_id}: {response.status_code} {response.text[:200]}"
        )

    def wait_until_delivered(self) -> None:
        """Until every accepted event ran (and the listener runs of its emits) and every send
        is final on every node, or DELIVERY_TIMEOUT; then give the SSE client a moment."""
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while time.monotonic() < deadline:
            total = add_stats(list(self.node_stats().values()))
            destinations = total["destinations"]
            expected_runs = self.posting.total + destinations.get("emit", {}).get("accepted", 0)
            pending = sum(counters.get("pending", 0) for counters in destinations.values())
            finished = sum(total["runs"].values())
            if finished >= expected_runs and not pending and not total["runs_in_flight"]:
                break
            self.show_progress()
            time.sleep(0.25)
        sse_deadline = time.monotonic() + SSE_GRACE
        while self.sse_client.received < self.posting.total and time.monotonic() < sse_deadline:
            time.sleep(0.05)

    def sql_query(self, sql: str) -> dict[str, Any]:
        """`rt.sql_query` through node-1's `POST /sql` (every node shares the database)."""
        response = self.client.post(f"{self.nodes[0].url}/sql", json={"query": sql})
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def emits(self) -> list[dict[str, Any]]:
        """The emits of the orders workflow, each once (by its delivery id), as every node lists
        them: each lists every node's, read from a stream, so one may not have read the last."""
        by_id: dict[str, dict[str, Any]] = {}
        for node in self.nodes:
            response = self.client.get(f"{node.url}/workflows/{WORKFLOW}/emits")
            response.raise_for_status()
            by_id.update((record["id"], record) for record in response.json()["emits"])
        return list(by_id.values())

    def print_nodes(self, every: dict[str, dict[str, Any]]) -> None:
        """One line per node: events posted to it, runs it ran, its deliveries by destination."""
        names = sorted({name for stats in every.values() for name in stats["destinations"]})
        header = " ".join(f"{name:>6}" for name in names)
        print(f"  {'node':<8} {'posted':>6} {'runs':>6}  delivered: {header}")
        for node_id, stats in every.items():
            counts = stats["destinations"]
            delivered = " ".join(f"{counts.get(name, {}).get('delivered', 0):>6}" for name in names)
            posted, runs = self.posting.accepted[node_id], sum(stats["runs"].values())
            print(f"  {node_id:<8} {posted:>6} {runs:>6}  {'':<10} {delivered}")
        print("  posted: events POSTed to the node; runs: the runs it ran (an event runs on")
        print("  whichever node pulls it from the shared journal, not always where posted).")


class RunDirectory:
    """This run's directory: the NATS store, each node's data directory and log.

    Fresh every run, under OUTBOUND_DATA_DIR when set (else the system's temporary
    directory): a journal left by an earlier run would replay its SSE history and
    emits into this run's counts, and deliver its leftovers to services that are
    gone. Removed at the end, unless the run failed or `keep` is set (its logs are
    worth reading then: the path is printed).
    """

    def __init__(self) -> None:
        parent = os.environ.get("OUTBOUND_DATA_DIR") or None
        if parent:
            os.makedirs(parent, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix="outbound-demo-cluster-", dir=parent))
        self.keep = False

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        interrupted = exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, SystemExit))
        if self.keep or (exc_type is not None and not interrupted):
            print(f"The nodes' logs and data are kept in {self.path}", file=sys.stderr)
        else:
            shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the demo as Ctrl-C does (`SystemExit` unwinds, so every node is stopped)."""
    handlers: SignalHandlers

    def chain(signum: int, frame: FrameType | None) -> None:
        handlers.chain(signum, frame)

    handlers = SignalHandlers(chain, (signal.SIGTERM,)).install()
    try:
        yield
    finally:
        handlers.restore()


def short_path(path: Path) -> str:
    """`path` relative to the working directory when it lies under it (shorter on screen)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def nodes_env(nats: EmbeddedNats, settings: dict[str, Any], sink_url: str) -> dict[str, str]:
    """What every node's environment holds: this one's without `OUTBOUND_*` (the nodes'
    settings are the demo's alone), the shared NATS (its token in the URL, which
    nats.py reads as a token), the cluster name and the services' settings."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OUTBOUND_")}
    journal = f"nats://{nats.token}@{nats.url.removeprefix('nats://')}"
    env |= config_env({"journal": journal, "cluster": CLUSTER} | settings)
    env[SINK_URL_VARIABLE] = sink_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


def node_problems(exit_codes: dict[str, int | None]) -> list[str]:
    """A line for each node that did not exit 0 after SIGTERM (None: it was killed)."""
    return [
        f"{node_id} exited with {code}"
        if code is not None
        else f"{node_id} did not stop within {NODE_STOP_TIMEOUT:.0f} s: killed"
        for node_id, code in exit_codes.items()
        if code != 0
    ]


def start_cluster(stack: contextlib.ExitStack, count: int, started: float) -> ClusterDemo:
    """The services, one NATS and `count` ready nodes, each stopped when `stack` closes."""
    sink, s3, postgres, smtp = stack.enter_context(embedded_services())
    run_directory = stack.enter_context(RunDirectory())
    nats = stack.enter_context(EmbeddedNats(ServerOptions(store_dir=run_directory.path / "nats")))
    cluster = stack.enter_context(Nodes())
    env = nodes_env(nats, service_settings(s3, postgres, smtp), sink.url)
    cluster.start(count, env, run_directory.path)
    client = stack.enter_context(httpx.Client(timeout=10))
    sse_client = SseCounter(f"{cluster.nodes[0].url}/pipelines/{WORKFLOW}/sse").start()
    stack.callback(sse_client.stop)
    took = time.monotonic() - started
    print(f"Cluster {CLUSTER!r} up in {took:.1f} s: {count} nodes on one NATS at {nats.url}")
    print(f"  logs and data: {short_path(run_directory.path)}")
    for node in cluster.nodes:
        print(f"  {node.node_id:<11} {node.url}   (log: {node.log_path.name})")
    print(f"  SSE stream on node-1: {sse_client.url}")
    services = DemoServices(sink, s3, smtp)
    return ClusterDemo(cluster, client, sse_client, services, run_directory, started)


def run_cluster_demo(arguments: argparse.Namespace) -> int:
    """Entry point of `outbound demo --nodes N` (N >= 2; argument parsing lives in runtime.cli)."""
    events = arguments.events
    if events is None and arguments.duration is None:
        events = DEFAULT_EVENTS
    print("Starting embedded services: HTTP sink, S3 (moto), Postgres (pgserver), SMTP,")
    print(f"  NATS (JetStream), and {arguments.nodes} runtime processes ...")
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(stop_on_sigterm())
            demo = start_cluster(stack, arguments.nodes, started)
            summary = demo.run(events, arguments.duration, arguments.keep_running)
    except NodeError as error:
        print(f"outbound demo: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as stopped:  # Ctrl-C, or SIGTERM (stop_on_sigterm)
        print("\nInterrupted: every node and the NATS server are stopped.")
        return 130 if isinstance(stopped, KeyboardInterrupt) else int(stopped.code or 1)
    code = summary.print(time.monotonic() - started, demo.links())
    if arguments.chart:
        print(write_chart(arguments.chart, demo.view.timeline))
    return code


def wait_for_subscriber(demo: ClusterDemo, timeout: float = 10.0) -> None:
    """Until node-1 counts the SSE client as a subscriber: it must not miss the first events."""
    deadline = time.monotonic() + timeout
    node = demo.nodes[0]
    while time.monotonic() < deadline and demo.sse_client.error is None:
        response = demo.client.get(f"{node.url}/metrics")
        for family in text_string_to_metric_families(response.text):
            if family.name == "outbound_sse_subscribers" and family.samples[0].value >= 1:
                return
        time.sleep(0.05)
