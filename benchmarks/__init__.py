"""Benchmarks: each scenario measures Outbound and its baseline in the same process run.

`python -m benchmarks SCENARIO [--quick] [--json PATH]`. A scenario module
exposes `run(quick: bool) -> Report`; `benchmarks.report` prints and saves it.
"""
