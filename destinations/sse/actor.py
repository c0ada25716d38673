"""The SSE destination actor: hands each run's SSE sends to the hub and records what they reached.

Owns `SseDestination`. Publishing (streams, subscribers, frames) is the hub's
(`hub.py`), on the trio loop; the actor only hands events over and settles
each send with its event id and the subscribers it reached. In a cluster
(`hub.shared`) it hands them to the cluster's stream instead, and settles
each with the id the stream gave it (every node's hub gets it from there).
Must not import the runtime or another destination.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

import pykka

from outbound.actors import LoopResult
from outbound.destinations.base import Destination, Services
from outbound.destinations.delivery import Delivered, Failure, Send
from outbound.destinations.sse.hub import PublishFailed, SseHub
from outbound.destinations.sse.send import SseEvent
from outbound.destinations.sse.settings import SseSettings
from outbound.destinations.sse.shared import SharedEvent, SharedSse

logger = logging.getLogger(__name__)


class SseDestination(Destination):
    """Hands each run's SSE sends to the hub on the trio loop and records what it reached."""

    name = "sse"

    def __init__(self, services: Services, hub: SseHub) -> None:
        super().__init__(services=services)
        self.hub = hub
        self.trio = services.trio
        hub.bind(services.trio)

    def deliver(self, sends: list[Send]) -> None:
        shared = self.hub.shared
        if shared is not None:
            self._publish_shared(shared, sends)
            return
        events = []
        for send in sends:
            event: SseEvent = send.payload
            events.append((send.workflow_id, event.channel, event.data))
        if not self.hub.enqueue(sends, events):
            return  # a publish already scheduled takes these too, in order
        try:
            self.trio.spawn(self.hub.publish_pending, reply_to=self.stable_ref, tag="publish")
        except BaseException:
            self.hub.drain_not_scheduled()
            raise

    def _publish_shared(self, shared: SharedSse, sends: list[Send]) -> None:
        events = [
            SharedEvent(send.workflow_id, send.payload.channel, send.payload.data, send.id)
            for send in sends
        ]

        async def publish() -> list[tuple[list[Send], list[Any]]]:
            return [(sends, await shared.publish(events))]

        shared.loop.spawn(publish, reply_to=self.stable_ref, tag="publish")

    def holds(self) -> set[str]:
        return {send.id for sends in self.hub.queued() for send in sends}

    @staticmethod
    def dead_letter_fields(send: Send) -> dict[str, Any]:
        event: SseEvent = send.payload
        return {"channel": event.channel, "payload": json.loads(event.data)}

    def on_loop_result(self, result: LoopResult) -> None:
        if result.error is not None:
            # Whatever was not published stays unfinished and is dead-lettered at stop.
            logger.error("publishing SSE events failed: %r", result.error)
            self.hub.publish_failed(result.error)
            return
        delivered, failures = [], []
        for sends, outcomes in result.value:
            for send, outcome in zip(sends, outcomes, strict=True):
                send.attempts += 1  # one publish: its record says it was tried once
                if isinstance(outcome, PublishFailed | str):
                    failures.append(Failure(send, getattr(outcome, "error", outcome)))
                elif isinstance(outcome, int):  # stored in the cluster's stream
                    channel = send.payload.channel
                    delivered.append(Delivered(send, {"channel": channel, "event_id": outcome}))
                else:
                    event_id, reached = outcome
                    detail = {
                        "channel": send.payload.channel,
                        "event_id": event_id,
                        "subscribers": reached,
                    }
                    delivered.append(Delivered(send, detail))
        if failures:
            logger.warning("%d SSE events could not be published", len(failures))
        self.settle_each([*delivered, *failures])


def starter(
    config: SseSettings, *, sse_hub: SseHub, **parts: Any
) -> Callable[[Services], pykka.ActorRef[Any]]:
    """What starts the SSE actor, feeding the runtime's hub (which outlives it)."""
    return functools.partial(SseDestination.start, hub=sse_hub)
