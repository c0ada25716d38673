"""GC tuning is a process-wide side effect: off in the library, on for the commands that own
their process. Each check runs in a fresh interpreter, as the collector is the process's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any


def in_fresh_python(code: str, cwd: Path, env: dict[str, str] | None = None) -> Any:
    """Run `code` in a new interpreter; it prints one JSON value, returned here."""
    import os

    environment = {k: v for k, v in os.environ.items() if k != "OUTBOUND_GC_TUNING"}
    finished = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout.strip().splitlines()[-1])


START_A_RUNTIME = """
    import gc, json
    from outbound import Config, Runtime
    before = gc.get_threshold()
    rt = Runtime(Config.from_env(data_dir="data", **OVERRIDES))
    rt.register("p", lambda event, ctx: None)
    with rt:
        rt.run("p", 1)
    print(json.dumps({"before": before, "after": gc.get_threshold(),
                      "frozen": gc.get_freeze_count()}))
"""


def test_a_runtime_leaves_the_collector_alone_by_default(tmp_path: Path) -> None:
    seen = in_fresh_python(START_A_RUNTIME.replace("OVERRIDES", "{}"), tmp_path)
    assert seen["after"] == seen["before"]
    assert seen["frozen"] == 0


def test_config_gc_tuning_or_its_variable_turns_it_on(tmp_path: Path) -> None:
    by_config = in_fresh_python(
        START_A_RUNTIME.replace("OVERRIDES", "{'gc_tuning': True}"), tmp_path
    )
    by_variable = in_fresh_python(
        START_A_RUNTIME.replace("OVERRIDES", "{}"), tmp_path, {"OUTBOUND_GC_TUNING": "1"}
    )
    for seen in (by_config, by_variable):
        assert seen["after"][0] == 5000 and seen["after"][1:] == seen["before"][1:]
        assert seen["frozen"] > 0


COMMAND_RULE = """
    import gc, json
    from outbound.gc_tuning import tune_for_command
    try:
        tuned = tune_for_command()
    except ValueError as error:
        tuned = str(error)
    print(json.dumps({"tuned": tuned, "threshold": gc.get_threshold()[0]}))
"""


def test_commands_tune_unless_the_variable_turns_it_off(tmp_path: Path) -> None:
    assert in_fresh_python(COMMAND_RULE, tmp_path) == {"tuned": True, "threshold": 5000}
    off = in_fresh_python(COMMAND_RULE, tmp_path, {"OUTBOUND_GC_TUNING": "0"})
    assert off["tuned"] is False and off["threshold"] < 5000
    bad = in_fresh_python(COMMAND_RULE, tmp_path, {"OUTBOUND_GC_TUNING": "maybe"})
    assert "OUTBOUND_GC_TUNING='maybe'" in bad["tuned"]
