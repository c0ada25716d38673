"""What a runtime's workflows are, and whose emits each listens to.

Owns `Registrations`: the workflow registry (`outbound.runs.Workflows`), the
emit subscriptions (listener runs with every event its emitter emits) and the
log of emitted events that `Runtime.emits()` reads; both of these are lent to
the emit destination, which does the emitting. Takes nothing from the runtime;
must not import the runtime facade.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from outbound.destinations.emit.log import EmitLog, Subscriptions
from outbound.runs import UnknownWorkflowError, Workflows


class Registrations:
    """The workflows of one runtime and the emit subscriptions between them."""

    def __init__(self) -> None:
        self.workflows = Workflows()
        self.subscriptions = Subscriptions()
        self.emit_log = EmitLog()

    def register(
        self, workflow_id: str, fn: Callable[..., Any], listens_to: list[str] | tuple[str, ...]
    ) -> None:
        if isinstance(listens_to, str):
            raise TypeError(f"workflow {workflow_id!r}: listens_to must be a list of workflow ids")
        self.workflows.add(workflow_id, fn)
        for emitter in listens_to:
            self.subscribe(listener=workflow_id, emitter=emitter)

    def subscribe(self, listener: str, emitter: str) -> None:
        if listener not in self.workflows:
            raise UnknownWorkflowError(
                f"no workflow {listener!r} to subscribe; register it before subscribing it"
            )
        self.subscriptions.subscribe(listener, emitter)
