"""`python -m benchmarks SCENARIO [--quick] [--json PATH] [--nodes 1,2]` (`all`: every one).

Also `python -m outbound.benchmarks`; `outbound bench` runs the whole suite.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from outbound.benchmarks.suite import SCENARIOS


def available() -> list[str]:
    found = []
    for name in SCENARIOS:
        try:
            importlib.import_module(f"outbound.benchmarks.{name}")
        except ModuleNotFoundError:
            continue
        found.append(name)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    parser.add_argument(
        "--nodes", metavar="N,N", help="cluster only: node counts to compare (default 1,2)"
    )
    arguments = parser.parse_args(argv)
    options = {}
    if arguments.nodes:
        if arguments.scenario != "cluster":
            parser.error("--nodes applies to the cluster scenario only")
        try:
            options["nodes"] = [int(count) for count in arguments.nodes.split(",")]
        except ValueError:
            parser.error(f"--nodes: node counts separated by commas, not {arguments.nodes!r}")
    names = available() if arguments.scenario == "all" else [arguments.scenario]
    reports = []
    for name in names:
        module = importlib.import_module(f"outbound.benchmarks.{name}")
        report = module.run(quick=arguments.quick, **options)
        print(report.render(), flush=True)
        reports.append(report)
    if arguments.json:
        if len(reports) == 1:
            reports[0].save(arguments.json)
        else:
            import json
            from pathlib import Path

            Path(arguments.json).write_text(
                json.dumps([report.as_json() for report in reports], indent=2) + "\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
