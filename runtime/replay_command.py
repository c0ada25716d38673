"""`outbound replay`: send dead letters again from the command line.

Owns `run_replay`: loads the user's Runtime (`--app module:attr`, as `outbound
serve --app` does) or makes one from the environment, starts it, replays
(`Runtime.replay_dead_letters`), waits for the replayed sends to be final
(`--timeout`), stops it and prints what was done per destination. Exit status 0,
or 1 when something could not be read, could not be sent, failed again or was
still pending at the timeout. Must not import the HTTP API.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from outbound.config import Config
from outbound.logs import configure_logging, log_format_from_env
from outbound.replay import parse_time
from outbound.runtime import Runtime
from outbound.serve import load_runtime

logger = logging.getLogger(__name__)


def run_replay(arguments: argparse.Namespace) -> int:
    try:  # bad times and a bad log format are told before anything starts
        configure_logging(log_format_from_env(), level=logging.WARNING)
        parse_time(arguments.since, "--since")
        parse_time(arguments.until, "--until")
    except ValueError as error:
        print(f"outbound replay: {error}", file=sys.stderr)
        return 2
    rt = load_runtime(arguments.app) if arguments.app else Runtime(Config.from_env())
    rt.start()
    try:
        report = rt.replay_dead_letters(
            destination=arguments.destination,
            since=arguments.since,
            until=arguments.until,
            dry_run=arguments.dry_run,
        )
        flushed = rt.flush(timeout=arguments.timeout)
    finally:
        rt.stop(drain=True, timeout=arguments.timeout)
    report.settled()
    if arguments.json:
        print(json.dumps(report.as_dict() | {"pending": report.pending}, indent=2))
    else:
        print(report.describe())
        if not flushed or report.pending:
            print(f"  {report.pending} replayed sends not final after {arguments.timeout:g} s")
    return 0 if report.ok and not report.pending else 1
