"""What the SSE destination asks of a cluster: `SharedSse`, a protocol.

In a cluster every node must show every node's events, in one order, with the
same ids. The runtime's `outbound.journal.sse.ClusterSse` satisfies this
protocol: it stores each event in a JetStream stream all nodes read, and the
stream's sequence number is the event's id. The SSE destination publishes
through it (instead of into the hub) while the hub has one (`SseHub.shared`);
the events come back to every node's hub from the one subscription it keeps.
Must not import the runtime or touch NATS itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class SharedEvent:
    """One SSE send on its way to the cluster's stream."""

    workflow_id: str
    channel: str
    data: bytes
    delivery_id: str  # stored once even if published again (a redelivery)


class SharedSse(Protocol):
    """The cluster's SSE stream, as the SSE destination publishes into it."""

    @property
    def loop(self) -> Any:
        """The `LoopThread` that `publish` runs on."""

    async def publish(self, events: list[SharedEvent]) -> list[int | str]:
        """Store `events` (run on `loop`): each one's id (its sequence number in the
        stream), or why it could not be stored, in order."""
