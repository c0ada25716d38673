"""The `Runtime` facade: the embedding API of the public contract, and nothing else.

Owns a runtime's registrations (workflows, subscriptions, destination
factories), its state (new, starting, running, stopping, stopped) and the
public methods; each does its work through the module that owns it:
`outbound.machinery` (the threads and actors of one start),
`outbound.backpressure` (admission and the batch memory budget),
`outbound.handoff` (runs' sends into the destinations' inboxes),
`outbound.shutdown` (drain, dead-letter, report), `outbound.gc_tuning`, and
`outbound.run` (the run actors). Those modules take what they need as
arguments and never import this one; neither does the HTTP API
(`outbound.api`, imported lazily by `asgi_app()`). Delivery logic lives in
`outbound.destinations`; this module only wires the built-in ones.
"""

from __future__ import annotations

import atexit
import functools
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pykka

from outbound.actors import ChildSpec
from outbound.actors.loops import LoopThread
from outbound.admission import poll_admission
from outbound.backpressure import Backpressure
from outbound.config import Config
from outbound.deadlines import time_left
from outbound.destinations.base import Services
from outbound.destinations.deadletter import DeadLetterWriter
from outbound.destinations.delivery import Delivery, Ledger
from outbound.destinations.emit.log import EmitLog, Subscriptions
from outbound.destinations.registry import DESTINATION_KINDS
from outbound.destinations.sse.hub import SseHub
from outbound.gc_tuning import tune_garbage_collector
from outbound.handoff import flush_destinations
from outbound.machinery import Machinery
from outbound.run import RunFuture, RunResult, WorkflowRun
from outbound.runs import RunStarter, UnknownWorkflowError, Workflows, await_run
from outbound.shutdown import Shutdown, ShutdownReport, Stopping, dead_letter_left_by, stop_runtime
from outbound.signals import SignalHandlers

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
DestinationFactory = Callable[[Config], pykka.ActorRef[Any]]


@dataclass(frozen=True, slots=True)
class _Builtin:
    """A built-in destination's factory: `start(services)` with the services of each start.

    Not a closure over the runtime: the factories outlive a stop (so the
    runtime can start again), and a closure would tie the runtime into a
    reference cycle that `_let_go_of_machinery` exists to avoid.
    """

    start: Callable[[Services], pykka.ActorRef[Any]]


class Runtime:
    """Runs workflows and delivers what they send. Use it as a context manager."""

    #: The actor type of runs; benchmarks swap in a thread-per-run type to compare.
    run_actor_type: type[WorkflowRun] = WorkflowRun
    #: The SSE destination's hub (streams, history, subscribers), read by the HTTP API.
    sse_hub: SseHub
    _stopping: Stopping | None = None  # set while stop() runs
    _machinery: Machinery | None = None  # the threads and actors of the current start

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else Config.from_env()
        # Backpressure: runs and sends in flight, taken at submit, given back as sends settle.
        self._backpressure = Backpressure(self.config.max_pending, self.config.batch_memory_cap)
        self.ledger = Ledger(
            self.config.run_history,
            delivery_history=self.config.delivery_history,
            dead_letters=DeadLetterWriter(self.config.data_dir),  # failed sends, when they fail
            on_final=self._backpressure.sends_final,
        )
        self._failed_destinations: dict[str, BaseException] = {}  # given up on by the supervisor
        self._workflows = Workflows()
        self._runs = RunStarter(self.ledger, self._backpressure.admission)
        self._factories: dict[str, DestinationFactory | _Builtin] = {}
        self._refs: dict[str, pykka.ActorRef[Any]] = {}
        self._signal_handlers: SignalHandlers | None = None
        self._state = "new"
        self._state_lock = threading.Lock()
        self.supervisor_error: BaseException | None = None
        self._subscriptions = Subscriptions()
        self._emit_log = EmitLog()
        self._register_builtin_destinations()

    # -- registration ----------------------------------------------------------

    def workflow(
        self, workflow_id: str, listens_to: list[str] | tuple[str, ...] = ()
    ) -> Callable[[F], F]:
        """Decorator: `@rt.workflow("p_orders")` registers `fn(event, ctx)`.

        `listens_to=["p_a"]` also runs it with every event `p_a` emits.
        """

        def register(fn: F) -> F:
            self.register(workflow_id, fn, listens_to=listens_to)
            return fn

        return register

    def register(
        self,
        workflow_id: str,
        fn: Callable[..., Any],
        listens_to: list[str] | tuple[str, ...] = (),
    ) -> None:
        """Register `fn(event, ctx)` (sync or `async def`) under `workflow_id`."""
        if isinstance(listens_to, str):
            raise TypeError(f"workflow {workflow_id!r}: listens_to must be a list of workflow ids")
        self._workflows.add(workflow_id, fn)
        for emitter in listens_to:
            self.subscribe(listener=workflow_id, emitter=emitter)

    def subscribe(self, listener: str, emitter: str) -> None:
        """Run workflow `listener` with every event that workflow `emitter` emits.

        The emitter need not be registered yet; the listener must be.
        """
        if listener not in self._workflows:
            raise UnknownWorkflowError(
                f"no workflow {listener!r} to subscribe; register it before subscribing it"
            )
        self._subscriptions.subscribe(listener, emitter)

    def emits(self, workflow_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The events `workflow_id` emitted (its last 1,000), oldest first.

        Each is `{id, workflow_id, run_id, emitted_at, depth, raw_event,
        listener_runs: [{workflow_id, run_id}], status, error}`; `limit` keeps
        only the most recent ones.
        """
        return self._emit_log.list(workflow_id, limit)

    @property
    def workflows(self) -> list[str]:
        return self._workflows.ids()

    def add_destination(self, name: str, factory: DestinationFactory) -> None:
        """Add a destination actor built by `factory(config)`; send with `ctx.send.to(name, ...)`.

        The factory must return `SomeDestination.start(...)` for a subclass of
        `destinations.base.Destination` (or any actor mixing in `actors.Supervised`).
        """
        if not isinstance(name, str) or not name:
            raise ValueError("destination name must be a non-empty string")
        if name in self._factories:
            raise ValueError(f"a destination named {name!r} is already added")
        self._factories[name] = factory
        if self._state == "running":
            self._start_destination(name, factory)

    def _register_builtin_destinations(self) -> None:
        # Each is started with the services of the current start (see `_Builtin`).
        self.sse_hub = SseHub.from_config(self.config)
        for kind in DESTINATION_KINDS:  # destinations/registry.py
            if kind.is_enabled(self.config):
                start = kind.starter(
                    self.config,
                    subscriptions=self._subscriptions,
                    emit_log=self._emit_log,
                    sse_hub=self.sse_hub,
                )
                self._factories[kind.name] = _Builtin(start)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> Runtime:
        """Start loops, timers, the supervisor and every destination actor.

        A stopped runtime may be started again (a lifespan per test, an app
        factory): its workflows, destinations and history are kept; loops,
        pool and destination actors are made anew.
        """
        with self._state_lock:
            if self._state == "running":
                return self
            if self._state not in ("new", "stopped"):
                raise RuntimeError(f"the runtime is {self._state}; wait for that to finish")
            self._state = "starting"
        if self.config.gc_tuning:
            tune_garbage_collector()
        self._backpressure.reopen()
        self.supervisor_error = None
        self._machinery = Machinery.start(
            self.config,
            self.ledger,
            self._backpressure,
            self._refs,
            self._failed_destinations,
            submit_child_run=self._submit_child_run,
            on_give_up=self._on_supervisor_gave_up,
        )
        for name, factory in self._factories.items():
            self._start_destination(name, factory)
        self._state = "running"
        atexit.register(self._stop_at_exit)
        return self

    def _stop_at_exit(self) -> None:
        """A runtime still running when the interpreter exits is drained, not abandoned."""
        if self._state == "running":
            logger.warning("the runtime was not stopped; stopping it (and draining) at exit")
            self.stop(drain=True)

    def _start_destination(self, name: str, factory: DestinationFactory | _Builtin) -> None:
        machinery = self._machinery
        assert machinery is not None
        if isinstance(factory, _Builtin):
            spec = ChildSpec(name, functools.partial(factory.start, machinery.services))
        else:
            spec = ChildSpec(name, functools.partial(factory, self.config))
        ref = machinery.start_destination(spec)
        if getattr(ref.actor_class, "batched", False):
            self._backpressure.batched.add(name)
        self._refs[name] = ref

    def _on_supervisor_gave_up(self, error: BaseException) -> None:
        """A destination crash-looped: settle what it held at once; the others go on.

        Runs on the supervisor's thread. Later sends to it fail at hand-off.
        """
        self.supervisor_error = error
        name = getattr(error, "child", "")
        self._failed_destinations[name] = error
        logger.error("destination %r stopped for good: %s", name, error)
        ref = self._refs.get(name)
        if ref is not None:
            reason = "the destination stopped for good"
            dead_letter_left_by(name, ref, reason, self._backpressure, error)

    def stop(self, drain: bool = True, timeout: float | None = None) -> ShutdownReport:
        """Stop the runtime. With `drain`, wait up to `timeout` s for runs and deliveries.

        Whatever is still undelivered at the deadline is written to
        `<data_dir>/dead-letter/` and counted in the report; nothing accepted
        is dropped silently. Never raises: what goes wrong is logged and listed
        in `report.errors`, and every other destination is still dead-lettered.
        A second `stop()` while one runs waits for it and returns its report.
        """
        with self._state_lock:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                return ShutdownReport(drained=True)
            stopping = self._stopping
            first = self._state != "stopping" or stopping is None
            if first:
                self._state = "stopping"
                stopping = self._stopping = Stopping()
        assert stopping is not None
        if not first:
            stopping.done.wait()
            return stopping.report
        machinery = self._machinery
        shutdown = Shutdown(
            self.ledger,
            self._backpressure,
            self._refs,
            self._failed_destinations,
            machinery.supervisor if machinery is not None else None,
            self.config.data_dir,
            self.config.shutdown_timeout,
        )
        try:
            stopping.report = stop_runtime(shutdown, drain, timeout, self._let_go_of_machinery)
        finally:
            self._state = "stopped"
            self._stopping = None
            self._failed_destinations.clear()  # a restart starts every destination afresh
            atexit.unregister(self._stop_at_exit)
            stopping.done.set()
        return stopping.report

    def _let_go_of_machinery(self) -> None:
        # A stopped runtime keeps what can still be read (the ledger: results,
        # deliveries, stats) and what it needs to start again (workflows,
        # destination factories). Letting go of the machinery breaks the
        # reference cycles through it (the pool's hook, the actors' services),
        # so a runtime that is dropped is freed at once, even when gc.freeze()
        # at start took it out of the collector's sight. The built-in factories
        # hold no reference to the runtime (`_Builtin`) for the same reason.
        if self._machinery is not None:
            self._machinery.stop()
        self._machinery = None
        self._refs.clear()

    def install_signal_handlers(self) -> SignalHandlers:
        """Drain on SIGTERM and SIGINT: `stop(drain=True)`, then what the signal did before.

        For a process that embeds a runtime (a worker, a script): the signal
        stops the runtime, waiting up to `OUTBOUND_SHUTDOWN_TIMEOUT` for runs and
        deliveries (what is left is dead-lettered), then chains to the handler
        it replaced: SIGINT raises KeyboardInterrupt, SIGTERM exits with status
        143 (`SystemExit`, so `finally` and `atexit` run). A second signal while
        draining skips the wait. Call it from the main thread (Python runs
        signal handlers only there; elsewhere this raises RuntimeError). Returns
        the handlers; `.restore()` puts the previous ones back.
        """
        if self._signal_handlers is None:
            self._signal_handlers = SignalHandlers(self._drain_on_signal).install()
        return self._signal_handlers

    def _drain_on_signal(self, signum: int, frame: Any) -> None:
        handlers = self._signal_handlers
        if self._state == "running":
            logger.warning("received %s: draining the runtime", signal.Signals(signum).name)
            report = self.stop(drain=True)
            logger.warning(
                "stopped: %s",
                "every delivery is final"
                if report.drained
                else f"{report.dead_lettered} undelivered sends in {report.dead_letter_dir}",
            )
        if handlers is not None:
            handlers.chain(signum, frame)

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop(drain=True)

    @property
    def running(self) -> bool:
        return self._state == "running"

    # -- runs -----------------------------------------------------------------------

    def submit(
        self, workflow_id: str, event: Any = None, timeout: float | None = None
    ) -> RunFuture:
        """Start a run; the future settles when the run has ended.

        Its `run_id` is known at once (for `run_result`, `deliveries`, `GET /runs/{id}`).
        Returns at once while fewer than `Config.max_pending` runs and sends
        are in flight; otherwise waits for room (backpressure), at most
        `timeout` s (None: as long as it takes; 0: not at all), then raises
        `Busy` (a `TimeoutError`) without starting the run.
        """
        return self._start_run(workflow_id, event, depth=0, timeout=timeout)

    def run(self, workflow_id: str, event: Any = None, timeout: float | None = None) -> RunResult:
        """Run a workflow and wait for it to end (not for its deliveries).

        `timeout` covers waiting for room (`Busy`) and the run itself
        (`TimeoutError`); both are `TimeoutError`s.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        future = self.submit(workflow_id, event, timeout=timeout)
        return future.result(time_left(deadline))

    async def arun(self, workflow_id: str, event: Any = None) -> RunResult:
        """`await rt.arun(...)` from trio or asyncio code.

        When the runtime is full it waits for room without blocking the event
        loop (it tries again every few ms); cancel it to give up.
        """
        if self._caller_may_wait():
            future = await poll_admission(
                functools.partial(self.submit, workflow_id, event, timeout=0)
            )
        else:  # on the runtime's own loop: admitted at once (see Admission)
            future = self.submit(workflow_id, event)
        return await await_run(future)

    def _submit_child_run(self, workflow_id: str, event: Any, depth: int) -> Any:
        # Runs started by an emit are part of draining: allowed while stopping.
        return self._start_run(workflow_id, event, depth=depth, while_stopping=True)

    def _caller_may_wait(self) -> bool:
        """False on the runtime's own threads: room may be freed only by the work they do."""
        machinery = self._machinery
        return machinery is None or machinery.caller_may_wait()

    def _start_run(
        self,
        workflow_id: str,
        event: Any,
        depth: int,
        while_stopping: bool = False,
        timeout: float | None = None,
    ) -> RunFuture:
        if self._state != "running" and not (while_stopping and self._state == "stopping"):
            raise RuntimeError(
                f"the runtime is {self._state}: call rt.start() or use `with rt:` before running"
            )
        machinery = self._machinery
        assert machinery is not None
        workflow = self._workflows.get(workflow_id)
        return self._runs.start(
            machinery.env,
            self.run_actor_type,
            workflow,
            event,
            depth,
            timeout,
            self._caller_may_wait,
            lambda: self._state,
        )

    # -- inspection -------------------------------------------------------------------

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Flush every batch now and wait until all queued deliveries are final.

        Returns False if `timeout` passed first (deliveries go on in the background).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.ledger.wait_runs(time_left(deadline)):
            return False
        flush_destinations(self.ledger, self._backpressure, self._refs, deadline)
        return self.ledger.wait_idle(time_left(deadline))

    def deliveries(self, run_id: str) -> list[Delivery]:
        """Snapshots of the delivery records of one run, in send order."""
        return self.ledger.deliveries(run_id)

    def run_result(self, run_id: str) -> RunResult | None:
        """The result of a finished run (None while it is still running, or unknown).

        `run_in_progress(run_id)` tells the two apart; runs older than the run
        history (`OUTBOUND_RUN_HISTORY`) are unknown again.
        """
        try:
            return self.ledger.run(run_id)
        except KeyError:
            return None

    def run_in_progress(self, run_id: str) -> bool:
        """Whether the run `run_id` was started here and has not ended yet."""
        return run_id in self._runs.running

    def stats(self) -> dict[str, Any]:
        """Counters: runs by status, per destination accepted/delivered/failed/retries,
        `admission`: runs and sends in flight against `OUTBOUND_MAX_PENDING`, and how
        many callers wait for room now (backpressure), and `buffered_bytes`: what
        batches hold against `OUTBOUND_BATCH_MEMORY_CAP`."""
        stats = self.ledger.stats()
        backpressure = self._backpressure
        admission = backpressure.admission
        stats["admission"] = {
            "in_flight": admission.in_flight,
            "limit": admission.limit,
            "waiting": admission.waiting,
        }
        stats["buffered_bytes"] = backpressure.budget.used
        return stats

    def sql_query(self, sql: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run one read-only SQL statement on the SQL destination's Postgres.

        Returns `{"columns": [{"name", "type"}...], "rows": [[...]...], "truncated": bool}`
        with JSON-friendly values; past `OUTBOUND_SQL_MAX_RESULT_BYTES` of JSON the
        rows are cut and `truncated` is True. It runs on connections of its own, logged
        in as a role that can only read the destination's tables, in a READ ONLY
        transaction with a `statement_timeout` of `timeout` seconds: writes, DDL and
        anything privileged fail with Postgres's own error, raised as `SqlQueryError`
        (`SqlQueryRefused`, with no sqlstate, when the configured role cannot set
        that reader role up, so no query runs).
        """
        from outbound.destinations.sql.actor import SqlQuery

        if not self.config.database_url:
            raise RuntimeError("SQL is not configured: set OUTBOUND_DATABASE_URL to a Postgres URL")
        if not isinstance(sql, str) or not sql.strip():
            raise ValueError("sql must be a non-empty string")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        ref = self._refs.get("sql")
        if ref is None or self._state != "running":
            raise RuntimeError(f"the runtime is {self._state}: start it before querying")
        future = ref.ask(SqlQuery(sql, timeout), timeout=30)
        return future.result(timeout + 30)

    def asgi_app(self) -> Any:
        """The HTTP API (SSE streams, triggers, runs, health, metrics) as a Starlette app."""
        from outbound.api import create_app

        return create_app(self)

    @property
    def trio_loop(self) -> LoopThread | None:
        """The trio loop thread of this start (the SSE hub's; `ApiServer` serves on it),
        None while the runtime is not running."""
        return self._machinery.services.trio if self._machinery is not None else None

    @property
    def asyncio_loop(self) -> LoopThread | None:
        """The asyncio loop thread of this start (its executor runs the API's blocking
        calls), None while the runtime is not running."""
        return self._machinery.services.asyncio if self._machinery is not None else None

    def health(self) -> dict[str, Any]:
        """The state of the runtime and of each destination actor.

        A destination is `failed` once the supervisor gave up on it (with its
        error), `retrying` while a batch has kept failing for longer than
        `health_retrying_after`; SSE also counts events it could not publish.
        Any of these makes the runtime `degraded`.
        """
        machinery = self._machinery
        children = (
            {}
            if machinery is None
            else machinery.destination_health(self.config.health_retrying_after)
        )
        sse = children.get("sse")
        if sse is not None:
            sse["publish_errors"] = self.sse_hub.publish_errors
            sse["last_publish_error"] = self.sse_hub.last_publish_error
        healthy = self.running and all(c["status"] == "running" for c in children.values())
        return {
            "status": "ok" if healthy else "degraded",
            "state": self._state,
            "destinations": children,
            "error": str(self.supervisor_error) if self.supervisor_error else None,
        }
