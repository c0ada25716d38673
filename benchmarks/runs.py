"""`runs`: workflow runs per second, each doing one `ctx.send.to(...)` to an in-memory destination.

Ours (runs as pooled actors) vs the same runtime with one `pykka.ThreadingActor`
per run, and vs a bare loop calling the function and appending to a list (the
physical limit). Timed from the first submit until every run has handed off
(the ledger counts a run finished once its sends are handed over).
"""

from __future__ import annotations

from typing import Any

import pykka

from outbound import Config, Runtime
from outbound.benchmarks.common import Counting, Stopwatch, rate
from outbound.benchmarks.report import Report
from outbound.run import WorkflowRun


class ThreadPerRun(WorkflowRun):
    """The same run, on pykka's stock actor type: one OS thread per run."""

    registered = True
    _create_actor_inbox = staticmethod(pykka.ThreadingActor._create_actor_inbox)
    _create_future = staticmethod(pykka.ThreadingActor._create_future)
    _start_actor_loop = pykka.ThreadingActor._start_actor_loop
    _stop = pykka.Actor._stop
    use_daemon_thread = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pykka.Actor.__init__(self)  # a stock inbox, URN and stop event


def workflow(event: Any, ctx: Any) -> None:
    ctx.send.to("memory", event)


def measure_runtime(runs: int, actor_type: type[WorkflowRun]) -> float:
    rt = Runtime(Config(gc_tuning=True))
    rt.run_actor_type = actor_type
    rt.add_destination("memory", lambda _config: Counting.start())
    rt.register("p_bench", workflow)
    with rt:
        for _ in range(min(runs, 1000)):  # warm-up
            rt.submit("p_bench", 0)
        rt.flush(60)
        submit = rt.submit
        with Stopwatch() as watch:
            # A producer that fires runs and does not keep their futures (holding
            # 100k futures would measure the harness's memory, not the runtime).
            for n in range(runs):
                submit("p_bench", n)
            assert rt.ledger.wait_runs(300), "runs did not all finish"
        assert rt.flush(60), "runs did not all deliver"
        assert rt.stats()["runs"].get("succeeded", 0) >= runs
    return rate(runs, watch.seconds)


def measure_bare_loop(runs: int) -> float:
    class Ctx:
        def __init__(self) -> None:
            self.outbox: list[Any] = []
            self.send = self

        def to(self, destination: str, payload: Any) -> None:
            self.outbox.append((destination, payload))

    with Stopwatch() as watch:
        for n in range(runs):
            workflow(n, Ctx())
    return rate(runs, watch.seconds)


def run(quick: bool = False, runs: int | None = None) -> Report:
    runs = runs or (20_000 if quick else 100_000)
    baseline_runs = max(1000, runs // 4)  # a thread per run is slow: fewer, same rate
    ours = measure_runtime(runs, WorkflowRun)
    threads = measure_runtime(baseline_runs, ThreadPerRun)
    bare = measure_bare_loop(runs)
    return Report(
        "runs",
        results={
            "ours (pooled actors)": {"runs": runs, "runs_per_s": ours},
            "thread_per_run": {"runs": baseline_runs, "runs_per_s": threads},
            "bare_loop": {"runs": runs, "runs_per_s": bare},
        },
        ratios={"vs_thread_per_run": ours / threads, "vs_bare_loop": ours / bare},
        targets={"vs_thread_per_run": ">= 3.0"},
        notes=["target: >= 20,000 runs/s on a 2-core machine"],
    )
