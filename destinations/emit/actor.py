"""The emit destination: an emitted event starts a run of every workflow listening to it.

Owns `Subscriptions` (which workflow listens to which), `EmitLog` (the last
`EMIT_HISTORY` events each workflow emitted, with the runs they started) and
`EmitDestination` (the actor). A send's record is delivered once the listener
runs have been started (not finished: they are runs of their own, with their
own results and deliveries). Each listener run is one emit deeper than the
run that emitted; a chain deeper than `emit_max_depth` is stopped there and
recorded as a failed delivery, so a cycle of workflows emitting to each other
ends instead of looping forever. Starting runs goes through
`Services.submit_run`; this module must not import `runtime`.
"""

from __future__ import annotations

import collections
import json
import threading
from dataclasses import dataclass
from typing import Any

from outbound.destinations.base import Destination, Services
from outbound.destinations.delivery import Outgoing

EMIT_HISTORY = 1_000  # emitted events kept per emitting workflow


class Subscriptions:
    """Who listens to whom: `emitter -> listeners`, in subscription order. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[str, tuple[str, ...]] = {}

    def subscribe(self, listener: str, emitter: str) -> None:
        for name, value in (("listener", listener), ("emitter", emitter)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a workflow id (a non-empty string)")
        with self._lock:
            current = self._listeners.get(emitter, ())
            if listener not in current:
                self._listeners[emitter] = (*current, listener)

    def listeners(self, emitter: str) -> tuple[str, ...]:
        return self._listeners.get(emitter, ())  # tuples are replaced, never mutated


@dataclass(frozen=True, slots=True)
class EmitRecord:
    """One emitted event as kept in the log."""

    id: str  # the send's delivery id
    workflow_id: str  # the emitter
    run_id: str  # the emitting run
    emitted_at: float
    depth: int  # emits that led to the emitting run (0: started by a caller)
    raw_event: bytes  # JSON, as sent
    listener_runs: tuple[tuple[str, str], ...]  # (workflow id, run id) started by it
    status: str  # "delivered" or "failed"
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "workflow_id": self.workflow_id,
            "run_id": self.run_id,
            "emitted_at": self.emitted_at,
            "depth": self.depth,
            "raw_event": json.loads(self.raw_event),
            "listener_runs": [
                {"workflow_id": workflow_id, "run_id": run_id}
                for workflow_id, run_id in self.listener_runs
            ],
            "status": self.status,
            "error": self.error,
        }


class EmitLog:
    """The last `history` emitted events of each workflow. Thread-safe."""

    def __init__(self, history: int = EMIT_HISTORY) -> None:
        self._lock = threading.Lock()
        self._history = history
        self._events: dict[str, collections.deque[EmitRecord]] = {}

    def record(self, entry: EmitRecord) -> None:
        with self._lock:
            events = self._events.get(entry.workflow_id)
            if events is None:
                events = self._events[entry.workflow_id] = collections.deque(maxlen=self._history)
            events.append(entry)

    def list(self, workflow_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Oldest first; with `limit`, only the most recent `limit` events."""
        with self._lock:
            entries = list(self._events.get(workflow_id, ()))
        if limit is not None:
            entries = entries[-limit:] if limit > 0 else []
        return [entry.as_dict() for entry in entries]


class EmitDestination(Destination):
    """Starts a run of each listening workflow for every emitted event."""

    name = "emit"

    def __init__(self, services: Services, subscriptions: Subscriptions, log: EmitLog) -> None:
        super().__init__(services=services)
        self.subscriptions = subscriptions
        self.log = log
        self.max_depth = services.config.emit_max_depth

    def deliver(self, sends: list[Outgoing]) -> None:
        for send in sends:
            if not send.final:
                self._emit(send)

    def _emit(self, send: Outgoing) -> None:
        if not _is_json_object(send.payload):
            self.failed(send, "an emit payload is a JSON object as bytes, from ctx.send.emit()")
            return
        depth = send.depth + 1  # the depth of the runs this emit would start
        started: list[tuple[str, str]] = []
        error: str | None = None
        if depth > self.max_depth:
            error = (
                f"emit chain too deep: these listener runs would be {depth} emits deep, "
                f"over the limit of {self.max_depth} (OUTBOUND_EMIT_MAX_DEPTH); "
                "no listener run was started"
            )
        else:
            refused: dict[str, str] = {}
            for listener in self.subscriptions.listeners(send.workflow_id):
                try:
                    run_id = self._start(listener, send.payload, depth)
                except Exception as problem:  # unknown workflow, runtime stopped
                    refused[listener] = f"{type(problem).__name__}: {problem}"
                else:
                    started.append((listener, run_id))
            if refused:
                error = f"could not start listener runs: {refused}"
        self.log.record(
            EmitRecord(
                send.id,
                send.workflow_id,
                send.run_id,
                send.accepted_at,
                send.depth,
                send.payload,
                tuple(started),
                "failed" if error else "delivered",
                error,
            )
        )
        detail = {
            "listener_runs": [{"workflow_id": w, "run_id": r} for w, r in started],
            "depth": send.depth,
        }
        if error:
            self.failed(send, error, max_depth=self.max_depth, **detail)
        else:
            self.delivered(send, **detail)

    def _start(self, listener: str, raw_event: bytes, depth: int) -> str:
        submit = self.services.submit_run if self.services else None
        if submit is None:
            raise RuntimeError("this runtime cannot start listener runs")
        # Each listener gets its own copy of the event.
        future = submit(listener, json.loads(raw_event), depth)
        return str(future.run_id)


def _is_json_object(payload: Any) -> bool:
    if not isinstance(payload, bytes):
        return False
    try:
        return isinstance(json.loads(payload), dict)
    except ValueError:
        return False
