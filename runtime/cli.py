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

    serve = commands.add_parser("serve", help="serve a Runtime's HTTP API and SSE streams")
    serve.add_argument("--app", help="module:attribute of your Runtime (like uvicorn)")
    serve.add_argument("--demo", action="store_true", help="serve the built-in demo workflow")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")

    bench = commands.add_parser("bench", help="run every benchmark scenario")
    bench.add_argument("--quick", action="store_true", help="small sizes, under a minute each")
    bench.add_argument(
        "--only",
        nargs="+",
        metavar="SCENARIO",
        help="run only these scenarios; the table and chart keep the others' saved results",
    )
    bench.add_argument("--list", action="store_true", help="list the scenarios and exit")

    arguments = parser.parse_args(argv)
    if arguments.command == "demo":
        from runtime.demo import run_demo

        return run_demo(arguments)
    if arguments.command == "serve":
        from runtime.serve import run_serve

        return run_serve(arguments)
    if arguments.command == "bench" and arguments.list:
        from benchmarks.suite import describe_scenarios

        print(describe_scenarios())
        return 0
    if arguments.command == "bench":
        from benchmarks.suite import run_suite

        return run_suite(quick=arguments.quick, only=arguments.only)
    parser.error(f"unknown command {arguments.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
