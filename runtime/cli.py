"""The `outbound` command: `demo`, `serve` and `bench`.

Owns argument parsing only; each subcommand's work lives in its own module
(`runtime.demo`, `runtime.serve`, `benchmarks`).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="outbound", description="Outbound event-delivery runtime")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run sample events through embedded real services")
    demo.add_argument("--events", type=int, default=None, help="number of events to run")
    demo.add_argument("--duration", type=float, default=None, help="seconds to keep sending")
    demo.add_argument("--keep-running", action="store_true", help="keep serving after the run")

    bench = commands.add_parser("bench", help="run every benchmark scenario")
    bench.add_argument("--quick", action="store_true", help="small sizes, under a minute each")

    arguments = parser.parse_args(argv)
    if arguments.command == "demo":
        from runtime.demo import run_demo

        return run_demo(arguments)
    if arguments.command == "bench":
        from benchmarks.suite import run_suite

        return run_suite(quick=arguments.quick)
    parser.error(f"unknown command {arguments.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
