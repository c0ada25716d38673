"""What `outbound demo` (and `outbound demo --nodes N`) shows while it runs.

Owns the demo's progress display: on a terminal a live view drawn in place with
`rich` (one row per destination: accepted, delivered, retrying, failed, batches
and a progress bar; with `--nodes`, one row per node), fitted to the terminal's
width; when stdout is not a terminal (a log, a pipe) a few plain lines with no
escape codes. It only draws what it is given (`Snapshot`): it must not read the
runtime or the services itself (`outbound.demo` and `outbound.demo_cluster` do).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

#: The destinations in the order the demo's workflow sends to them.
DESTINATION_ORDER = ("http", "s3", "sql", "sse", "email", "emit")
PLAIN_EVERY = 10.0  # seconds between plain lines when the planned count gives no milestones
PLAIN_MILESTONES = (0.25, 0.5, 0.75)  # shares of the planned events that print a plain line


@dataclass
class NodeRow:
    """One node of `outbound demo --nodes`: events posted to it and what it did."""

    node_id: str
    posted: int
    runs: int
    delivered: int
    retrying: int
    failed: int


@dataclass
class TimelinePoint:
    """Deliveries per destination so far, `seconds` after the demo started (for --chart)."""

    seconds: float
    delivered: dict[str, int]


@dataclass
class Snapshot:
    """What the view draws: `stats` in the shape of `rt.stats()` (one runtime's, or a
    cluster's added up), events posted so far, and the sends each destination should
    end with (`expected`: none known with `--duration`)."""

    seconds: float
    posted: int
    planned: int | None
    stats: dict[str, Any]
    expected: dict[str, int] = field(default_factory=dict)
    nodes: list[NodeRow] = field(default_factory=list)
    sse_read: int = 0
    sse_nodes: int = 0


def destination_names(stats: dict[str, Any]) -> list[str]:
    present = stats["destinations"]
    known = [name for name in DESTINATION_ORDER if name in present]
    return known + sorted(name for name in present if name not in DESTINATION_ORDER)


def runs_text(runs: dict[str, int], in_flight: int = 0) -> str:
    """`412 ok, 3 running`: the runs by status (one word each)."""
    parts = [f"{count} {status}" for status, count in sorted(runs.items()) if count]
    if in_flight:
        parts.append(f"{in_flight} running")
    return ", ".join(parts) or "none yet"


def headline(snapshot: Snapshot) -> str:
    planned = f"/{snapshot.planned}" if snapshot.planned is not None else ""
    runs = runs_text(snapshot.stats["runs"], snapshot.stats.get("runs_in_flight", 0))
    return f"{snapshot.seconds:5.1f} s  events posted {snapshot.posted}{planned}  runs: {runs}"


def destination_table(snapshot: Snapshot) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False)
    table.add_column("destination")
    for header in ("accepted", "delivered", "retrying", "failed", "batches"):
        table.add_column(header, justify="right")
    table.add_column("progress", width=12, no_wrap=True)
    table.add_column("", justify="right", width=4, no_wrap=True)
    destinations = snapshot.stats["destinations"]
    for name in destination_names(snapshot.stats):
        counters = destinations[name]
        accepted = counters.get("accepted", 0)
        done = counters.get("delivered", 0) + counters.get("failed", 0)
        total = max(snapshot.expected.get(name, 0), accepted)
        batches = counters.get("batches_written")
        bar: Any = ProgressBar(total=total, completed=done, width=12) if total else Text("")
        table.add_row(
            name,
            str(accepted),
            str(counters.get("delivered", 0)),
            str(counters.get("retrying", 0)),
            str(counters.get("failed", 0)),
            "-" if batches is None else str(batches),
            bar,
            f"{100 * done // total}%" if total else "-",
        )
    return table


def node_table(nodes: list[NodeRow]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False)
    table.add_column("node")
    for header in ("posted", "runs", "delivered", "retrying", "failed"):
        table.add_column(header, justify="right")
    for node in nodes:
        table.add_row(
            node.node_id,
            str(node.posted),
            str(node.runs),
            str(node.delivered),
            str(node.retrying),
            str(node.failed),
        )
    return table


def render(snapshot: Snapshot) -> Group:
    parts: list[Any] = [Text(headline(snapshot), style="bold"), destination_table(snapshot)]
    if snapshot.nodes:
        parts.append(node_table(snapshot.nodes))
        parts.append(
            Text(
                f"SSE: {snapshot.sse_read} events read on node-1, "
                f"sent by {snapshot.sse_nodes} node(s)"
            )
        )
    return Group(*parts)


def plain_line(snapshot: Snapshot) -> str:
    """One short line for logs: events, runs, and deliveries per destination."""
    planned = f"/{snapshot.planned}" if snapshot.planned is not None else ""
    runs = sum(snapshot.stats["runs"].values())
    destinations = snapshot.stats["destinations"]
    delivered = " ".join(
        f"{name} {destinations[name].get('delivered', 0)}"
        for name in destination_names(snapshot.stats)
    )
    retrying = sum(counters.get("retrying", 0) for counters in destinations.values())
    line = f"[{snapshot.seconds:5.1f}s] {snapshot.posted}{planned} events, {runs} runs"
    line += f"; delivered: {delivered}"
    return line + (f"; {retrying} retrying" if retrying else "")


class ProgressView:
    """The live view on a terminal, a few plain lines otherwise; a context manager.

    `show(snapshot)` as often as you like: the terminal view redraws in place (rich
    `Live`, no thread of its own); plain output prints at 25/50/75 % of the planned
    events (every PLAIN_EVERY s without a plan) and once more for the final snapshot.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False)
        self.live: Live | None = None
        self._milestones = list(PLAIN_MILESTONES)
        self._last_plain = time.monotonic()
        self.timeline: list[TimelinePoint] = []  # every snapshot shown, for `write_chart`

    @property
    def on_terminal(self) -> bool:
        return self.console.is_terminal

    def __enter__(self) -> ProgressView:
        if self.on_terminal:
            self.live = Live(console=self.console, auto_refresh=False, transient=False)
            self.live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def show(self, snapshot: Snapshot, final: bool = False) -> None:
        delivered = {
            name: counters.get("delivered", 0)
            for name, counters in snapshot.stats["destinations"].items()
        }
        self.timeline.append(TimelinePoint(snapshot.seconds, delivered))
        if self.live is not None:
            self.live.update(render(snapshot), refresh=True)
            return
        if not final and not self._plain_due(snapshot):
            return
        print(plain_line(snapshot), flush=True)
        self._last_plain = time.monotonic()

    def _plain_due(self, snapshot: Snapshot) -> bool:
        if snapshot.planned:
            share = snapshot.posted / snapshot.planned
            due = [mark for mark in self._milestones if share >= mark]
            for mark in due:
                self._milestones.remove(mark)
            return bool(due)
        return time.monotonic() - self._last_plain >= PLAIN_EVERY


def write_chart(path: str, timeline: list[TimelinePoint]) -> str:
    """A small PNG of deliveries over time, one line per destination; what happened, as a
    sentence to print. Needs matplotlib (the `bench` extra): without it, says so."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            f"No chart written to {path}: --chart needs matplotlib, which the 'bench' extra "
            "installs (pip install 'outbound-runtime[bench]')."
        )
    names = destination_names({"destinations": timeline[-1].delivered}) if timeline else []
    figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    seconds = [point.seconds for point in timeline]
    styles = ("-", "--", "-.", ":")
    for number, name in enumerate(names):
        counts = [point.delivered.get(name, 0) for point in timeline]
        axes.step(
            seconds,
            counts,
            where="post",
            label=f"{name} ({counts[-1]})",
            linestyle=styles[number % len(styles)],
            linewidth=2.4 - 0.3 * number,  # where lines overlap, the one below still shows
        )
    axes.set_xlabel("seconds since the demo started")
    axes.set_ylabel("sends delivered (cumulative)")
    axes.set_title("outbound demo: deliveries over time per destination")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize="small", frameon=False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return f"Chart of deliveries over time per destination: {path}"
