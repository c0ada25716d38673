"""The emit destination: an emitted event starts a run of every workflow listening to it.

Owns `EmitDestination` (the actor); who listens and what was emitted are
kept in `log.py`. A send's record is delivered once the listener
runs have been started (not finished: they are runs of their own, with their
own results and deliveries). Each listener run is one emit deeper than the
run that emitted; a chain deeper than `emit_max_depth` is stopped there and
recorded as a failed delivery, so a cycle of workflows emitting to each other
ends instead of looping forever. Starting runs goes through
`Services.submit_run`; this module must not import `runtime`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pykka

from outbound.destinations.base import Destination, Services
from outbound.destinations.delivery import Send
from outbound.destinations.emit.log import EmitLog, EmitRecord, Subscriptions
from outbound.destinations.emit.send import EmittedEvent
from outbound.destinations.emit.settings import EmitSettings


class EmitDestination(Destination):
    """Starts a run of each listening workflow for every emitted event."""

    name = "emit"

    def __init__(self, services: Services, subscriptions: Subscriptions, log: EmitLog) -> None:
        super().__init__(services=services)
        self.subscriptions = subscriptions
        self.log = log
        self.max_depth = services.config.emit_max_depth

    def deliver(self, sends: list[Send]) -> None:
        for send in sends:
            if not send.final:
                self._emit(send)

    def _emit(self, send: Send) -> None:
        event = send.payload
        if type(event) is not EmittedEvent:
            self.failed(send, "an emit payload is an EmittedEvent, made by ctx.send.emit()")
            return
        send.attempts += 1  # starting its listener runs is its one attempt
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
                    run_id = self._start(listener, event.raw_event, depth, send.id)
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
                event.raw_event,
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

    @staticmethod
    def dead_letter_fields(send: Send) -> dict[str, Any]:
        """The event as a JSON object (replayable with `ctx.send.emit`)."""
        event = send.payload
        return {"payload": json.loads(event.raw_event) if type(event) is EmittedEvent else event}

    def _start(self, listener: str, raw_event: bytes, depth: int, emit_id: str) -> str:
        submit = self.services.submit_run if self.services else None
        if submit is None:
            raise RuntimeError("this runtime cannot start listener runs")
        # Each listener gets its own copy of the event. The run id a cluster uses is
        # made from the emit's delivery id: an emit delivered again queues the same run.
        run_id = listener_run_id(emit_id, listener)
        future = submit(listener, json.loads(raw_event), depth, run_id=run_id)
        return str(future.run_id)


def listener_run_id(emit_id: str, listener: str) -> str:
    """The run id of `listener`'s run of emit `emit_id`: 32 hex digits, stable."""
    return hashlib.blake2b(f"{emit_id}/{listener}".encode(), digest_size=16).hexdigest()


def starter(
    config: EmitSettings, *, subscriptions: Subscriptions, emit_log: EmitLog, **parts: Any
) -> Callable[[Services], pykka.ActorRef[Any]]:
    """What starts the emit actor, with the runtime's subscriptions and log (they outlive it)."""
    return functools.partial(EmitDestination.start, subscriptions=subscriptions, log=emit_log)
