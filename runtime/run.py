"""One workflow run: the `WorkflowRun` actor, the `ctx` it passes and the `RunResult`.

Owns running a workflow function once for one event. The run is a pooled
actor (runs are many and short). It calls the function with `(event, ctx)`;
an `async def` workflow is handed to the runtime's workflow loop (an asyncio
loop no destination uses) and its result comes back as a message. When the
function returns, raises, or calls `ctx.end()`, the run hands its result and
outbox to the runtime in one piece (`hand_off`) and settles its future. It
never does I/O itself and never touches destinations directly.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from outbound.actors import ActorPool, AsyncioLoop, LoopResult, PooledActor
from outbound.event_excerpt import event_excerpt
from outbound.send import RunInfo, SendCollector
from outbound.tracing import (
    RunTrace,
    await_in_trace,
    call_in_trace,
    end_run_trace,
    start_run_trace,
)

if TYPE_CHECKING:
    from outbound.config import Config
    from outbound.destinations.delivery import Send

logger = logging.getLogger(__name__)

RunStatus = Literal["succeeded", "ended", "failed"]


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended. Its deliveries are in `Runtime.deliveries(run_id)`."""

    run_id: str
    workflow_id: str
    status: RunStatus
    sends: int
    error: str | None = None
    value: Any = None
    started_at: float = 0.0
    duration: float = 0.0
    traceback: str | None = None  # a failed run's formatted traceback
    # Its event as JSON text, cut to OUTBOUND_RUN_EVENT_EXCERPT characters (`event_excerpt`).
    event: str | None = None

    def as_dict(self) -> dict[str, Any]:
        value = self.value
        if value is not None and not isinstance(value, str | int | float | bool | list | dict):
            value = repr(value)
        return {
            "run_id": self.run_id,
            "workflow_id": self.workflow_id,
            "status": self.status,
            "sends": self.sends,
            "error": self.error,
            "value": value,
            "started_at": self.started_at,
            "duration": self.duration,
            "traceback": self.traceback,
            "event": self.event,
        }


class RunFuture(concurrent.futures.Future[RunResult]):
    """What `Runtime.submit` returns: a `Future[RunResult]` whose `run_id` is known at once.

    While the run is in progress it sits in `running` (its runtime's runs in
    flight, by id), so `GET /runs/{id}` can answer "running"; it leaves when
    settled, after the run's result is in the ledger. `awaited`: a caller waits
    for this run (`rt.run`, `rt.arun`), so its sends are told to the destinations
    before the result is set: runs a caller makes one after another reach each
    destination in that order (runs on other pool workers cannot overtake them).
    `journal_event`: the journaled event this run is for (`rt.publish`), let go of
    once the run's sends are journaled. `workflow_id` and `submitted_at` (wall
    clock) are what the inspector lists of a run in progress.
    """

    __slots__ = ("run_id", "workflow_id", "submitted_at", "_running", "awaited", "journal_event")

    def __init__(
        self,
        run_id: str,
        running: dict[str, RunFuture],
        awaited: bool = False,
        journal_event: Any = None,
        workflow_id: str = "",
    ) -> None:
        super().__init__()
        self.run_id = run_id
        self.workflow_id = workflow_id
        self.submitted_at = time.time()
        self._running = running
        self.awaited = awaited
        self.journal_event = journal_event  # an `outbound.journal.entries.EventEntry`
        running[run_id] = self

    def set_result(self, result: RunResult) -> None:
        self._running.pop(self.run_id, None)
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        self._running.pop(self.run_id, None)
        super().set_exception(exception)


class EndRun(BaseException):  # noqa: N818 - a control-flow signal, not an error
    """Raised by `ctx.end()`; a BaseException so `except Exception` in workflows lets it pass."""

    def __init__(self, value: Any = None) -> None:
        super().__init__(value)
        self.value = value


class Context:
    """The `ctx` a workflow receives: `ctx.send`, `ctx.end()`, and who is running."""

    __slots__ = ("send", "run_id", "workflow_id", "depth")

    def __init__(self, info: RunInfo, send: SendCollector) -> None:
        self.send = send
        self.run_id = info.run_id
        self.workflow_id = info.workflow_id
        self.depth = info.depth

    def end(self, value: Any = None) -> None:
        """End the run now: sends made so far are delivered, code after this does not run."""
        raise EndRun(value)


@dataclass(frozen=True, slots=True)
class Workflow:
    workflow_id: str
    fn: Callable[..., Any]
    is_async: bool

    @classmethod
    def of(cls, workflow_id: str, fn: Callable[..., Any]) -> Workflow:
        return cls(workflow_id, fn, inspect.iscoroutinefunction(fn))


@dataclass(frozen=True, slots=True)
class RunEnvironment:
    """What every run of one runtime shares."""

    config: Config
    pool: ActorPool
    workflow_loop: AsyncioLoop  # async workflows run here, never on a destination's loop
    available: Callable[[str], bool]
    # (result, outbox, future): records the run, hands its sends on and settles its
    # future (at once, or once the journal stored the sends).
    hand_off: Callable[[RunResult, list[Send], RunFuture], None]


class WorkflowRun(PooledActor):
    """Runs one workflow call on the shared pool, then hands its sends off and stops."""

    registered = False  # thousands a second: kept out of pykka's global registry

    def __init__(
        self,
        env: RunEnvironment,
        workflow: Workflow,
        event: Any,
        info: RunInfo,
        future: concurrent.futures.Future[RunResult],
    ) -> None:
        super().__init__()
        self.pool = env.pool
        self._env = env
        self._workflow = workflow
        self._event = event
        self._info = info
        self._future = future
        self._started_at = 0.0
        self._t0 = 0.0
        self._event_text: str | None = None
        self._trace: RunTrace | None = None  # its span (and trace context), when traced

    def on_start(self) -> None:
        # Made here, not in __init__: a run waiting for a worker is fewer objects
        # for the garbage collector to walk while a burst of submits queues up.
        env = self._env
        self._ctx = Context(self._info, SendCollector(self._info, env.config, env.available))
        self._started_at = time.time()
        self._t0 = time.perf_counter()
        # Before the workflow runs: what it was called with, even if it changes the event.
        self._event_text = event_excerpt(self._event, env.config.run_event_excerpt)
        self._trace = start_run_trace(self._info)
        if self._workflow.is_async:
            self._env.workflow_loop.spawn(self._call_async, reply_to=self.actor_ref, tag="workflow")
            return
        try:
            value = call_in_trace(self._trace, self._workflow.fn, self._event, self._ctx)
        except EndRun as end:
            self._conclude("ended", value=end.value)
        except Exception as error:
            self._conclude("failed", error=error)
        else:
            self._conclude("succeeded", value=value)

    async def _call_async(self) -> tuple[RunStatus, Any]:
        try:
            return "succeeded", await await_in_trace(
                self._trace, self._workflow.fn, self._event, self._ctx
            )
        except EndRun as end:
            return "ended", end.value

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, LoopResult):
            if message.error is not None:
                self._conclude("failed", error=message.error)
            else:
                status, value = message.value
                self._conclude(status, value=value)
            return None
        return super().on_receive(message)

    def on_failure(self, *exc_info: Any) -> None:  # pragma: no cover - defensive
        if not self._future.done():
            self._conclude("failed", error=exc_info[1])

    def _conclude(self, status: RunStatus, value: Any = None, error: BaseException | None = None):
        info = self._info
        outbox = self._ctx.send.outbox
        error_text = traceback_text = None
        if error is not None:
            error_text = "".join(traceback.format_exception_only(type(error), error)).strip()
            traceback_text = "".join(traceback.format_exception(error)).rstrip()
            # The traceback as the record's exception: a plain line is followed by it,
            # a JSON line (OUTBOUND_LOG_FORMAT=json) holds it in one field.
            logger.warning(
                "workflow %r run %s failed: %s",
                info.workflow_id,
                info.run_id,
                error_text,
                exc_info=error,
                extra={"workflow_id": info.workflow_id, "run_id": info.run_id},
            )
            if not self._env.config.deliver_on_error:
                outbox = []
        result = RunResult(
            info.run_id,
            info.workflow_id,
            status,
            len(outbox),
            error_text,
            value,
            self._started_at,
            time.perf_counter() - self._t0,
            traceback_text,
            self._event_text,
        )
        if self._trace is not None:
            end_run_trace(self._trace, status, len(outbox), error_text)
        try:
            self._env.hand_off(result, outbox, self._future)  # type: ignore[arg-type]
        except BaseException:
            if not self._future.done():
                self._future.set_result(result)
            raise
        finally:
            self._stop()  # directly: a run has nothing else queued to wait for
