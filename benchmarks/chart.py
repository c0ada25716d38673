"""The benchmark chart: ours against each baseline, with every stated target.

Owns turning saved reports (`Report`, as in `benchmarks/results/*.json`) into
one PNG: a panel of ratios (ours / baseline, log scale, a tick per target), a
panel of limits (measured / allowed, for the `<=` targets) and one small panel
of throughput per scenario (horizontal bars, log scale when the values span
more than ten times). It draws only: it runs no scenario and writes no JSON;
`suite.py` decides where the file goes (the working directory, never the
installed package). Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outbound.benchmarks.report import Report, machine

#: Values spanning more than this factor get a log axis: on a linear one the
#: smaller bars (often ours next to a bare loop) shrink to nothing.
LOG_SCALE_SPAN = 10.0
OURS_COLOUR = "#2b7bb9"
BASELINE_COLOUR = "#a8a8a8"
BELOW_TARGET_COLOUR = "#d62728"
NO_TARGET_COLOUR = "#9ecae1"
PANELS_PER_ROW = 3
#: Colours in the PNG's palette (flat bars and antialiased text need few).
PALETTE_COLOURS = 128
LABEL_WIDTH = 24  # characters before a setup's name wraps onto a second line


@dataclass(frozen=True)
class Target:
    """A stated target such as `>= 3.0` (at least) or `<= 250` (at most)."""

    at_least: bool
    number: float

    @classmethod
    def parse(cls, text: str) -> Target:
        operator, _, number = text.strip().partition(" ")
        return cls(at_least=operator == ">=", number=float(number))

    def met_by(self, value: float) -> bool:
        return value >= self.number if self.at_least else value <= self.number

    def __str__(self) -> str:
        return f"{'≥' if self.at_least else '≤'} {self.number:g}"


@dataclass(frozen=True)
class Rate:
    """One setup's throughput in a scenario: `setup` is the result's name."""

    setup: str
    value: float
    metric: str  # e.g. runs_per_s

    @property
    def ours(self) -> bool:
        return self.setup.startswith("ours")


@dataclass(frozen=True)
class Ratio:
    """A ratio a scenario reports, with its target when it states one."""

    scenario: str
    name: str
    value: float
    target: Target | None

    @property
    def label(self) -> str:
        readable = self.name.removeprefix("vs_").replace("_vs_", " vs ")
        against = "vs " if self.name.startswith("vs_") else ""
        return f"{self.scenario}: {against}{readable}"


@dataclass
class ChartSummary:
    """What was drawn, for callers and tests: each panel's title and its x-axis scale."""

    path: Path
    scales: dict[str, str] = field(default_factory=dict)  # panel -> "log" | "linear"


def rates(report: Report) -> list[Rate]:
    """The setups measured in the same per-second metric as the first one (ours), in order.

    A setup whose figure is another quantity (the HTTP sink's own capacity,
    the highest sustained SSE rate) is left out: it is not a baseline for ours.
    """
    found: list[Rate] = []
    for setup, metrics in report.results.items():
        for metric, value in metrics.items():
            if metric.endswith("_per_s") and isinstance(value, int | float):
                found.append(Rate(setup, float(value), metric))
                break
    if not found:
        return []
    return [rate for rate in found if rate.metric == found[0].metric and rate.value > 0]


def comparisons(reports: list[Report]) -> list[Ratio]:
    """Ratios where higher is better for ours: an `>=` target, or `vs_...` with none."""
    chosen = []
    for report in reports:
        for name, value in report.ratios.items():
            target = Target.parse(report.targets[name]) if name in report.targets else None
            higher_is_better = target.at_least if target else name.startswith("vs_")
            if higher_is_better and value > 0:
                chosen.append(Ratio(report.scenario, name, float(value), target))
    return chosen


def limits(reports: list[Report]) -> list[Ratio]:
    """Figures with an upper bound (`<=` target above 0): memory, latency, object counts."""
    return [
        Ratio(report.scenario, name, float(value), target)
        for report in reports
        for name, value in report.ratios.items()
        if name in report.targets
        for target in [Target.parse(report.targets[name])]
        if not target.at_least and target.number > 0
    ]


def wants_log_scale(values: list[float]) -> bool:
    """True when the positive values span more than `LOG_SCALE_SPAN` times."""
    positive = [value for value in values if value > 0]
    return bool(positive) and max(positive) / min(positive) > LOG_SCALE_SPAN


def _compact(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _draw_ratios(axis: Any, ratios: list[Ratio]) -> str:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    rows = list(reversed(ratios))  # barh draws bottom-up; keep the scenarios' order top-down
    colours = [
        NO_TARGET_COLOUR
        if ratio.target is None
        else OURS_COLOUR
        if ratio.target.met_by(ratio.value)
        else BELOW_TARGET_COLOUR
        for ratio in rows
    ]
    positions = range(len(rows))
    axis.barh(positions, [ratio.value for ratio in rows], color=colours, height=0.7)
    axis.set_yticks(positions, [ratio.label for ratio in rows], fontsize=8)
    figures = [ratio.value for ratio in rows] + [
        ratio.target.number for ratio in rows if ratio.target
    ]
    scale = "log" if wants_log_scale([*figures, 1.0]) else "linear"
    axis.set_xscale(scale)
    axis.axvline(1.0, color="#555555", linestyle="--", linewidth=1)
    low = min([*figures, 1.0])
    high = max([*figures, 1.0])
    if scale == "log":
        axis.set_xlim(low / 2, high * 30)  # room for the value labels
    else:
        axis.set_xlim(0, high * 1.6)
    for position, ratio in zip(positions, rows, strict=True):
        text = f"{ratio.value:.3g}×"
        if ratio.target:
            axis.vlines(ratio.target.number, position - 0.45, position + 0.45, color="black", lw=2)
            text += f"   target {ratio.target}"
        # past the bar's end and past the target tick, whichever lies further right
        end = max(ratio.value, ratio.target.number if ratio.target else 0.0)
        axis.text(
            end * (1.15 if scale == "log" else 1.02),
            position,
            text,
            va="center",
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},  # over the 1× line
        )
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}×"))
    axis.set_xlabel(
        "ours ÷ baseline (times the baseline's throughput"
        + ("; log scale)" if scale == "log" else ")"),
        fontsize=8,
    )
    axis.set_title("Ours against each baseline: higher is better", fontsize=10, loc="left")
    axis.tick_params(axis="x", labelsize=8)
    axis.legend(
        handles=[
            Patch(color=OURS_COLOUR, label="meets its target"),
            Patch(color=BELOW_TARGET_COLOUR, label="below its target"),
            Patch(color=NO_TARGET_COLOUR, label="no target (for reference)"),
            Line2D([], [], color="black", lw=2, label="target"),
            Line2D([], [], color="#555555", ls="--", lw=1, label="as fast as the baseline"),
        ],
        fontsize=7,
        loc="lower right",
        framealpha=0.9,
    )
    return scale


def _draw_limits(axis: Any, bounded: list[Ratio]) -> str:
    rows = list(reversed(bounded))
    shares = [ratio.value / ratio.target.number for ratio in rows if ratio.target]
    colours = [OURS_COLOUR if share <= 1 else BELOW_TARGET_COLOUR for share in shares]
    positions = range(len(rows))
    axis.barh(positions, shares, color=colours, height=0.45)
    axis.set_yticks(positions, [ratio.label for ratio in rows], fontsize=8)
    axis.axvline(1.0, color="black", lw=2)
    axis.set_xlim(0, max([*shares, 1.0]) * 1.9)
    for position, ratio, share in zip(positions, rows, shares, strict=True):
        axis.text(
            max(share, 1.0) * 1.03,
            position,
            f"{_compact(ratio.value)} (limit {ratio.target})",
            va="center",
            fontsize=8,
        )
    axis.set_xlabel("measured ÷ limit (1 = the limit)", fontsize=8)
    axis.set_title("Limits: lower is better", fontsize=10, loc="left")
    axis.tick_params(axis="x", labelsize=8)
    return "linear"


def _short(value: float) -> str:
    """An axis tick: 500, 20k, 1.5M (ticks like 10000 and 12000 would run together)."""
    for factor, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:g}{suffix}"
    return f"{value:g}"


def _draw_rates(axis: Any, scenario: str, found: list[Rate]) -> str:
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    rows = list(reversed(found))
    values = [rate.value for rate in rows]
    positions = range(len(rows))
    axis.barh(
        positions,
        values,
        color=[OURS_COLOUR if rate.ours else BASELINE_COLOUR for rate in rows],
        height=0.7,
    )
    labels = [textwrap.fill(rate.setup, LABEL_WIDTH, break_long_words=False) for rate in rows]
    axis.set_yticks(positions, labels, fontsize=7.5)
    scale = "log" if wants_log_scale(values) else "linear"
    axis.set_xscale(scale)
    if scale == "log":
        axis.set_xlim(min(values) / 2, max(values) * 12)
    else:
        axis.set_xlim(0, max(values) * 1.35)
    for position, value in zip(positions, values, strict=True):
        axis.text(
            value * (1.1 if scale == "log" else 1.02),
            position,
            _compact(value),
            va="center",
            fontsize=7.5,
        )
    axis.xaxis.set_major_locator(LogLocator(numticks=5) if scale == "log" else MaxNLocator(nbins=4))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: _short(value)))
    unit = found[0].metric.removesuffix("_per_s").replace("_", " ")
    axis.set_title(f"{scenario}: {unit} per second", fontsize=9, loc="left")
    axis.tick_params(axis="x", labelsize=7)
    if scale == "log":
        axis.set_xlabel("log scale", fontsize=7)
    return scale


def _shrink(path: Path) -> None:
    """Re-save the PNG with a small palette: a third of the size (the README embeds it),
    and flat bars and text lose nothing visible."""
    from PIL import Image  # a dependency of matplotlib

    with Image.open(path) as image:
        # octree, not median cut: a colour on few pixels (the legend's red) keeps its entry
        small = image.convert("RGB").quantize(PALETTE_COLOURS, Image.Quantize.FASTOCTREE)
    small.save(path, optimize=True)


def _measured_on(reports: list[Report]) -> dict[str, Any]:
    """The machine the reports were measured on (this one, when they disagree or don't say)."""
    machines = {repr(report.measured_on) for report in reports if report.measured_on}
    if len(machines) == 1:
        return next(report.measured_on for report in reports if report.measured_on)
    return machine()


def render_chart(reports: list[Report], path: Path) -> ChartSummary:
    """Draw `reports` into the PNG at `path`; returns each panel's axis scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = comparisons(reports)
    bounded = limits(reports)
    panels = [(report.scenario, rates(report)) for report in reports]
    panels = [(scenario, found) for scenario, found in panels if found]
    rate_rows = math.ceil(len(panels) / PANELS_PER_ROW)
    top_height = max(len(ratios), len(bounded), 3) * 0.32 + 1.2
    rate_height = max((len(found) for _, found in panels), default=2) * 0.35 + 0.9
    figure = plt.figure(
        figsize=(13, top_height + rate_height * rate_rows + 0.8), layout="constrained"
    )
    grid = figure.add_gridspec(
        1 + rate_rows, PANELS_PER_ROW, height_ratios=[top_height] + [rate_height] * rate_rows
    )
    summary = ChartSummary(path)
    if ratios:
        span = PANELS_PER_ROW - 1 if bounded else PANELS_PER_ROW
        summary.scales["ratios"] = _draw_ratios(figure.add_subplot(grid[0, :span]), ratios)
    if bounded:
        summary.scales["limits"] = _draw_limits(figure.add_subplot(grid[0, -1]), bounded)
    for index, (scenario, found) in enumerate(panels):
        axis = figure.add_subplot(grid[1 + index // PANELS_PER_ROW, index % PANELS_PER_ROW])
        summary.scales[scenario] = _draw_rates(axis, scenario, found)
    info = _measured_on(reports)
    figure.suptitle(
        f"Outbound benchmarks: ours (blue) vs baselines (grey), "
        f"{info.get('cpus', '?')} CPUs, Python {info.get('python', '?')}",
        fontsize=11,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    _shrink(path)
    return summary
