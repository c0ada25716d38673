"""Starting runs: the registered workflows, admission for a new run, and awaiting its end.

Owns `Workflows` (the registry: ids and functions checked at `register`, an
`UnknownWorkflowError` that names the known ones), `RunStarter` (takes
admission for a run, counts it in the ledger and starts its actor on the pool;
undoes both if the actor cannot start; with a journal, `publish` journals the
event first and `run_recovered` runs the events an earlier process left) and
`arun` (waiting for room and for a run's end from trio or asyncio code without
blocking the loop). What a run does is `outbound.run`'s. Takes what it needs
as arguments; must not import the runtime facade.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sniffio

from outbound.actors.ids import new_id
from outbound.admission import Admission, poll_admission
from outbound.deadlines import time_left
from outbound.destinations.delivery import Ledger
from outbound.journal.codec import JournaledEvent
from outbound.journal.journal import Journal
from outbound.run import RunEnvironment, RunFuture, RunResult, Workflow, WorkflowRun
from outbound.send import RunInfo
from outbound.tracing import current_traceparent

logger = logging.getLogger(__name__)


class UnknownWorkflowError(KeyError):
    """`run`/`submit` named a workflow that was never registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown workflow"


class Workflows:
    """The workflows of one runtime, by id."""

    def __init__(self) -> None:
        self._by_id: dict[str, Workflow] = {}

    def add(self, workflow_id: str, fn: Callable[..., Any]) -> None:
        if not isinstance(workflow_id, str) or not workflow_id:
            raise ValueError("workflow_id must be a non-empty string")
        if not callable(fn):
            raise TypeError(f"workflow {workflow_id!r}: {fn!r} is not callable")
        if workflow_id in self._by_id:
            raise ValueError(f"workflow {workflow_id!r} is already registered")
        self._by_id[workflow_id] = Workflow.of(workflow_id, fn)

    def get(self, workflow_id: str) -> Workflow:
        try:
            return self._by_id[workflow_id]
        except KeyError:
            known = ", ".join(sorted(self._by_id)) or "none registered"
            raise UnknownWorkflowError(
                f"no workflow {workflow_id!r}; known workflows: {known}"
            ) from None

    def __contains__(self, workflow_id: object) -> bool:
        return workflow_id in self._by_id

    def ids(self) -> list[str]:
        return list(self._by_id)


@dataclass(frozen=True, slots=True)
class JournaledRun:
    """A run whose event is in the journal: its run id, and the entry to let go of."""

    run_id: str
    event_entry: Any  # `outbound.journal.entries.EventEntry`
    traceparent: str | None = None  # the trace its publisher was in (kept with the event)


@dataclass(frozen=True, slots=True)
class QueuedRun:
    """A run journaled into the cluster's queue: its id is known; a node with room runs it."""

    run_id: str


class RunStarter:
    """Starts runs of one runtime: admission, the ledger's count, the run actor."""

    def __init__(self, ledger: Ledger, admission: Admission) -> None:
        self.ledger = ledger
        self.admission = admission
        self.running: dict[str, RunFuture] = {}  # runs in progress, by id

    def start(
        self,
        env: RunEnvironment,
        actor_type: type[WorkflowRun],
        workflow: Workflow,
        event: Any,
        depth: int,
        timeout: float | None,
        may_wait: Callable[[], bool],
        state: Callable[[], str],
        awaited: bool = False,
        journaled: JournaledRun | None = None,
    ) -> RunFuture:
        """Start one run of `workflow`; `state()` is the runtime's, checked after waiting.

        A run submitted by a caller (depth 0) waits for room up to `timeout`
        (`Busy` after it; `AdmissionClosed` if the runtime begins stopping
        meanwhile). A listener run started by an emit must not wait on its
        emitter's room: it is counted without waiting. A `journaled` run (its
        event is in the journal) keeps the event's run id; its room was taken
        before the event was journaled.
        """
        admission = self.admission
        if journaled is not None:
            pass
        elif depth == 0:
            admission.admit(timeout, may_wait)
            if state() != "running":  # stop() began while this call waited for room
                admission.settle(1)
                raise RuntimeError(f"the runtime is {state()}: this run was not started")
        else:
            admission.take()
        # The trace its caller is in, or its publisher was in (a journaled event).
        traceparent = (journaled and journaled.traceparent) or current_traceparent()
        if journaled is None:
            info = RunInfo(new_id(), workflow.workflow_id, depth, traceparent)
            future = RunFuture(info.run_id, self.running, awaited, None, workflow.workflow_id)
        else:
            info = RunInfo(journaled.run_id, workflow.workflow_id, depth, traceparent)
            future = RunFuture(
                info.run_id, self.running, awaited, journaled.event_entry, workflow.workflow_id
            )
        self.ledger.run_started(future)
        try:
            actor_type.start(env, workflow, event, info, future)
        except BaseException:
            self.ledger.run_finished(
                RunResult(info.run_id, workflow.workflow_id, "failed", 0, "not started")
            )
            admission.settle(1)
            self.running.pop(info.run_id, None)
            raise
        return future

    def publish(
        self,
        env: RunEnvironment,
        actor_type: type[WorkflowRun],
        workflow: Workflow,
        event: Any,
        journal: Journal,
        timeout: float | None,
        may_wait: Callable[[], bool],
    ) -> str:
        """Take room, journal the event (at most `OUTBOUND_JOURNAL_WAIT` s), start its run.

        The room is given back if the journal does not store it in time
        (`JournalUnavailable`, a `Busy`): nothing was started.
        """
        run_id = new_id()
        journaled = JournaledEvent(run_id, workflow.workflow_id, event, 0, current_traceparent())
        if journal.clustered:
            # The event waits in the cluster's queue; whichever node has room runs it.
            wait = journal.settings.journal_wait if timeout is None else timeout
            deadline = time.monotonic() + wait
            if journal.cluster is not None:  # None only while the node starts
                journal.cluster.wait_for_room(wait)
            journal.append_event(journaled, max(0.25, deadline - time.monotonic()))
            return run_id
        deadline = None if timeout is None else time.monotonic() + timeout
        self.admission.admit(timeout, may_wait)
        try:
            wait = time_left(deadline, at_most=journal.settings.journal_wait)
            entry = journal.append_event(journaled, wait)
        except BaseException:
            self.admission.settle(1)
            raise
        run = JournaledRun(run_id, entry, journaled.traceparent)
        self._start_journaled(env, actor_type, workflow, event, run)
        return run_id

    def queue_listener_run(
        self, journal: Journal, workflow: Workflow, event: Any, depth: int, run_id: str
    ) -> QueuedRun:
        """A listener run of an emit, in a cluster: journaled for whichever node has room.

        `run_id` is derived from the emit's delivery id, so an emit delivered
        again (after a crash) queues the same run, stored once.
        """
        event_ = JournaledEvent(run_id, workflow.workflow_id, event, depth)
        journal.append_event(event_, journal.settings.journal_wait, once=True)
        return QueuedRun(run_id)

    def run_recovered(
        self,
        env: RunEnvironment,
        actor_type: type[WorkflowRun],
        workflows: Workflows,
        events: list[tuple[Any, JournaledEvent]],
    ) -> None:
        """Run events an earlier process journaled but did not finish, with their run ids.

        An event for a workflow no longer registered stays in the journal (logged).
        """
        for entry, journaled in events:
            if journaled.workflow_id not in workflows:
                logger.error(
                    "journal: the event of run %s is for workflow %r, which is not registered "
                    "here; it stays in the journal",
                    journaled.run_id,
                    journaled.workflow_id,
                )
                continue
            self.run_event(env, actor_type, workflows, entry, journaled)

    def run_event(
        self,
        env: RunEnvironment,
        actor_type: type[WorkflowRun],
        workflows: Workflows,
        entry: Any,
        journaled: JournaledEvent,
    ) -> None:
        """Run a journaled event with its run id: one an earlier process left, or one this
        node pulled from the cluster's queue (the puller checked for room). Counted in
        admission, never waited for (it was accepted already). An unknown workflow raises
        `UnknownWorkflowError` (in a cluster, another node may run it)."""
        workflow = workflows.get(journaled.workflow_id)
        self.admission.take()
        run = JournaledRun(journaled.run_id, entry, journaled.traceparent)
        self._start_journaled(env, actor_type, workflow, journaled.event, run, journaled.depth)

    def _start_journaled(
        self,
        env: RunEnvironment,
        actor_type: type[WorkflowRun],
        workflow: Workflow,
        event: Any,
        journaled: JournaledRun,
        depth: int = 0,
    ) -> RunFuture:
        def running() -> str:
            return "running"

        return self.start(
            env,
            actor_type,
            workflow,
            event,
            depth,
            None,
            lambda: False,
            running,
            journaled=journaled,
        )


async def await_run(future: RunFuture) -> RunResult:
    """The result of a run, awaited from trio or asyncio code without blocking its loop."""
    if sniffio.current_async_library() == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
        await done.wait()
        return future.result()
    return await asyncio.wrap_future(future)


async def arun(submit: Callable[..., RunFuture], caller_may_wait: bool) -> RunResult:
    """Submit with `submit(timeout=...)` and await the run's end, never blocking the loop.

    When the runtime is full it tries again every few ms (`poll_admission`)
    until admitted; cancel it to give up. On the runtime's own threads
    (`caller_may_wait` False) a run is admitted at once (see `Admission`).
    """
    if caller_may_wait:
        future = await poll_admission(functools.partial(submit, timeout=0))
    else:
        future = submit(timeout=None)
    return await await_run(future)
