"""The `Runtime` facade: the embedding API of the public contract, and nothing else.

Owns the public methods; each asks the part that does the work (README:
Architecture): lifecycle, registrations, wiring, machinery, runs,
backpressure, handoff, shutdown, health, sql_query, gc_tuning. Those take what
they need as arguments and never import this module; neither does the HTTP API
(`outbound.api`, imported lazily by `asgi_app()`).
"""

from __future__ import annotations

import atexit
import functools
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from outbound.actors.loops import LoopThread
from outbound.backpressure import Backpressure
from outbound.config import Config
from outbound.deadlines import time_left
from outbound.destinations.backoff import RetryPolicy
from outbound.destinations.delivery import Delivery, Ledger
from outbound.destinations.http.endpoints import EndpointSettings
from outbound.destinations.sse.hub import SseHub
from outbound.gc_tuning import tune_garbage_collector
from outbound.handoff import flush_destinations
from outbound.health import health_report
from outbound.journal.deadletters import JournaledDeadLetters
from outbound.journal.recovery import deliver_entries, recover_sends
from outbound.journal.run_records import RunRecord
from outbound.journal.views import ClusterViews
from outbound.lifecycle import Lifecycle, drain_on_signal
from outbound.machinery import Machinery
from outbound.registrations import Registrations
from outbound.replay import ReplayFilter, ReplayReport, parse_time, replay_dead_letters
from outbound.run import RunFuture, RunResult, WorkflowRun
from outbound.run_list import RunPage, RunQuery, list_runs
from outbound.runs import RunStarter, arun
from outbound.shutdown import ShutdownReport, stop_runtime
from outbound.signals import SignalHandlers
from outbound.sql_query import sql_query
from outbound.wiring import DestinationFactory, DestinationWiring

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
WorkflowIds = list[str] | tuple[str, ...]


class Runtime:
    """Runs workflows and delivers what they send. Use it as a context manager."""

    #: The actor type of runs; benchmarks swap in a thread-per-run type to compare.
    run_actor_type: type[WorkflowRun] = WorkflowRun
    _machinery: Machinery | None = None  # the threads and actors of the current start

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else Config.from_env()
        # Backpressure: runs and sends in flight, taken at submit, given back as sends settle.
        self._backpressure = Backpressure(self.config.max_pending, self.config.batch_memory_cap)
        self.ledger = Ledger(
            self.config.run_history,
            delivery_history=self.config.delivery_history,
            # Failed sends, when they fail: to files, and to the journal while one is attached.
            dead_letters=JournaledDeadLetters(self.config.data_dir),
            on_final=self._backpressure.sends_final,
        )
        self._lifecycle = Lifecycle()
        self._registrations = Registrations()
        self._runs = RunStarter(self.ledger, self._backpressure.admission)
        self._destinations = DestinationWiring(
            self.config,
            self._backpressure,
            subscriptions=self._registrations.subscriptions,
            emit_log=self._registrations.emit_log,
        )
        #: The SSE destination's hub (streams, history, subscribers), read by the HTTP API.
        self.sse_hub: SseHub = self._destinations.sse_hub
        self._signal_handlers: SignalHandlers | None = None
        self.supervisor_error: BaseException | None = None
        self._recovered_events: list[Any] = []  # read back at start, run once running

    # -- registration ----------------------------------------------------------

    def workflow(self, workflow_id: str, listens_to: WorkflowIds = ()) -> Callable[[F], F]:
        """Decorator: `@rt.workflow("p_orders")` registers `fn(event, ctx)`.

        `listens_to=["p_a"]` also runs it with every event `p_a` emits.
        """

        def register(fn: F) -> F:
            self.register(workflow_id, fn, listens_to=listens_to)
            return fn

        return register

    def register(
        self, workflow_id: str, fn: Callable[..., Any], listens_to: WorkflowIds = ()
    ) -> None:
        """Register `fn(event, ctx)` (sync or `async def`) under `workflow_id`."""
        self._registrations.register(workflow_id, fn, listens_to)

    def subscribe(self, listener: str, emitter: str) -> None:
        """Run workflow `listener` with every event that workflow `emitter` emits.

        The emitter need not be registered yet; the listener must be.
        """
        self._registrations.subscribe(listener, emitter)

    def emits(self, workflow_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The events `workflow_id` emitted (its last 1,000), oldest first (README: Emit);
        `limit` keeps only the most recent ones."""
        return self._registrations.emit_log.list(workflow_id, limit)

    @property
    def workflows(self) -> list[str]:
        return self._registrations.workflows.ids()

    def add_destination(self, name: str, factory: DestinationFactory) -> None:
        """Add a destination actor built by `factory(config)`; send with `ctx.send.to(name, ...)`.

        The factory returns `SomeDestination.start(...)` (README: Custom destinations).
        """
        self._destinations.add(name, factory, self._machinery if self.running else None)

    def http_endpoint(
        self,
        url_prefix: str,
        *,
        retry: RetryPolicy | None = None,
        rate_limit: str | None = None,
    ) -> EndpointSettings:
        """Settings for the HTTP sends whose URL starts with `url_prefix` (README: HTTP).

        The longest registered prefix of a send's URL wins; a send's own
        `retry=` wins over its endpoint's, which wins over the global settings.
        Registering a prefix again replaces its settings. Takes effect at once,
        for sends already waiting too; not journaled (register at start-up).
        """
        settings = EndpointSettings(url_prefix, retry=retry, rate_limit=rate_limit)
        self._destinations.http_endpoints.register(settings)
        return settings

    def enable_endpoint(self, url: str) -> bool:
        """Let sends to `url`, marked gone when it answered 410, go again (README: HTTP).

        Returns whether it was marked gone. Sends that failed meanwhile stay
        dead-lettered (`outbound replay` sends them again).
        """
        return self._destinations.http_endpoint_state.enable(url)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> Runtime:
        """Start loops, timers, the supervisor and every destination actor.

        A stopped runtime may be started again: its workflows, destinations and
        history are kept; loops, pool and destination actors are made anew.
        """
        self._lifecycle.start(self._start_machinery)
        events, self._recovered_events = self._recovered_events, []
        if events:  # journaled by an earlier process, not yet run: run them (same run ids)
            machinery = self._machinery
            assert machinery is not None
            workflows = self._registrations.workflows
            self._runs.run_recovered(machinery.env, self.run_actor_type, workflows, events)
        self._join_cluster()
        return self

    def _join_cluster(self) -> None:
        """With `OUTBOUND_JOURNAL=nats://`: run events from the cluster's queue (as much as
        there is room for) and take over the sends of nodes that are gone."""
        machinery = self._machinery
        if machinery is None or machinery.journal is None or not machinery.journal.clustered:
            return
        env, actor_type, workflows = (
            machinery.env,
            self.run_actor_type,
            self._registrations.workflows,
        )
        admission, hand_off = self._backpressure.admission, machinery.hand_off
        machinery.journal.start_cluster(
            on_event=lambda entry, event: self._runs.run_event(
                env, actor_type, workflows, entry, event
            ),
            on_taken_over=lambda entries: deliver_entries(entries, hand_off),
            room=lambda: admission.limit - admission.in_flight,
        )

    def _start_machinery(self) -> None:
        if self.config.gc_tuning:
            tune_garbage_collector()
        self._backpressure.reopen()
        self.supervisor_error = None
        self._machinery = machinery = self._destinations.start(
            self.ledger, submit_child_run=self._submit_child_run, on_give_up=self._gave_up
        )
        atexit.register(self._stop_at_exit)
        journal = machinery.journal
        if journal is not None and journal.clustered:
            # Before recovery: a recovered SSE send goes to the cluster's stream.
            hub, emit_log = self.sse_hub, self._registrations.emit_log
            views = ClusterViews(journal, hub, emit_log, self.ledger, self.config.run_history)
            machinery.views = views.start()
        if journal is not None:
            self._recovered_events = recover_sends(journal, machinery.hand_off)

    def _stop_at_exit(self) -> None:
        """A runtime still running when the interpreter exits is drained, not abandoned."""
        if self.running:
            logger.warning("the runtime was not stopped; stopping it (and draining) at exit")
            self.stop(drain=True)

    def _gave_up(self, error: BaseException) -> None:  # on the supervisor's thread
        self.supervisor_error = error
        self._destinations.gave_up(error)

    def stop(self, drain: bool = True, timeout: float | None = None) -> ShutdownReport:
        """Stop the runtime. With `drain`, wait up to `timeout` s for runs and deliveries.

        What is undelivered by then stays in the journal for the next start
        (`report.left_in_journal`); without a journal it is written to
        `<data_dir>/dead-letter/` and counted in the report. Never raises: errors
        are logged and listed in `report.errors`. A second `stop()` while one runs
        waits for its report.
        """
        return self._lifecycle.stop(
            functools.partial(self._stop_machinery, drain, timeout), self._after_stop
        )

    def _stop_machinery(self, drain: bool, timeout: float | None) -> ShutdownReport:
        if self._machinery is not None and self._machinery.journal is not None:
            self._machinery.journal.stop_cluster()  # take no more events or sends
        shutdown = self._destinations.shutdown(self.ledger, self._machinery)
        return stop_runtime(shutdown, drain, timeout, self._let_go_of_machinery)

    def _let_go_of_machinery(self) -> None:
        # Kept: what can still be read (the ledger) and what a restart needs
        # (workflows, factories). Dropped: the machinery, which breaks the
        # reference cycles through it, so a dropped runtime is freed at once.
        if self._machinery is not None:
            self._machinery.stop()
        self._machinery = None
        self._destinations.refs.clear()

    def _after_stop(self) -> None:
        self._destinations.failed.clear()  # a restart starts every destination afresh
        atexit.unregister(self._stop_at_exit)

    def install_signal_handlers(self) -> SignalHandlers:
        """Drain on SIGTERM and SIGINT: `stop(drain=True)`, then what the signal did before.

        Call it from the main thread (elsewhere it raises RuntimeError); README
        says what each signal does. Returns the handlers (`.restore()` undoes it).
        """
        if self._signal_handlers is None:
            self._signal_handlers = SignalHandlers(self._drain_on_signal).install()
        return self._signal_handlers

    def _drain_on_signal(self, signum: int, frame: Any) -> None:
        drain_on_signal(signum, frame, self._lifecycle, self.stop, self._signal_handlers)

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop(drain=True)

    @property
    def running(self) -> bool:
        return self._lifecycle.running

    # -- runs -----------------------------------------------------------------------

    def submit(
        self, workflow_id: str, event: Any = None, timeout: float | None = None
    ) -> RunFuture:
        """Start a run; the future settles when the run has ended. Its `run_id` is known at once.

        While `Config.max_pending` runs and sends are in flight it waits for room
        (backpressure), at most `timeout` s (None: as long as it takes; 0: not at
        all), then raises `Busy` (a `TimeoutError`) without starting the run.
        """
        return self._start_run(workflow_id, event, depth=0, timeout=timeout)

    def run(self, workflow_id: str, event: Any = None, timeout: float | None = None) -> RunResult:
        """Run a workflow and wait for it to end (not for its deliveries).

        `timeout` covers waiting for room (`Busy`) and the run (`TimeoutError`).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        future = self._start_run(workflow_id, event, depth=0, timeout=timeout, awaited=True)
        return future.result(time_left(deadline))

    async def arun(self, workflow_id: str, event: Any = None) -> RunResult:
        """`await rt.arun(...)` from trio or asyncio code; waits for room without blocking
        the loop (cancel it to give up)."""
        submit = functools.partial(self._start_run, workflow_id, event, 0, awaited=True)
        return await arun(submit, self._caller_may_wait())

    def publish(self, workflow_id: str, event: Any = None, timeout: float | None = None) -> str:
        """Journal `event` for a run of `workflow_id`, start the run, and return its id.

        With a journal the event is stored before this returns: a crash before
        (or during) its run runs it again at the next start, with the same run
        id and delivery ids. Waits for room like `submit` (`Busy`), and at most
        `OUTBOUND_JOURNAL_WAIT` s for the journal (`JournalUnavailable`, a `Busy`). In a
        cluster, for room in the cluster's queue instead (`ClusterFull`, a `Busy`, once
        `OUTBOUND_JOURNAL_MAX_QUEUED` events wait for a node).
        Without a journal it is `submit(...).run_id`.
        """
        machinery = self._machinery
        if machinery is None or machinery.journal is None:
            return self.submit(workflow_id, event, timeout).run_id
        self._lifecycle.check_may_run(False)
        workflow = self._registrations.workflows.get(workflow_id)
        env, journal = machinery.env, machinery.journal
        return self._runs.publish(
            env, self.run_actor_type, workflow, event, journal, timeout, self._caller_may_wait
        )

    def _submit_child_run(
        self, workflow_id: str, event: Any, depth: int, run_id: str | None = None
    ) -> Any:
        # Runs started by an emit are part of draining: allowed while stopping.
        machinery = self._machinery
        if run_id is not None and machinery is not None and machinery.views is not None:
            # In a cluster, any node with room runs it: it waits in the cluster's queue.
            workflow = self._registrations.workflows.get(workflow_id)
            assert machinery.journal is not None
            return self._runs.queue_listener_run(machinery.journal, workflow, event, depth, run_id)
        return self._start_run(workflow_id, event, depth=depth, while_stopping=True)

    def _caller_may_wait(self) -> bool:
        machinery = self._machinery
        return machinery is None or machinery.caller_may_wait()

    def _start_run(
        self,
        workflow_id: str,
        event: Any,
        depth: int,
        while_stopping: bool = False,
        timeout: float | None = None,
        awaited: bool = False,
    ) -> RunFuture:
        lifecycle = self._lifecycle
        lifecycle.check_may_run(while_stopping)
        machinery = self._machinery
        assert machinery is not None
        workflow = self._registrations.workflows.get(workflow_id)
        return self._runs.start(
            machinery.env,
            self.run_actor_type,
            workflow,
            event,
            depth,
            timeout,
            self._caller_may_wait,
            lambda: lifecycle.state,
            awaited,
        )

    # -- inspection -------------------------------------------------------------------

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Flush every batch now and wait until all queued deliveries are final.

        Returns False if `timeout` passed first (deliveries go on in the background).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.ledger.wait_runs(time_left(deadline)):
            return False
        flush_destinations(self.ledger, self._backpressure, self._destinations.refs, deadline)
        return self.ledger.wait_idle(time_left(deadline))

    def replay_dead_letters(
        self,
        destination: str | None = None,
        since: str | float | datetime | None = None,
        until: str | float | datetime | None = None,
        dry_run: bool = False,
    ) -> ReplayReport:
        """Send dead letters again with their original delivery ids; each is replayed once.

        With a journal, the dead letters of every node (its dead-letter stream);
        without, this node's files. `since`/`until` (unix seconds, ISO 8601 or a
        datetime) bound when they were dead-lettered. Returns once they are handed
        on; `rt.flush()` then `report.settled()` tells how they ended. README: Replay.
        """
        machinery = self._machinery
        if machinery is None:
            raise RuntimeError("replay_dead_letters needs a running runtime: start() it first")
        wanted = ReplayFilter(destination, parse_time(since, "since"), parse_time(until, "until"))
        return replay_dead_letters(
            self.config.data_dir,
            machinery.hand_off,
            self.ledger.dead_letters,
            self.config,
            wanted,
            dry_run,
        )

    def deliveries(self, run_id: str) -> list[Delivery]:
        """Snapshots of the delivery records of one run, in send order.

        In a cluster, a run another node ran is read from the cluster's run records
        (as of a fraction of a second ago). KeyError for a run unknown here and there.
        """
        try:
            return self.ledger.deliveries(run_id)
        except KeyError:
            record = self._run_record(run_id)
            if record is None:
                raise
            return record.deliveries

    def run_result(self, run_id: str) -> RunResult | None:
        """The result of a finished run; None while it runs (`run_in_progress`) or if unknown
        (never started, or older than `OUTBOUND_RUN_HISTORY`). In a cluster, the result of
        a run any node ran."""
        try:
            return self.ledger.run(run_id)  # type: ignore[no-any-return]
        except KeyError:
            record = self._run_record(run_id)
            return record.result if record is not None else None

    def _run_record(self, run_id: str) -> RunRecord | None:
        machinery = self._machinery
        if machinery is None or machinery.views is None:
            return None
        return machinery.views.run_records.get(run_id)

    def recent_runs(
        self,
        limit: int = 50,
        before: str | None = None,
        workflow: str | None = None,
        status: str | None = None,
        destination: str | None = None,
        delivery: str | None = None,
    ) -> RunPage:
        """Recent runs, newest first, with their sends counted per destination (`GET /runs`,
        the inspector's list; README: Inspector): this node's, or in a cluster every
        node's (`scope`), and apart (`.running`, first page only) this node's runs in
        progress. `before`: the `next` of the previous page. ValueError naming the
        parameter for a bad value."""
        query = RunQuery(limit, before, workflow, status, destination, delivery)
        if workflow is not None and workflow not in self.workflows:
            raise ValueError(f"workflow must be a registered workflow; {workflow!r} is not")
        # Runs in progress first: one that ends meanwhile is then in the history too (a run
        # is kept before it leaves `running`), never in neither; `list_runs` lists it once.
        in_progress = self._runs.running.copy().values()
        machinery = self._machinery
        if machinery is not None and machinery.views is not None:
            kept = machinery.views.run_records.kept_runs()
            return list_runs(kept, query, "cluster", in_progress)
        return list_runs(self.ledger.kept_runs(), query, "node", in_progress)

    def follow_cluster_runs(
        self, listener: Callable[[RunResult], None]
    ) -> Callable[[], None] | None:
        """In a cluster, call `listener(result)` for every run record any node stores from
        now on (a run that ended, or whose deliveries changed; on the journal's thread:
        keep it cheap), and return the function that stops it; None alone. Blocks while
        the records are read the first time (the inspector's live notices)."""
        machinery = self._machinery
        if machinery is None or machinery.views is None:
            return None
        records = machinery.views.run_records
        records.add_listener(listener)
        return lambda: records.remove_listener(listener)

    def run_in_progress(self, run_id: str) -> bool:
        """Whether the run `run_id` was started here and has not ended yet."""
        return run_id in self._runs.running

    def stats(self) -> dict[str, Any]:
        """Counters: runs by status, per destination accepted/delivered/failed/retries,
        `admission` (runs and sends in flight, limit, callers waiting) and
        `buffered_bytes` (what batches hold against `OUTBOUND_BATCH_MEMORY_CAP`) and, with a
        journal, `journal` (connected, entries not yet acknowledged, appends waiting)."""
        stats = self.ledger.stats()
        stats.update(self._backpressure.stats())
        http_state = self._destinations.http_endpoint_state
        stats["http"] = {**http_state.report(), "gone_endpoints": http_state.gone_endpoints()}
        machinery = self._machinery
        if machinery is not None and machinery.journal is not None:
            stats["journal"] = machinery.journal.state()
            if machinery.views is not None:
                stats["journal"]["views"] = machinery.views.state()
        return stats

    def sql_query(self, sql: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run one read-only SQL statement on the SQL destination's Postgres (README: SQL).

        Returns `{"columns", "rows", "truncated"}`; Postgres's errors raise `SqlQueryError`.
        """
        sql_actor = self._destinations.refs.get("sql")
        state = self._lifecycle.state
        return sql_query(self.config.database_url, sql_actor, state, sql, timeout)

    def asgi_app(self) -> Any:
        """The HTTP API (SSE streams, triggers, runs, health, metrics) as a Starlette app."""
        from outbound.api import create_app

        return create_app(self)

    @property
    def trio_loop(self) -> LoopThread | None:
        """This start's trio loop thread (`ApiServer` serves on it); None when not running."""
        return self._machinery.services.trio if self._machinery is not None else None

    @property
    def asyncio_loop(self) -> LoopThread | None:
        """This start's asyncio loop thread (the API's blocking calls); None when not running."""
        return self._machinery.services.asyncio if self._machinery is not None else None

    def health(self) -> dict[str, Any]:
        """The state of the runtime and of each destination actor (`ok` or `degraded`)."""
        state, retrying_after = self._lifecycle.state, self.config.health_retrying_after
        machinery, error = self._machinery, self.supervisor_error
        http = self._destinations.http_endpoint_state.report()
        return health_report(state, machinery, retrying_after, self.sse_hub, error, http)
