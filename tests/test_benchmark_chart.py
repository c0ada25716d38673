"""The benchmark chart drawn from saved results: a log axis where values span orders of
magnitude, targets as drawn ticks, and `outbound bench --chart-only` running nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from outbound.benchmarks.chart import comparisons, limits, render_chart, wants_log_scale
from outbound.benchmarks.suite import load_saved
from outbound.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Like benchmarks/results/runs.json: the bare loop is ~20x ours, so a linear axis would
#: flatten ours; the thread-per-run baseline sits within 10x.
RUNS = {
    "scenario": "runs",
    "results": {
        "ours (pooled actors)": {"runs": 1000, "runs_per_s": 13000.0},
        "thread_per_run": {"runs": 1000, "runs_per_s": 2500.0},
        "bare_loop": {"runs": 1000, "runs_per_s": 290000.0},
    },
    "ratios": {"vs_thread_per_run": 5.2, "vs_bare_loop": 0.045},
    "targets": {"vs_thread_per_run": ">= 3.0"},
    "notes": [],
    "machine": {"python": "3.11.7", "platform": "test", "cpus": 2, "processor": "x86_64"},
}
#: Values within 10x of each other, and a `<=` limit.
S3 = {
    "scenario": "s3",
    "results": {
        "ours (1,000 sends per run)": {"events": 100, "events_per_s": 60000.0},
        "raw_minio_put_object": {"events": 100, "events_per_s": 90000.0},
        "objects": {"objects_per_100k_events": 10.0},
    },
    "ratios": {"vs_raw_minio": 0.66, "objects_per_100k_events": 10.0},
    "targets": {"vs_raw_minio": ">= 0.5", "objects_per_100k_events": "<= 10"},
    "notes": [],
    "machine": RUNS["machine"],
}


@pytest.fixture
def saved_results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    results.mkdir()
    for report in (RUNS, S3):
        (results / f"{report['scenario']}.json").write_text(json.dumps(report))
    return results


def test_chart_uses_a_log_axis_only_where_values_span_more_than_ten_times(
    saved_results: Path, tmp_path: Path
) -> None:
    reports = [load_saved("runs", saved_results), load_saved("s3", saved_results)]
    assert all(reports)
    path = tmp_path / "chart" / "throughput.png"
    summary = render_chart([report for report in reports if report], path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert 10_000 < path.stat().st_size < 400_000
    assert summary.scales["runs"] == "log"  # 290,000 vs 2,500: over 100x
    assert summary.scales["s3"] == "linear"  # 90,000 vs 60,000
    assert summary.scales["ratios"] == "log"  # 0.045 to 5.2
    assert summary.scales["limits"] == "linear"
    assert wants_log_scale([1.0, 10.5]) and not wants_log_scale([1.0, 10.0])


def test_chart_keeps_every_stated_target_and_only_higher_is_better_ratios(
    saved_results: Path,
) -> None:
    reports = [report for name in ("runs", "s3") if (report := load_saved(name, saved_results))]
    drawn = {ratio.name: ratio for ratio in comparisons(reports)}
    assert set(drawn) == {"vs_thread_per_run", "vs_bare_loop", "vs_raw_minio"}
    assert str(drawn["vs_thread_per_run"].target) == "≥ 3"
    assert drawn["vs_bare_loop"].target is None
    assert drawn["vs_raw_minio"].label == "s3: vs raw_minio"
    bounded = limits(reports)
    assert [(ratio.name, str(ratio.target)) for ratio in bounded] == [
        ("objects_per_100k_events", "≤ 10")
    ]


def test_bench_chart_only_redraws_from_saved_json_into_output(
    saved_results: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    before = {path.name: path.read_text() for path in saved_results.glob("*.json")}
    assert main(["bench", "--chart-only", "--output", str(saved_results)]) == 0
    chart = saved_results / "throughput.png"
    assert chart.read_bytes().startswith(PNG_SIGNATURE)
    assert f"wrote {chart.resolve()} from 2 saved result(s)" in capsys.readouterr().out
    # nothing measured, nothing rewritten, nothing under the working directory's benchmarks/
    assert {path.name: path.read_text() for path in saved_results.glob("*.json")} == before
    assert not (saved_results / "summary.md").exists()
    assert not (tmp_path / "benchmarks").exists()
    empty = tmp_path / "empty"
    assert main(["bench", "--chart-only", "--output", str(empty)]) == 1
    assert "no saved results" in capsys.readouterr().out
