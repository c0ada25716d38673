"""Cyclic-GC tuning for a process that runs thousands of workflows a second.

Owns `tune_garbage_collector()` and the rule for when a command turns it on.
It is a process-wide side effect (it freezes every object that exists and
changes the collector's thresholds for all the code in the process), so the
library never does it by itself: a `Runtime` does it at start only with
`Config.gc_tuning` (`OUTBOUND_GC_TUNING=1`); the commands that own their process
(`outbound serve`, `outbound demo`) and the benchmarks turn it on explicitly.
Knows nothing of runtimes; must not import the runtime, actors or destinations.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping

from outbound.config import Config

GC_FIRST_THRESHOLD = 5_000  # young objects between collections (CPython's default: 700)
_gc_frozen = False


def tune_garbage_collector() -> None:
    """Make the cyclic GC cheaper for a process that runs thousands of workflows a second.

    Measured here: with CPython's defaults, collections of the older generations
    (which walk every long-lived object again) took a third of a run's cost.
    `gc.freeze()` at the first call in a process takes what exists then
    (modules, classes, clients) out of those walks, and a higher first
    threshold makes them ten times rarer (runs/s +20 %). A threshold already
    set higher is kept.
    """
    global _gc_frozen
    if not _gc_frozen:
        # Once per process: what is frozen is never collected, so freezing at
        # every start would keep each stopped runtime's cycles alive for good.
        _gc_frozen = True
        gc.collect()
        gc.freeze()
    first, second, third = gc.get_threshold()
    if first < GC_FIRST_THRESHOLD:
        gc.set_threshold(GC_FIRST_THRESHOLD, second, third)


def tune_for_command(environ: Mapping[str, str] | None = None) -> bool:
    """For a command that owns its process (`outbound serve`, `outbound demo`): tune the
    collector unless `OUTBOUND_GC_TUNING` turns it off. Returns whether it did.

    The variable is parsed by `Config`'s own rules, so a malformed value fails
    naming itself.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("OUTBOUND_GC_TUNING", "")
    wanted = not raw.strip() or Config.from_env({"OUTBOUND_GC_TUNING": raw}).gc_tuning
    if wanted:
        tune_garbage_collector()
    return wanted
