"""The `outbound` command: `demo`, `serve`, `replay` and `bench`.

Owns argument parsing and checking, and the hint for a missing optional extra;
each subcommand's work lives in its own module (`outbound.demo`,
`outbound.demo_cluster`, `outbound.serve`, `outbound.replay_command`,
`outbound.benchmarks`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from outbound import __version__

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="outbound", description="Outbound event-delivery runtime")
    parser.add_argument("--version", action="version", version=f"outbound {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run sample events through embedded real services")
    demo.add_argument("--events", type=int, default=None, help="number of events to run")
    demo.add_argument("--duration", type=float, default=None, help="seconds to keep sending")
    demo.add_argument("--keep-running", action="store_true", help="keep serving after the run")
    demo.add_argument(
        "--nodes",
        type=_node_count,
        default=1,
        help=f"runtime processes in a local cluster on one embedded NATS (1 to {MAX_DEMO_NODES}; "
        "default 1: one in-process runtime)",
    )

    serve = commands.add_parser("serve", help="serve a Runtime's HTTP API and SSE streams")
    serve.add_argument("--app", help="module:attribute of your Runtime (like uvicorn)")
    serve.add_argument("--demo", action="store_true", help="serve the built-in demo workflow")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")

    replay = commands.add_parser(
        "replay",
        help="send dead letters again with their original delivery ids",
        description="Send dead-lettered sends again with their original delivery ids "
        "(Idempotency-Key, Message-ID, _event_id stay the same). With a journal: every "
        "node's dead letters; without: this data dir's files. Each is replayed once.",
    )
    _replay_arguments(replay)

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
    from outbound.benchmarks.suite import run_suite

    return run_suite(quick=arguments.quick, only=arguments.only)


if __name__ == "__main__":
    sys.exit(main())
