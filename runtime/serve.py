"""`outbound serve`: serve a user's Runtime (or the built-in demo) over HTTP until a signal.

Owns loading `module:attr` (like `uvicorn module:app`; `attr` may also be a
function returning the Runtime), the bind-address warning, the process's
logging (`outbound.logs`: plain lines, or JSON lines with
OUTBOUND_LOG_FORMAT=json, its own lines included), the signal handling and the
shutdown order: on SIGINT/SIGTERM it ends every SSE stream,
stops hypercorn, drains the runtime (`stop(drain=True)`) and exits 0. The
built-in demo (`--demo`) is a workflow that sends an HTTP request to an
embedded sink and an SSE event, triggered every few seconds. A served
runtime is durable by default: `OUTBOUND_JOURNAL` is `local` unless set
(`JOURNAL_DEFAULT`), read by the app's own `Config.from_env()`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import ipaddress
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from outbound.api import ApiServer
from outbound.config import Config
from outbound.gc_tuning import tune_for_command
from outbound.logs import configure_logging, log_format_from_env
from outbound.runtime import Runtime
from outbound.signals import SignalHandlers

logger = logging.getLogger(__name__)

DEMO_WORKFLOW = "p_demo"

#: What `outbound serve` (and `outbound demo`) journal with unless OUTBOUND_JOURNAL is set:
#: a service should not lose what it acknowledged when its process is killed.
JOURNAL_DEFAULT = "local"


def load_runtime(spec: str) -> Runtime:
    """Import `module:attr` (from the current directory too) and return its Runtime."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"--app must look like module:attribute, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit(f"--app {spec}: cannot import {module_name!r}: {error}") from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise SystemExit(f"--app {spec}: {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(target, Runtime) and callable(target):
        target = target()
    if not isinstance(target, Runtime):
        raise SystemExit(f"--app {spec}: expected a runtime.Runtime, got {type(target).__name__}")
    return target


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def demo_runtime(interval: float = 3.0) -> Iterator[Runtime]:
    """A runtime with one workflow that posts to an embedded HTTP sink and sends SSE events."""
    from outbound.embedded import HttpSink

    sink = HttpSink().start()
    runtime = Runtime(Config.from_env())

    @runtime.workflow(DEMO_WORKFLOW)
    def demo(event: Any, ctx: Any) -> None:
        ctx.send.http(url=f"{sink.url}/hook", method="POST", data=event)
        ctx.send.sse(channel="events", payload=event)

    stop = threading.Event()

    def tick() -> None:
        number = 0
        while not stop.wait(interval):
            number += 1
            with contextlib.suppress(RuntimeError):
                runtime.submit(DEMO_WORKFLOW, {"tick": number, "at": time.time()})

    ticker = threading.Thread(target=tick, name="outbound-demo-ticker", daemon=True)
    try:
        ticker.start()
        yield runtime
    finally:
        stop.set()
        ticker.join(5)
        sink.stop()


def serve(runtime: Runtime, host: str, port: int, say: Callable[[str], None]) -> int:
    """Start `runtime`, serve its API until SIGINT/SIGTERM, then drain it.

    Returns 0 after a signal (undeliverable sends are dead-lettered, never
    dropped), 1 when the address cannot be bound.
    """
    if not is_loopback(host) and not runtime.config.api_token:
        say(
            f"WARNING: serving on {host} without OUTBOUND_API_TOKEN: anyone who can reach "
            "this address can trigger workflows and read streams"
        )
    stop = threading.Event()
    # The same handlers as Runtime.install_signal_handlers(), but the signal only
    # wakes this thread: the API server must stop before the runtime drains.
    handlers = SignalHandlers(lambda *_: stop.set()).install()
    try:
        runtime.start()
        try:
            server = ApiServer(runtime, host, port).start()
        except OSError as error:
            say(f"outbound: cannot listen on {host}:{port}: {error}")
            return 1
        say(f"outbound: serving on {server.url} (workflows: {', '.join(runtime.workflows)})")
        for workflow_id in runtime.workflows:
            say(f"  SSE stream: {server.url}/pipelines/{workflow_id}/sse")
        while not stop.wait(0.5):
            pass
        say("outbound: stopping: closing SSE streams and draining deliveries")
        server.stop()
        report = runtime.stop(drain=True)
    finally:
        handlers.restore()
        if runtime.running:
            runtime.stop(drain=True)
    if report.drained:
        say("outbound: stopped; every delivery is final")
    elif report.left_in_journal:
        say(
            f"outbound: stopped; {report.left_in_journal} undelivered sends stay in the "
            "journal and are delivered at the next start"
        )
    else:
        say(
            f"outbound: stopped; {report.dead_lettered} undelivered sends written to "
            f"{report.dead_letter_dir}"
        )
    return 0


def run_serve(arguments: argparse.Namespace) -> int:
    """Entry point of `outbound serve` (argument parsing lives in runtime.cli)."""

    # This command owns its process: it configures logging (library code never does).
    try:
        log_format = log_format_from_env()
    except ValueError as error:
        raise SystemExit(f"outbound serve: {error}") from None
    configure_logging(log_format)

    def say(line: str) -> None:
        warning = line.startswith("WARNING")
        if log_format == "json":  # every line a JSON object, as a log shipper expects
            logger.log(logging.WARNING if warning else logging.INFO, line.removeprefix("WARNING: "))
            return
        print(line, file=sys.stderr if warning else sys.stdout, flush=True)

    # This command owns its process: it tunes the collector (see outbound.gc_tuning).
    if arguments.demo:
        with demo_runtime() as runtime:
            tune_for_command()
            return serve(runtime, arguments.host, arguments.port, say)
    if not arguments.app:
        raise SystemExit("outbound serve: give --app module:attribute or --demo")
    os.environ.setdefault("OUTBOUND_JOURNAL", JOURNAL_DEFAULT)  # before the app reads it
    runtime = load_runtime(arguments.app)
    tune_for_command()
    return serve(runtime, arguments.host, arguments.port, say)
