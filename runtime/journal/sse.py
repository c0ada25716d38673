"""SSE in a cluster: `ClusterSse`, the stream every node's SSE events go through.

Owns the stream `<CLUSTER>_SSE` (subject `<cluster>.sse.<workflow>`) and this
node's one reader of it. The SSE destination publishes each event into the
stream (`publish`, with the delivery id as `Nats-Msg-Id`, so a redelivered
send is stored once); the stream's sequence number becomes the event's id,
the same on every node, increasing (a workflow's ids have gaps: one sequence
for all workflows). Every node follows the stream from its first kept message
and publishes what it reads into its hub with that id: the hub keeps the
history and fans out to the node's clients. The stream keeps the last
`OUTBOUND_SSE_HISTORY` + 1 events per workflow: the one more tells a node that
starts later that events before its history were dropped (`history-lost`).
Implements `outbound.destinations.sse.shared.SharedSse`; must not import the
runtime facade.
"""

from __future__ import annotations

import asyncio
from typing import Any

from outbound.destinations.delivery import describe_error
from outbound.destinations.sse.hub import SseHub
from outbound.destinations.sse.shared import SharedEvent
from outbound.journal.follow import Follower, stop_following
from outbound.journal.subjects import subject_token, text_of

STREAM_KIND = "sse"


class ClusterSse:
    """The cluster's SSE stream: `start()` once the journal is open, `stop()` before it closes."""

    def __init__(self, journal: Any, hub: SseHub) -> None:
        self.journal = journal
        self.hub = hub
        self.subject = ""
        self._follower: Follower | None = None

    @property
    def loop(self) -> Any:
        return self.journal._loop

    def start(self) -> None:
        """Make the stream, read what it keeps into the hub, then publish through it."""
        import nats.js.api as api

        stream = self.journal.stream(
            STREAM_KIND,
            per_key=True,
            max_msgs_per_subject=self.hub.history_size + 1,
            discard=api.DiscardPolicy.OLD,  # a history: the oldest event goes
        )
        self.subject = stream.subject
        self._follower = Follower(self.journal._js, stream.name, f"{stream.subject}.>", self._read)
        self.journal._call(self._follower.start(), timeout=60.0)
        self.hub.shared = self

    def stop(self) -> None:
        self.hub.shared = None
        follower, self._follower = self._follower, None
        stop_following(self.journal, follower)

    async def publish(self, events: list[SharedEvent]) -> list[int | str]:
        """Store events (in order: one connection keeps them in order); each one's id."""
        publish = self.journal._publish
        stored = await asyncio.gather(
            *(
                publish(
                    f"{self.subject}.{subject_token(event.workflow_id)}",
                    event.channel.encode() + b"\n" + event.data,  # a channel has no line break
                    msg_id=event.delivery_id,
                )
                for event in events
            ),
            return_exceptions=True,
        )
        return [
            describe_error(outcome) if isinstance(outcome, BaseException) else int(outcome)
            for outcome in stored
        ]

    def _read(self, seq: int, subject: str, data: bytes) -> None:
        """One event of the stream (on the journal's loop): into the hub, with its id."""
        channel, _, payload = data.partition(b"\n")
        workflow_id = text_of(subject.rsplit(".", 1)[1])
        hub, loop = self.hub, self.hub.loop
        if loop is None:
            return
        if hub.enqueue(None, [(workflow_id, channel.decode(), payload, seq)]):
            try:
                loop.spawn(hub.publish_pending)
            except BaseException:
                hub.drain_not_scheduled()
                raise

    def state(self) -> dict[str, Any]:
        follower = self._follower
        return {"sse_events_read": follower.received if follower is not None else 0}
