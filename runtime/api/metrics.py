"""Prometheus metrics of one runtime, for `GET /metrics`.

Owns `RuntimeMetrics`: a `CollectorRegistry` per runtime (never the global
one, so several runtimes in one process do not clash). Counters are read from
the ledger at scrape time; the delivery latency histogram is fed by a ledger
listener (latency = finished_at - accepted_at of every final delivery).
Reads the runtime only through `RuntimeView` (`stats()`, `sse_hub`, the
ledger's listeners); changes nothing in it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from outbound.api.view import RuntimeView
from outbound.destinations.delivery import Delivery

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Workflows with their own `workflow` label on `outbound_runs_total`; the rest are summed.
LABELLED_WORKFLOWS = 20
OTHER_WORKFLOWS = "(other)"
RUN_STATUSES = ("succeeded", "ended", "failed")
#: Hosts with their own `outbound_http_circuit_open{host}` series, at most (the first by name).
LABELLED_HOSTS = 20
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _LedgerCollector(Collector):
    """Turns the runtime's `stats()` and the SSE hub's counters into metric families.

    Only series that can move: retries for the destinations that retry, batch
    flushes and buffered bytes for those that batch (the counters a destination
    kind declares, `Destination.counters`), the journal's gauges with a journal.
    """

    def __init__(self, runtime: RuntimeView) -> None:
        self._runtime = weakref.ref(runtime)

    def collect(self) -> Iterator[Metric]:
        runtime = self._runtime()
        if runtime is None:
            return
        stats = runtime.stats()
        yield _runs_by_workflow(runtime.workflows, stats.get("runs_by_workflow", {}))
        yield GaugeMetricFamily(
            "outbound_runs_in_flight", "Workflow runs not finished yet", stats["runs_in_flight"]
        )
        yield from _destination_families(stats["destinations"])
        admission = stats["admission"]
        yield GaugeMetricFamily(
            "outbound_admitted",
            "Runs and sends in flight between submit and a final outcome",
            admission["in_flight"],
        )
        yield GaugeMetricFamily(
            "outbound_admission_limit", "OUTBOUND_MAX_PENDING", admission["limit"]
        )
        yield GaugeMetricFamily(
            "outbound_admission_waiting",
            "Callers waiting for room (backpressure)",
            admission["waiting"],
        )
        if any("batches_written" in counter for counter in stats["destinations"].values()):
            yield GaugeMetricFamily(
                "outbound_buffered_bytes",
                "Bytes held in batches waiting to be written",
                stats["buffered_bytes"],
            )
        if "journal" in stats:
            yield from _journal_families(stats["journal"])
        if "http" in stats:
            yield from _http_families(stats["http"])
        hub = runtime.sse_hub
        yield GaugeMetricFamily(
            "outbound_sse_subscribers", "Connected SSE subscribers", hub.subscribers
        )
        yield CounterMetricFamily(
            "outbound_sse_disconnects",
            "SSE subscribers cut off because their queue was full",
            hub.disconnected,
        )
        yield CounterMetricFamily(
            "outbound_sse_events", "Events published to SSE streams", hub.published
        )


def _runs_by_workflow(registered: list[str], counts: dict[str, dict[str, int]]) -> Metric:
    """`outbound_runs_total{workflow, status}`: the first `LABELLED_WORKFLOWS` workflows
    (registered ones first, in their order) by name, the rest summed as `OTHER_WORKFLOWS`.

    The labelled ones are the first, not the busiest: a workflow never moves between
    its own series and the sum, so every series only grows (what `rate()` expects).
    """
    runs = CounterMetricFamily(
        "outbound_runs", "Finished workflow runs", labels=["workflow", "status"]
    )
    names = list(dict.fromkeys([*registered, *counts]))
    for name in names[:LABELLED_WORKFLOWS]:
        for status in RUN_STATUSES:
            runs.add_metric([name, status], counts.get(name, {}).get(status, 0))
    if len(names) > LABELLED_WORKFLOWS:
        for status in RUN_STATUSES:
            other = sum(counts.get(name, {}).get(status, 0) for name in names[LABELLED_WORKFLOWS:])
            runs.add_metric([OTHER_WORKFLOWS, status], other)
    return runs


#: How a family with a `destination` label is made (a counter or a gauge).
_Family = type[CounterMetricFamily] | type[GaugeMetricFamily]
#: Families with one sample per destination: (kind, name, help, the ledger counter shown).
_PER_DESTINATION: tuple[tuple[_Family, str, str, str], ...] = (
    (CounterMetricFamily, "outbound_sends", "Sends accepted by a destination", "accepted"),
    (GaugeMetricFamily, "outbound_deliveries_pending", "Sends not final yet", "pending"),
    (
        CounterMetricFamily,
        "outbound_dead_letters",
        "Failed sends written to a dead-letter file (outbound replay sends them again)",
        "dead_lettered",
    ),
    (
        CounterMetricFamily,
        "outbound_dead_letter_errors",
        "Failed sends that could not be written to a dead-letter file (see the ERROR log)",
        "dead_letter_errors",
    ),
)
#: The same, only for the destinations that have the counter: those that can move it
#: (`Destination.counters`: retries for those that retry, batches for those that batch).
_WHERE_THEY_MOVE: tuple[tuple[_Family, str, str, str], ...] = (
    (CounterMetricFamily, "outbound_retries", "Failed attempts that were retried", "retries"),
    (
        GaugeMetricFamily,
        "outbound_deliveries_retrying",
        "Sends waiting out a backoff before their next attempt",
        "retrying",
    ),
    (
        CounterMetricFamily,
        "outbound_batch_flushes",
        "Batches written (S3 objects, SQL loads)",
        "batches_written",
    ),
)


def _destination_families(destinations: dict[str, dict[str, int]]) -> Iterator[Metric]:
    by_name = sorted(destinations.items())
    for kind, name, documentation, key in _PER_DESTINATION:
        family = kind(name, documentation, labels=["destination"])
        for destination, counter in by_name:
            family.add_metric([destination], counter.get(key, 0))
        yield family
    deliveries = CounterMetricFamily(
        "outbound_deliveries",
        "Deliveries by destination and final status",
        labels=["destination", "status"],
    )
    for destination, counter in by_name:
        for status in ("delivered", "failed"):
            deliveries.add_metric([destination, status], counter.get(status, 0))
    yield deliveries
    for kind, name, documentation, key in _WHERE_THEY_MOVE:
        family = kind(name, documentation, labels=["destination"])
        for destination, counter in by_name:
            if key in counter:
                family.add_metric([destination], counter[key])
        if family.samples:
            yield family


def _http_families(http: dict[str, Any]) -> Iterator[Metric]:
    """Open circuits (a count, and one series per host for the first `LABELLED_HOSTS`
    hosts: hosts come from event data, so their number is bounded) and gone endpoints."""
    circuits = http.get("open_circuits", {})
    yield GaugeMetricFamily(
        "outbound_http_open_circuits",
        "Hosts whose circuit breaker is open (their sends wait for a probe to succeed)",
        len(circuits),
    )
    by_host = GaugeMetricFamily(
        "outbound_http_circuit_open",
        f"1 while this host's circuit is open (the first {LABELLED_HOSTS} open hosts by name)",
        labels=["host"],
    )
    for host in sorted(circuits)[:LABELLED_HOSTS]:
        by_host.add_metric([host], 1)
    yield by_host
    yield GaugeMetricFamily(
        "outbound_http_gone_endpoints",
        "HTTP endpoints marked gone (410): their sends fail until rt.enable_endpoint(url)",
        len(http.get("gone_endpoints", [])),
    )


def _journal_families(journal: dict[str, Any]) -> Iterator[Metric]:
    """The journal's lag: entries stored and not yet acknowledged (sends not final), runs'
    sends waiting to be stored, whether it is connected and, in a cluster, the queue."""
    yield GaugeMetricFamily(
        "outbound_journal_connected",
        "1 while the journal (NATS JetStream) is connected",
        1 if journal.get("connected") else 0,
    )
    yield GaugeMetricFamily(
        "outbound_journal_open_entries",
        "Journal entries stored and not yet acknowledged (their sends are not all final)",
        journal.get("open_entries", 0),
    )
    yield GaugeMetricFamily(
        "outbound_journal_appends_waiting",
        "Runs' sends waiting to be stored in the journal",
        journal.get("appending", 0),
    )
    cluster = journal.get("cluster")
    if cluster is not None:
        yield GaugeMetricFamily(
            "outbound_cluster_queued_events",
            "Events waiting in the cluster's queue for a node (OUTBOUND_JOURNAL_MAX_QUEUED "
            "bounds it), as this node last read it",
            cluster.get("queued_events", 0),
        )
    if journal.get("mode") == "local":
        yield CounterMetricFamily(
            "outbound_journal_server_restarts",
            "Restarts of the embedded nats-server (OUTBOUND_JOURNAL=local)",
            journal.get("server_restarts", 0),
        )


class RuntimeMetrics:
    """The registry of one runtime; `render()` is the Prometheus text exposition."""

    def __init__(self, runtime: RuntimeView) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_LedgerCollector(runtime))
        self.latency = Histogram(
            "outbound_delivery_latency_seconds",
            "Seconds from a send to its final delivery",
            ["destination", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        runtime.ledger.add_listener(self._observe)

    def _observe(self, record: Delivery) -> None:
        if record.finished_at is None or not record.accepted_at:
            return
        latency = max(0.0, record.finished_at - record.accepted_at)
        self.latency.labels(record.destination, record.status).observe(latency)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_by_runtime: weakref.WeakKeyDictionary[RuntimeView, RuntimeMetrics] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def metrics_for(runtime: RuntimeView) -> RuntimeMetrics:
    """The one `RuntimeMetrics` of `runtime` (made, and its ledger listener added, once)."""
    with _lock:
        metrics = _by_runtime.get(runtime)
        if metrics is None:
            metrics = _by_runtime[runtime] = RuntimeMetrics(runtime)
        return metrics
