"""What the emit destination keeps between runs: who listens to whom, and what was emitted.

Owns `Subscriptions` (which workflow listens to which) and `EmitLog` (the last
`EMIT_HISTORY` events each workflow emitted, with the runs they started). The
runtime makes one of each and lends them to every incarnation of the actor
(`actor.py`). In a cluster the log is shared: what this node records also
goes to `shared` (the runtime's `outbound.journal.emits.ClusterEmits`, which
stores it where every node reads it), and every node's records come back
through `record(..., share=False)`; a record is kept once, by its id.
Thread-safe; no I/O. Must not import the runtime or another destination.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
        # workflow id -> delivery id -> record, oldest first
        self._events: dict[str, collections.OrderedDict[str, EmitRecord]] = {}
        #: Where records go to be shared with the other nodes of a cluster (None: alone).
        self.shared: Callable[[EmitRecord], None] | None = None

    def record(self, entry: EmitRecord, share: bool = True) -> None:
        """Keep `entry` (once: a record already kept is not kept again), and share it."""
        with self._lock:
            events = self._events.get(entry.workflow_id)
            if events is None:
                events = self._events[entry.workflow_id] = collections.OrderedDict()
            if entry.id in events:
                return
            events[entry.id] = entry
            if len(events) > self._history:
                events.popitem(last=False)
        shared = self.shared
        if share and shared is not None:
            shared(entry)

    def list(self, workflow_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Oldest first; with `limit`, only the most recent `limit` events."""
        with self._lock:
            entries = list(self._events.get(workflow_id, {}).values())
        if limit is not None:
            entries = entries[-limit:] if limit > 0 else []
        return [entry.as_dict() for entry in entries]
