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

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from outbound.api.view import RuntimeView
from outbound.destinations.delivery import Delivery

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _LedgerCollector(Collector):
    """Turns the runtime's `stats()` and the SSE hub's counters into metric families."""

    def __init__(self, runtime: RuntimeView) -> None:
        self._runtime = weakref.ref(runtime)

    def collect(self) -> Iterator[Metric]:
        runtime = self._runtime()
        if runtime is None:
            return
        stats = runtime.stats()
        runs = CounterMetricFamily("outbound_runs", "Finished workflow runs", labels=["status"])
        for status in ("succeeded", "ended", "failed"):
            runs.add_metric([status], stats["runs"].get(status, 0))
        yield runs
        yield GaugeMetricFamily(
            "outbound_runs_in_flight", "Workflow runs not finished yet", stats["runs_in_flight"]
        )
        sends = CounterMetricFamily(
            "outbound_sends", "Sends accepted by a destination", labels=["destination"]
        )
        deliveries = CounterMetricFamily(
            "outbound_deliveries",
            "Deliveries by destination and final status",
            labels=["destination", "status"],
        )
        pending = GaugeMetricFamily(
            "outbound_deliveries_pending", "Sends not final yet", labels=["destination"]
        )
        retries = CounterMetricFamily(
            "outbound_retries", "Failed attempts that were retried", labels=["destination"]
        )
        retrying = GaugeMetricFamily(
            "outbound_deliveries_retrying",
            "Sends waiting out a backoff before their next attempt",
            labels=["destination"],
        )
        batches = CounterMetricFamily(
            "outbound_batch_flushes",
            "Batches written (S3 objects, SQL loads)",
            labels=["destination"],
        )
        for name, counter in sorted(stats["destinations"].items()):
            sends.add_metric([name], counter.get("accepted", 0))
            for status in ("delivered", "failed"):
                deliveries.add_metric([name, status], counter.get(status, 0))
            pending.add_metric([name], counter.get("pending", 0))
            retries.add_metric([name], counter.get("retries", 0))
            retrying.add_metric([name], counter.get("retrying", 0))
            batches.add_metric([name], counter.get("batches_written", 0))
        yield from (sends, deliveries, pending, retries, retrying, batches)
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
        yield GaugeMetricFamily(
            "outbound_buffered_bytes",
            "Bytes held in batches waiting to be written",
            stats["buffered_bytes"],
        )
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
