"""`outbound bench`: every scenario, one table, JSON files and a chart.

Owns running the scenarios in turn and writing their table and chart (drawn
by `chart.py`: ratios with their targets, throughput ours against each
baseline) as a PNG (matplotlib) in the working directory's
`benchmarks/results/` (the repository's committed results, when run from its
root; `outbound bench --output DIR` elsewhere), never inside the installed
package. `describe_scenarios` is `outbound bench --list`.
Scenario modules do the measuring; this module only collects and presents.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from outbound.benchmarks.chart import render_chart
from outbound.benchmarks.report import Report, machine, meets_target

RESULTS = Path("benchmarks") / "results"  # relative: under the working directory
SCENARIOS = ["runs", "http", "inline", "s3", "sql", "sse", "backpressure", "durable", "cluster"]


#: What each scenario measures, in one line of `outbound bench --list` (its module's
#: docstring says how).
SUMMARIES = {
    "runs": "workflow runs/s vs a thread per run and a bare Python loop",
    "http": "HTTP deliveries/s to a local sink vs raw httpx",
    "inline": "runs/s when 4 HTTP sends do not wait vs the same requests inline",
    "s3": "events/s into S3 objects vs hand-made objects uploaded with minio",
    "sql": "events/s into Postgres vs a raw COPY and per-event INSERTs",
    "sse": "SSE fan-out to many subscribers vs a bare sse-starlette app",
    "backpressure": "peak memory growth while submitting toward a slow endpoint",
    "durable": "runs/s with the journal (OUTBOUND_JOURNAL=local) vs off; recovery",
    "cluster": "runs/s with 1 and 2 runtime processes on one NATS",
}


def describe_scenarios() -> str:
    """`outbound bench --list`: one line per scenario, its name and what it measures
    (`(not available: ...)` when a dependency of its module is missing)."""
    column = max(len(name) for name in SCENARIOS) + 2
    lines = []
    for name in SCENARIOS:
        try:
            importlib.import_module(f"outbound.benchmarks.{name}")
        except ModuleNotFoundError as error:
            summary = f"(not available: {error.name} is not installed)"
        else:
            summary = SUMMARIES.get(name, "")
        lines.append(f"{name:<{column}}{summary}")
    return "\n".join(lines)


def throughput(report: Report) -> list[tuple[str, float, str]]:
    """(setup name, value, metric) for each result with a per-second figure, ours first."""
    rows = []
    for name, metrics in report.results.items():
        for metric, value in metrics.items():
            if metric.endswith("_per_s") and isinstance(value, int | float):
                rows.append((name, float(value), metric))
                break
    return rows


def render_table(reports: list[Report]) -> str:
    """One row per scenario: our throughput, the baselines', and every ratio with its target."""
    lines = [
        "| scenario | ours | baselines | ratios (target) |",
        "| --- | --- | --- | --- |",
    ]
    for report in reports:
        rows = throughput(report)
        ours = f"{rows[0][1]:,.0f} {rows[0][2]}" if rows else "-"
        baselines = (
            "; ".join(
                f"{name}: {value:,.0f}"
                for name, value, _ in rows[1:]
                if not name.startswith("ours")
            )
            or "-"
        )
        ratios = ", ".join(
            f"{name} **{value:.2f}**"
            + (f" ({report.targets[name]})" if name in report.targets else "")
            for name, value in report.ratios.items()
        )
        lines.append(f"| {report.scenario} | {ours} | {baselines} | {ratios} |")
    return "\n".join(lines)


def load_saved(name: str, results: Path = RESULTS) -> Report | None:
    """A scenario's last saved report from `results` (`benchmarks/results/`), if any."""
    path = results / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return Report(
        data["scenario"],
        data["results"],
        data["ratios"],
        data["targets"],
        data["notes"],
        data.get("machine") or machine(),
    )


def draw_saved(results: Path = RESULTS) -> int:
    """`outbound bench --chart-only`: redraw the chart from the JSON saved under `results`,
    running nothing (a chart change needs no new measurements)."""
    reports = [report for name in SCENARIOS if (report := load_saved(name, results))]
    if not reports:
        print(f"no saved results under {results.resolve()} (run `outbound bench` first)")
        return 1
    render_chart(reports, results / "throughput.png")
    print(f"wrote {results.resolve() / 'throughput.png'} from {len(reports)} saved result(s)")
    return 0


def run_suite(quick: bool = False, only: list[str] | None = None, results: Path = RESULTS) -> int:
    """Run every scenario (or `only` these, keeping the others' saved results in the table);
    write each report, the table and the chart under `results` (relative: to the cwd)."""
    reports: list[Report] = []
    results.mkdir(parents=True, exist_ok=True)
    for name in SCENARIOS:
        if only and name not in only:
            saved = load_saved(name, results)
            if saved is not None:
                reports.append(saved)
            continue
        try:
            module = importlib.import_module(f"outbound.benchmarks.{name}")
        except ModuleNotFoundError:
            print(f"(scenario {name} is not available)")
            continue
        started = time.monotonic()
        report = module.run(quick=quick)
        print(report.render(), f"\n  ({time.monotonic() - started:.0f} s)", flush=True)
        report.save(results / f"{name}.json")
        reports.append(report)
    table = render_table(reports)
    print("\n" + table)
    (results / "summary.md").write_text(
        f"Measured with `outbound bench{' --quick' if quick else ''}` on {machine()}\n\n"
        + table
        + "\n"
    )
    render_chart(reports, results / "throughput.png")
    where = results.resolve()
    print(f"\nwrote {where / 'throughput.png'}, {where / 'summary.md'} and {where}/*.json")
    below = [
        f"{report.scenario}.{name}"
        for report in reports
        for name, target in report.targets.items()
        if name in report.ratios and not meets_target(report.ratios[name], target)
    ]
    if below:
        print(f"below target: {', '.join(below)}")
    return 0
