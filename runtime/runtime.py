"""The `Runtime` facade: workflows, runs, destinations, flush and shutdown.

Owns the lifecycle of everything a runtime starts (the run pool, the trio and
asyncio loop threads, the timers, the root supervisor and its destination
actors) and the embedding API of the public contract. Runs hand their outbox
here (`_hand_off`): the pool worker buffers it and forwards the outboxes of
many runs in one message per destination when it runs out of work, taking
batch memory first. Backpressure: `submit` takes room for the run in the
admission bound (`runtime/admission.py`, `OUTBOUND_MAX_PENDING` runs and sends
in flight) and waits while there is none. Destination logic lives in `destinations/`;
this module only wires them.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import itertools
import logging
import operator
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pykka
import sniffio

from outbound.actors import ActorPool, AsyncioLoop, ChildSpec, Supervisor, Timers, TrioLoop
from outbound.actors.ids import new_id
from outbound.admission import Admission, poll_admission
from outbound.config import Config
from outbound.destinations.base import DeadLetter, Deliver, Flush, Services
from outbound.destinations.batching import MemoryBudget, release_held
from outbound.destinations.deadletter import DeadLetterWriter
from outbound.destinations.delivery import (
    Delivery,
    Failure,
    Ledger,
    Outgoing,
    fail_each,
    finish_all,
)
from outbound.destinations.email import EmailDestination, SmtpSettings
from outbound.destinations.emit import EmitDestination, EmitLog, Subscriptions
from outbound.destinations.http import HttpDestination
from outbound.destinations.sse import SseDestination, SseHub
from outbound.gc_tuning import tune_garbage_collector
from outbound.run import RunEnvironment, RunFuture, RunResult, Workflow, WorkflowRun
from outbound.send import RunInfo
from outbound.signals import SignalHandlers

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
HAND_OFF_BATCH = 64  # runs a pool worker buffers at most before forwarding their sends
HAND_OFF_SENDS = 1024  # ... and sends: big runs go on at once, so batches fill while runs go on
#: Seconds `stop()` waits for one destination to dead-letter what it holds; one
#: that does not answer by then is stuck, and what it left is written instead.
DEAD_LETTER_TIMEOUT = 30.0  # S3 may be encoding and writing hundreds of MiB of objects
DestinationFactory = Callable[[Config], pykka.ActorRef[Any]]
_destination_of = operator.attrgetter("destination")
_size_of = operator.attrgetter("size")


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _time_left(deadline: float | None, at_most: float | None = None) -> float | None:
    """Seconds until a `time.monotonic()` deadline (None: no deadline), capped at `at_most`."""
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    if at_most is None:
        return left
    return at_most if left is None else min(left, at_most)


@dataclass(frozen=True, slots=True)
class _Builtin:
    """A built-in destination's factory: `start(services)` with the services of each start.

    Not a closure over the runtime: the factories outlive a stop (so the
    runtime can start again), and a closure would tie the runtime into a
    reference cycle that `_shutdown_machinery` exists to avoid.
    """

    start: Callable[[Services], pykka.ActorRef[Any]]


class UnknownWorkflowError(KeyError):
    """`run`/`submit` named a workflow that was never registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown workflow"


@dataclass(frozen=True)
class ShutdownReport:
    """What `Runtime.stop()` did: whether everything was delivered, and what was not."""

    drained: bool
    dead_lettered: int = 0
    dead_letter_dir: Path | None = None
    runs_abandoned: int = 0
    per_destination: dict[str, int] = field(default_factory=dict)
    #: What went wrong while stopping, by destination (or step): logged, never raised.
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class _Stopping:
    """A `stop()` in progress: later callers wait for it and get its report."""

    done: threading.Event = field(default_factory=threading.Event)
    report: ShutdownReport = field(default_factory=lambda: ShutdownReport(drained=False))


class Runtime:
    """Runs workflows and delivers what they send. Use it as a context manager."""

    #: The actor type of runs; benchmarks swap in a thread-per-run type to compare.
    run_actor_type: type[WorkflowRun] = WorkflowRun
    _stopping: _Stopping | None = None  # set while stop() runs

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else Config.from_env()
        # Backpressure: runs and sends in flight, taken at submit, given back as sends settle.
        self._admission = Admission(self.config.max_pending)
        self.ledger = Ledger(
            self.config.run_history,
            delivery_history=self.config.delivery_history,
            dead_letters=DeadLetterWriter(self.config.data_dir),  # failed sends, when they fail
            on_final=self._sends_final,
        )
        self._failed_destinations: dict[str, BaseException] = {}  # given up on by the supervisor
        self._budget = MemoryBudget(self.config.batch_memory_cap)
        # Hand-offs still telling destinations (a run is no longer "in flight" by then).
        self._buffered = threading.local()  # per pool worker: outboxes not yet forwarded
        self._batched: set[str] = set()  # destinations whose sends count against the budget
        self._workflows: dict[str, Workflow] = {}
        self._factories: dict[str, DestinationFactory | _Builtin] = {}
        self._refs: dict[str, pykka.ActorRef[Any]] = {}
        self._running: dict[str, RunFuture] = {}  # runs in progress, by id
        self._signal_handlers: SignalHandlers | None = None
        self._state = "new"
        self._state_lock = threading.Lock()
        self._supervisor: pykka.ActorRef[Supervisor] | None = None
        self._pool: ActorPool | None = None
        self._services: Services | None = None
        self._env: RunEnvironment | None = None
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
        if not isinstance(workflow_id, str) or not workflow_id:
            raise ValueError("workflow_id must be a non-empty string")
        if not callable(fn):
            raise TypeError(f"workflow {workflow_id!r}: {fn!r} is not callable")
        if workflow_id in self._workflows:
            raise ValueError(f"workflow {workflow_id!r} is already registered")
        if isinstance(listens_to, str):
            raise TypeError(f"workflow {workflow_id!r}: listens_to must be a list of workflow ids")
        self._workflows[workflow_id] = Workflow.of(workflow_id, fn)
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
        return list(self._workflows)

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
        subscriptions, emit_log = self._subscriptions, self._emit_log
        self._factories["http"] = _Builtin(HttpDestination.start)
        self._factories["emit"] = _Builtin(
            lambda services: EmitDestination.start(services, subscriptions, emit_log)
        )
        if self.config.smtp_url and self.config.email_from:
            # Parsed now, so a malformed OUTBOUND_SMTP_URL fails here, naming itself.
            smtp = SmtpSettings.from_url(self.config.smtp_url, self.config.email_from)
            self._factories["email"] = _Builtin(
                lambda services: EmailDestination.start(services, smtp)
            )
        self.sse_hub = hub = SseHub.from_config(self.config)
        self._factories["sse"] = _Builtin(lambda services: SseDestination.start(services, hub))
        if self.config.s3_endpoint:
            from outbound.destinations.s3 import S3Destination

            self._factories["s3"] = _Builtin(S3Destination.start)
        if self.config.database_url:
            from outbound.destinations.sql import SqlDestination

            self._factories["sql"] = _Builtin(SqlDestination.start)

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
        config = self.config
        if config.gc_tuning:
            tune_garbage_collector()
        self._admission.reopen()
        self.supervisor_error = None
        if self._budget.closed:  # a stop that could not drain closed it
            self._budget = MemoryBudget(config.batch_memory_cap)
        self._pool = ActorPool(config.pool_workers, name="outbound-runs")
        self._pool.add_idle_hook(self._forward_buffered)
        trio_loop = TrioLoop().start()
        asyncio_loop = AsyncioLoop().start()
        # User coroutines get a loop of their own: one that blocks (time.sleep)
        # must not stall the destinations' clients (asyncpg, aiosmtplib).
        workflow_loop = AsyncioLoop(name="workflows").start()
        self._services = Services(
            config,
            trio_loop,
            asyncio_loop,
            Timers(),
            self.ledger,
            self._budget,
            submit_run=self._submit_child_run,
        )
        self._supervisor = Supervisor.start(on_give_up=self._on_supervisor_gave_up)
        self._env = RunEnvironment(
            config,
            self._pool,
            workflow_loop,
            self._refs.__contains__,
            self._hand_off,
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
        assert self._supervisor is not None
        if isinstance(factory, _Builtin):
            spec = ChildSpec(name, functools.partial(factory.start, self._services))
        else:
            spec = ChildSpec(name, functools.partial(factory, self.config))
        ref = self._supervisor.proxy().start_child(spec).get()
        if getattr(ref.actor_class, "batched", False):
            self._batched.add(name)
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
            self._dead_letter_from_dead_actor(name, ref, "the destination stopped for good")

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
            if self._state != "stopping" or stopping is None:
                self._state = "stopping"
                stopping = self._stopping = _Stopping()
                first = True
            else:
                first = False
        if not first:
            stopping.done.wait()
            return stopping.report
        errors: dict[str, str] = {}
        try:
            stopping.report = self._drain_and_dead_letter(drain, timeout, errors)
        except Exception as error:  # a bug of ours: still shut down, still report
            logger.exception("stopping the runtime failed")
            errors["stop"] = _describe(error)
            stopping.report = ShutdownReport(drained=False, errors=errors)
        finally:
            try:
                self._shutdown_machinery()
            except Exception as error:
                logger.exception("shutting down the runtime's threads failed")
                errors["shutdown"] = _describe(error)
            self._state = "stopped"
            self._stopping = None
            self._failed_destinations.clear()  # a restart starts every destination afresh
            atexit.unregister(self._stop_at_exit)
            stopping.done.set()
        return stopping.report

    def _drain_and_dead_letter(
        self, drain: bool, timeout: float | None, errors: dict[str, str]
    ) -> ShutdownReport:
        self._admission.close()  # submitters waiting for room give up: no new runs now
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + (timeout if drain else 0)
        drained = False
        try:
            runs_done = self._wait_runs(deadline)
            self._flush_all(deadline)
            drained = runs_done and self.ledger.wait_idle(_time_left(deadline))
        except Exception as error:
            logger.exception("draining failed; dead-lettering what is left")
            errors["drain"] = _describe(error)
        if not drained:
            # Hand-offs waiting on backpressure go through now, so that their
            # sends reach the destinations before these dead-letter what they hold.
            self._budget.close()
            self.ledger.wait_hand_offs(5.0)
        per_destination = (
            {} if drained else self._dead_letter("not delivered before shutdown", errors)
        )
        report = ShutdownReport(
            drained=drained,
            dead_lettered=sum(per_destination.values()),
            dead_letter_dir=(self.config.data_dir / "dead-letter") if per_destination else None,
            runs_abandoned=self.ledger.runs_in_flight,
            per_destination=per_destination,
            errors=errors,
        )
        if report.dead_lettered:
            logger.warning(
                "stopped with %d undelivered sends written to %s: %s",
                report.dead_lettered,
                report.dead_letter_dir,
                per_destination,
            )
        return report

    def _wait_runs(self, deadline: float | None) -> bool:
        return self.ledger.wait_runs(_time_left(deadline))

    def _dead_letter(self, reason: str, errors: dict[str, str] | None = None) -> dict[str, int]:
        """Have every destination dead-letter what it holds; one that fails does not stop the rest.

        A destination whose `DeadLetter` raises or does not answer within
        `DEAD_LETTER_TIMEOUT` is abandoned, and what it left (its unfinished
        sends, the hand-offs in its inbox) is dead-lettered from here.
        """
        errors = {} if errors is None else errors
        counts: dict[str, int] = {}
        for name, ref in list(self._refs.items()):
            try:
                count = ref.ask(
                    DeadLetter(self.config.data_dir, reason), timeout=DEAD_LETTER_TIMEOUT
                )
            except pykka.ActorDeadError:
                count = self._dead_letter_quietly(name, ref, reason, errors)
            except Exception as error:
                problem = (
                    f"did not answer within {DEAD_LETTER_TIMEOUT:g} s"
                    if isinstance(error, pykka.Timeout)
                    else f"dead-lettering raised {_describe(error)}"
                )
                logger.error("destination %r %s; writing what it left", name, problem)
                errors[name] = problem
                self._abandon(name, RuntimeError(f"destination {name!r} {problem} at shutdown"))
                count = self._dead_letter_quietly(name, ref, reason, errors)
            if count:
                counts[name] = count
        return counts

    def _abandon(self, name: str, error: BaseException) -> None:
        """Route no more messages to a destination that is stuck or broken (see `leftovers`)."""
        self._failed_destinations[name] = error
        try:
            assert self._supervisor is not None
            self._supervisor.proxy().abandon_child(name, error).get(timeout=5)
        except Exception:
            logger.exception("could not take destination %r out of service", name)

    def _dead_letter_quietly(self, name: str, ref: Any, reason: str, errors: dict[str, str]) -> int:
        try:
            return self._dead_letter_from_dead_actor(name, ref, reason)
        except Exception as error:
            logger.exception("dead-lettering what destination %r left failed", name)
            errors[name] = _describe(error)
            return 0

    def _dead_letter_from_dead_actor(self, name: str, ref: Any, reason: str) -> int:
        """A destination that is gone (given up on) or abandoned still held sends: settle them.

        They fail and are dead-lettered in one write; what its batches held
        in the memory budget is given back.
        """
        if not hasattr(ref, "leftovers"):
            return 0
        durable, messages = ref.leftovers()
        # A copy in one step: an abandoned actor's thread may still wake and change it.
        unfinished = dict(durable.get("unfinished", {}))
        sends = {send.id: send for send in unfinished.values()}
        queued = 0
        for message in messages:
            if isinstance(message, Deliver):
                sends.update((send.id, send) for send in message.sends)
                queued += sum(map(_size_of, message.sends))
        if name in self._batched:
            self._budget.release(queued)
            release_held(durable, self._budget)
        pending = [send for send in sends.values() if not send.final]
        cause = self._failed_destinations.get(name)
        why = f"{reason}; the destination actor had stopped: {cause}" if cause else reason
        fail_each([Failure(send, f"{why}; dead-lettered") for send in pending])
        return len(pending)

    def _shutdown_machinery(self) -> None:
        services, env = self._services, self._env
        if self._supervisor is not None:
            self._supervisor.stop(block=True, timeout=30)
        if services is not None:
            services.timers.shutdown()
            services.trio.stop()
            services.asyncio.stop()
        if env is not None:
            env.workflow_loop.stop()
        if self._pool is not None:
            self._pool.shutdown()
        # A stopped runtime keeps what can still be read (the ledger: results,
        # deliveries, stats) and what it needs to start again (workflows,
        # destination factories). Letting go of the machinery breaks the
        # reference cycles through it (the pool's hook, the actors' services),
        # so a runtime that is dropped is freed at once, even when gc.freeze()
        # at start took it out of the collector's sight. The built-in factories
        # hold no reference to the runtime (`_Builtin`) for the same reason.
        self._pool = self._env = self._services = self._supervisor = None
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
        return future.result(_time_left(deadline))

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
        if sniffio.current_async_library() == "trio":
            import trio

            token = trio.lowlevel.current_trio_token()
            done = trio.Event()
            future.add_done_callback(lambda _: token.run_sync_soon(done.set))
            await done.wait()
            return future.result()
        return await asyncio.wrap_future(future)

    def _submit_child_run(self, workflow_id: str, event: Any, depth: int) -> Any:
        # Runs started by an emit are part of draining: allowed while stopping.
        return self._start_run(workflow_id, event, depth=depth, while_stopping=True)

    def _caller_may_wait(self) -> bool:
        """False on the runtime's own threads: room may be freed only by the work they do."""
        pool, services, env = self._pool, self._services, self._env
        if pool is not None and pool.is_worker():
            return False
        loops = [] if services is None else [services.trio, services.asyncio]
        if env is not None:
            loops.append(env.workflow_loop)
        return not any(loop.in_loop_thread() for loop in loops)

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
        try:
            workflow = self._workflows[workflow_id]
        except KeyError:
            known = ", ".join(sorted(self._workflows)) or "none registered"
            raise UnknownWorkflowError(
                f"no workflow {workflow_id!r}; known workflows: {known}"
            ) from None
        admission = self._admission
        if depth == 0:
            # Busy after `timeout`; AdmissionClosed (a RuntimeError) if stop() begins meanwhile.
            admission.admit(timeout, self._caller_may_wait)
            if self._state != "running":  # stop() began while this call waited for room
                admission.settle(1)
                raise RuntimeError(f"the runtime is {self._state}: this run was not started")
        else:  # a listener run started by an emit: must not wait on its emitter's room
            admission.take()
        info = RunInfo(new_id(), workflow_id, depth)
        future = RunFuture(info.run_id, self._running)
        assert self._env is not None
        self.ledger.run_started()
        try:
            self.run_actor_type.start(self._env, workflow, event, info, future)
        except BaseException:
            self.ledger.run_finished(
                RunResult(info.run_id, workflow_id, "failed", 0, "not started")
            )
            admission.settle(1)
            self._running.pop(info.run_id, None)
            raise
        return future

    def _hand_off(self, result: RunResult, outbox: list[Outgoing]) -> None:
        """Record a finished run and forward its sends: one message per destination.

        On a pool worker the sends wait in a per-thread buffer that the worker
        flushes when it runs out of work (or every few dozen runs, or a
        thousand sends): one message to a destination per batch of runs
        instead of one per run, so a busy pool does not wake the destination
        threads thousands of times a second, while batches still fill (and
        load) as runs go on.
        """
        self.ledger.run_finished(result, outbox)
        batched_sends, held = self._batched_load(outbox)
        # The run's unit becomes one per send, but for batched ones (the memory budget's).
        self._admission.handed_off(len(outbox) - batched_sends)
        if not outbox:
            return
        pool = self._pool
        on_worker = pool is not None and pool.is_worker()
        if held and not self._budget.acquire(held, timeout=0):
            # Backpressure: the run waits for room in the batch memory budget. What
            # this worker still buffers may be what frees it, so forward that first.
            if on_worker:
                self._forward_buffered()
            self._budget.acquire(held)
        if not on_worker:
            self._forward([outbox])
            return
        local = self._buffered
        buffered = local.__dict__.setdefault("outboxes", [])
        buffered.append(outbox)
        local.sends = sends = local.__dict__.get("sends", 0) + len(outbox)
        if len(buffered) >= HAND_OFF_BATCH or sends >= HAND_OFF_SENDS:
            self._forward_buffered()

    def _batched_load(self, outbox: list[Outgoing]) -> tuple[int, int]:
        """How many of these sends go to batches, and the bytes they will hold there."""
        if not self._batched:
            return 0, 0
        batched = list(map(self._batched.__contains__, map(_destination_of, outbox)))
        return sum(batched), sum(itertools.compress(map(_size_of, outbox), batched))

    def _sends_final(self, destination: str, count: int) -> None:
        """The ledger's report of sends that became final: give their admission room back.

        Batched sends (S3, SQL) are not counted once handed off: a batch may
        wait for its age or size to fill, which a count of sends would stop it
        from reaching; the batch memory budget bounds them instead.
        """
        if destination not in self._batched:
            self._admission.settle(count)

    def _forward_buffered(self) -> None:
        """The pool's idle hook: forward what this worker's runs handed off."""
        buffered = self._buffered.__dict__.get("outboxes")
        if buffered:
            self._buffered.outboxes = []
            self._buffered.sends = 0
            self._forward(buffered)

    def _forward(self, outboxes: list[list[Outgoing]]) -> None:
        try:
            by_destination: dict[str, list[Outgoing]] = defaultdict(list)
            for outbox in outboxes:
                if not outbox:
                    continue
                destinations = set(map(_destination_of, outbox))
                if len(destinations) == 1:  # the common case: a run's sends go to one place
                    by_destination[destinations.pop()].extend(outbox)
                    continue
                for send in outbox:
                    by_destination[send.destination].append(send)
            for name, sends in by_destination.items():
                self._tell_destination(name, sends)
        finally:
            self.ledger.handed_off(len(outboxes))

    def _tell_destination(self, name: str, sends: list[Outgoing]) -> None:
        try:
            self._refs[name].tell(Deliver(sends))
        except pykka.ActorDeadError:
            if name in self._batched:
                self._budget.release(sum(send.size for send in sends))
            cause = self._failed_destinations.get(name) or "the destination actor is stopped"
            # One settle for the lot: failed and dead-lettered in one write.
            finish_all(sends, "failed", {}, f"destination {name!r} is down: {cause}")

    # -- inspection -------------------------------------------------------------------

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Flush every batch now and wait until all queued deliveries are final.

        Returns False if `timeout` passed first (deliveries go on in the background).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._wait_runs(deadline):
            return False
        self._flush_all(deadline)
        return self.ledger.wait_idle(_time_left(deadline))

    def _flush_all(self, deadline: float | None) -> None:
        """Tell every destination to flush, once the hand-offs in progress have arrived.

        A run counts as finished before its sends are told to the destinations;
        a `Flush` that overtook them would cut their batch in two (one more
        object or load). A hand-off held back by backpressure waits for room
        that only a flush frees, so each time one starts waiting, the
        destinations are flushed first.
        """
        budget, flushed_for_waits = self._budget, -1
        while not self.ledger.wait_hand_offs(_time_left(deadline, at_most=0.01)):
            if budget.waiting and budget.waits != flushed_for_waits:
                flushed_for_waits = budget.waits
                self._tell_all(Flush())
            if deadline is not None and time.monotonic() >= deadline:
                break
        self._tell_all(Flush())

    def _tell_all(self, message: Any) -> None:
        for ref in self._refs.values():
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(message)

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
        return run_id in self._running

    def stats(self) -> dict[str, Any]:
        """Counters: runs by status, per destination accepted/delivered/failed/retries,
        and `admission`: runs and sends in flight against `OUTBOUND_MAX_PENDING`, and
        how many callers wait for room now (backpressure)."""
        stats = self.ledger.stats()
        admission = self._admission
        stats["admission"] = {
            "in_flight": admission.in_flight,
            "limit": admission.limit,
            "waiting": admission.waiting,
        }
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
        from outbound.destinations.sql import SqlQuery

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
        from outbound.server import create_app

        return create_app(self)

    def health(self) -> dict[str, Any]:
        """The state of the runtime and of each destination actor.

        A destination is `failed` once the supervisor gave up on it (with its
        error), `retrying` while a batch has kept failing for longer than
        `health_retrying_after`; SSE also counts events it could not publish.
        Any of these makes the runtime `degraded`.
        """
        children: dict[str, Any] = {}
        supervisor, services = self._supervisor, self._services
        if supervisor is not None and supervisor.is_alive():
            try:
                children = supervisor.proxy().children().get(timeout=5)
            except (pykka.ActorDeadError, pykka.Timeout):
                children = {}
        now = time.monotonic()
        for name, child in children.items():
            status = services.status.get(name) if services is not None else None
            since = status.retrying_since if status is not None else None
            if since is not None and now - since > self.config.health_retrying_after:
                child["retrying_for"] = round(now - since, 3)
                child["last_error"] = status.last_error  # type: ignore[union-attr]
                if child["status"] == "running":
                    child["status"] = "retrying"
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
