"""The `outbound` command: `demo`, `serve`, `replay`, `bench` and `config`.

Owns argument parsing and checking, and the hint for a missing optional extra;
each subcommand's work lives in its own module (`outbound.demo`,
`outbound.demo_cluster`, `outbound.serve`, `outbound.replay_command`,
`outbound.benchmarks`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from outbound import __version__
from outbound.benchmarks.suite import RESULTS, SCENARIOS

DISTRIBUTION = "outbound-runtime"
MAX_DEMO_NODES = 16  # `outbound demo --nodes`: processes on one machine
#: Top-level modules each optional extra brings, for the hint when one is missing.
EXTRAS = {
    "embedded": {"pgserver", "moto", "aiosmtpd", "werkzeug", "flask", "boto3"},
    "bench": {"matplotlib", "psutil"},
}


def _with_extra(extra: str, command: Callable[[], int]) -> int:
    """Run `command`; a module of `extra` that is not installed gives a hint, not a traceback."""
    try:
        return command()
    except ModuleNotFoundError as error:
        top = (error.name or "").partition(".")[0]
        if top not in EXTRAS[extra]:
            raise
        print(
            f"outbound: this command needs the {extra!r} extra ({top} is not installed): "
            f"pip install '{DISTRIBUTION}[{extra}]'",
            file=sys.stderr,
        )
        return 2


DESCRIPTION = """\
Outbound runs workflow code for events and delivers what it sends (HTTP, email,
S3, SQL, SSE, emit) with retries, dead letters and, optionally, a journal.
Settings come from OUTBOUND_* environment variables (`outbound config`).
"""
EPILOG = """\
examples:
  outbound demo                  try it with embedded services, nothing to set up
  outbound serve --app app:rt    serve your Runtime's HTTP API (like uvicorn)
  outbound config                every OUTBOUND_* variable, its value and meaning
  outbound replay --dry-run      what would be sent again from the dead letters
  outbound bench --list          the benchmark scenarios

`outbound COMMAND -h` describes a command and its options.
"""


def build_parser() -> argparse.ArgumentParser:
    """The `outbound` parser: every command and option has its help text (a test checks)."""
    parser = argparse.ArgumentParser(
        prog="outbound",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"outbound {__version__}", help="print the version"
    )
    commands = parser.add_subparsers(
        dest="command", required=True, title="commands", metavar="COMMAND"
    )

    demo = commands.add_parser(
        "demo",
        help="run sample events through embedded real services",
        description="Run a sample workflow against embedded real services (an HTTP sink, "
        "S3, Postgres, SMTP) and print what was delivered. Needs the 'embedded' extra.",
    )
    demo.add_argument("--events", type=int, default=None, help="number of events to run")
    demo.add_argument("--duration", type=float, default=None, help="seconds to keep sending")
    demo.add_argument("--keep-running", action="store_true", help="keep serving after the run")
    demo.add_argument(
        "--chart",
        metavar="PATH",
        default=None,
        help="at the end, write a PNG of deliveries over time per destination to PATH "
        "(needs the 'bench' extra: matplotlib)",
    )
    demo.add_argument(
        "--nodes",
        type=_node_count,
        default=1,
        help=f"runtime processes in a local cluster on one embedded NATS (1 to {MAX_DEMO_NODES}; "
        "default 1: one in-process runtime)",
    )

    serve = commands.add_parser(
        "serve",
        help="serve a Runtime's HTTP API and SSE streams",
        description="Start your Runtime and serve its HTTP API (POST events, run inspector, "
        "SSE streams, /healthz, /metrics) until SIGINT or SIGTERM, then drain it. Journaled "
        "by default (OUTBOUND_JOURNAL=local unless set); OUTBOUND_API_TOKEN guards the API; "
        "OUTBOUND_LOG_FORMAT=json writes JSON log lines.",
    )
    serve.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="your Runtime, or a function returning it, as module:attribute (like uvicorn)",
    )
    serve.add_argument("--demo", action="store_true", help="serve the built-in demo workflow")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--port", type=int, default=8000, help="port to bind (default 8000; 0: any free port)"
    )

    replay = commands.add_parser(
        "replay",
        help="send dead letters again with their original delivery ids",
        description="Send dead-lettered sends again with their original delivery ids "
        "(Idempotency-Key, Message-ID, _event_id stay the same). With a journal: every "
        "node's dead letters; without: this data dir's files. Each is replayed once.",
    )
    _replay_arguments(replay)

    bench = commands.add_parser(
        "bench",
        help="run the benchmark scenarios",
        description="Measure Outbound against bare baselines, scenario by scenario, and "
        "write each result (JSON), a summary table and a chart under --output. Needs the "
        "'bench' extra.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes, under a minute each")
    bench.add_argument(
        "--only",
        nargs="+",
        choices=SCENARIOS,
        metavar="SCENARIO",
        help="run only these scenarios (names: outbound bench --list); the table and chart "
        "keep the others' saved results",
    )
    bench.add_argument(
        "--list", action="store_true", help="list the scenarios, one line each, and exit"
    )
    bench.add_argument(
        "--chart-only",
        action="store_true",
        help="redraw the chart from the results saved under --output, running nothing",
    )
    bench.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        metavar="DIR",
        help=f"where results and the chart go (default: {RESULTS} under the working directory)",
    )

    config = commands.add_parser(
        "config",
        help="list every OUTBOUND_* variable: value, default, meaning",
        description="Print every OUTBOUND_* environment variable with its current value "
        "(secrets masked), its default and its meaning, then check the configuration "
        "(exit status 1 when a value is not valid).",
    )
    config.add_argument("--json", action="store_true", help="print a JSON list instead")

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "demo":
        return _with_extra("embedded", lambda: _demo(arguments))
    if arguments.command == "serve":
        if arguments.demo:
            return _with_extra("embedded", lambda: _serve(arguments))
        return _serve(arguments)
    if arguments.command == "replay":
        return _replay(arguments)
    if arguments.command == "bench" and arguments.list:
        from outbound.benchmarks.suite import describe_scenarios

        print(describe_scenarios())
        return 0
    if arguments.command == "bench":
        return _with_extra("bench", lambda: _bench(arguments))
    if arguments.command == "config":
        from outbound.config_command import run_config

        return run_config(arguments)
    parser.error(f"unknown command {arguments.command!r}")
    return 2


def _node_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_DEMO_NODES:
        raise argparse.ArgumentTypeError(
            f"--nodes must be a whole number from 1 to {MAX_DEMO_NODES}, got {text!r}"
        )
    return count


# Each imports its module when called: a missing extra shows up inside `_with_extra`.
def _demo(arguments: argparse.Namespace) -> int:
    if arguments.nodes > 1:
        from outbound.demo_cluster import run_cluster_demo

        return run_cluster_demo(arguments)
    from outbound.demo import run_demo

    return run_demo(arguments)


def _serve(arguments: argparse.Namespace) -> int:
    from outbound.serve import run_serve

    return run_serve(arguments)


def _replay_arguments(replay: argparse.ArgumentParser) -> None:
    replay.add_argument("--app", help="module:attribute of your Runtime (default: from OUTBOUND_*)")
    replay.add_argument(
        "--destination", help="only this destination's dead letters (http, sql, ...)"
    )
    replay.add_argument(
        "--since", help="only those dead-lettered at or after this time (ISO 8601 or unix seconds)"
    )
    replay.add_argument(
        "--until", help="only those dead-lettered at or before this time (ISO 8601 or unix seconds)"
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="print what would be replayed; send and mark nothing"
    )
    replay.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the replayed sends to be delivered (default 120)",
    )
    replay.add_argument("--json", action="store_true", help="print the report as JSON")


def _replay(arguments: argparse.Namespace) -> int:
    from outbound.replay_command import run_replay

    return run_replay(arguments)


def _bench(arguments: argparse.Namespace) -> int:
    from outbound.benchmarks.suite import draw_saved, run_suite

    if arguments.chart_only:
        return draw_saved(arguments.output)
    return run_suite(quick=arguments.quick, only=arguments.only, results=arguments.output)


if __name__ == "__main__":
    sys.exit(main())
