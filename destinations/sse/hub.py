"""The SSE hub: per-workflow event streams with history, resume and fan-out.

Owns `SseHub` (the streams: for each workflow a ring buffer of its last
`sse_history` events and its live subscribers) and `Subscription` (one
connected client and its bounded queue); the actor that feeds the hub is
`actor.py`. It knows nothing of HTTP: `outbound.api.sse` turns a subscription into an
`EventSourceResponse`.

Where things live: the hub's streams and every subscriber queue belong to the
runtime's trio loop and are only touched on that loop's thread, so "replay the
history, then go live" is one step with no gap and no duplicate. The actor
appends each `Deliver` to the hub's thread-safe inbox and asks the trio loop to
publish it (one hand-over per run, not per subscriber); the publisher numbers
the events (`id:` = a per-stream sequence number, never reused while the hub
lives), encodes each one once, stores it in the history and puts it into every
subscriber's bounded trio memory channel with `send_nowait`. A subscriber whose
queue is full is disconnected; it resumes with `Last-Event-ID`. The hub never
waits for a subscriber (sse-starlette's `send_timeout` cannot help: hypercorn's
trio worker shields its socket writes). One hub task queues a `:keepalive`
comment for every subscriber that has had nothing for `sse_keepalive` seconds,
so comments never interleave with events and no per-connection timer is needed.

In a cluster the numbering is not the hub's: `shared` (a `SharedSse`, set by
the runtime while it runs) stores each event in a stream every node reads,
and the events come back numbered by that stream (`publish(..., event_id=)`),
the same on every node; this hub then only keeps history and fans out.
A client whose `Last-Event-ID` is older than the history kept, with events
after it dropped, first gets a `history-lost` event (no `id:`, so its last id
stays), as Mercure signals lost history.

Must not import the runtime or another destination.
"""

from __future__ import annotations

import collections
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import trio

from outbound.actors import TrioLoop
from outbound.destinations.delivery import describe_error
from outbound.destinations.sse.settings import SseSettings
from outbound.destinations.sse.shared import SharedSse

logger = logging.getLogger(__name__)

KEEPALIVE = b":keepalive\n\n"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
#: Frames joined into one socket write when a subscriber has a backlog.
MAX_FRAMES_PER_WRITE = 64


def encode_frame(event_id: int, channel: str, data: bytes | str) -> bytes:
    """One event in the `text/event-stream` format; multi-line data becomes several `data:`."""
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    lines = [f"id: {event_id}", f"event: {channel}"]
    lines.extend(f"data: {line}" for line in _LINE_BREAK.split(text))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


@dataclass(frozen=True, slots=True)
class SseFrame:
    """An event of a stream, encoded once for every subscriber."""

    id: int
    channel: str
    data: bytes
    wire: bytes


#: Queued like an event, so keepalives and events never interleave mid-frame.
KEEPALIVE_FRAME = SseFrame(0, "", b"", KEEPALIVE)
#: The event that tells a resuming client some events after its `Last-Event-ID` are gone.
HISTORY_LOST = "history-lost"


def history_lost_frame(last_event_id: int, oldest_event_id: int | None) -> SseFrame:
    """`event: history-lost` without an `id:` (the client keeps its last id), data saying
    which id it asked for and the oldest one still kept."""
    data = json.dumps({"last_event_id": str(last_event_id), "oldest_event_id": oldest_event_id})
    wire = f"event: {HISTORY_LOST}\ndata: {data}\n\n".encode()
    return SseFrame(0, HISTORY_LOST, data.encode(), wire)


class Subscription:
    """One connected client: its bounded queue and why it was cut off, if it was."""

    __slots__ = (
        "workflow_id",
        "send",
        "receive",
        "dropped",
        "replay",
        "quiet_since",
        "on_drop",
        "seen_up_to",
    )

    def __init__(
        self, workflow_id: str, queue_size: int, replay: list[SseFrame], now: float
    ) -> None:
        self.workflow_id = workflow_id
        self.send, self.receive = trio.open_memory_channel[SseFrame](queue_size)
        self.dropped = False  # True when cut off for a full queue
        self.replay = replay  # history after the client's Last-Event-ID, sent first
        self.quiet_since = now  # trio time of the last thing queued for it
        #: Called (on the hub's loop) when it is cut off for a full queue: the
        #: server uses it to close the connection a stalled write may be holding.
        self.on_drop: Callable[[], Any] | None = None
        #: Events up to this id reached the client elsewhere (a cluster node whose reader
        #: is behind the client's `Last-Event-ID`): not sent again.
        self.seen_up_to = 0


class _Stream:
    __slots__ = ("history", "subscribers", "last_id", "dropped_id")

    def __init__(self, history: int) -> None:
        self.history: collections.deque[SseFrame] = collections.deque(maxlen=history)
        self.subscribers: set[Subscription] = set()
        self.last_id = 0
        self.dropped_id = 0  # the newest id that left the history: older ones are lost


@dataclass(frozen=True, slots=True)
class PublishFailed:
    """The outcome of an event that could not be published (its send fails)."""

    error: str


class HubClosedError(RuntimeError):
    """The hub is shutting down and accepts no new subscribers."""


class SseHub:
    """Every workflow's stream. The "trio loop only" methods must run on the bound loop's thread."""

    def __init__(self, history: int = 100, queue_size: int = 1000, keepalive: float = 15.0) -> None:
        self.history_size = history
        self.queue_size = queue_size
        self.keepalive = keepalive
        self._keepalive_running = False
        self._streams: dict[str, _Stream] = {}
        self._inbox: collections.deque[tuple[Any, list[tuple[Any, ...]]]] = collections.deque()
        self._drain_scheduled = False
        self._loop: TrioLoop | None = None
        self.closed = False
        self.subscribers = 0  # live subscriptions, all streams
        self.disconnected = 0  # subscriptions cut off for a full queue
        self.published = 0
        self.publish_errors = 0  # events that could not be published
        self.last_publish_error: str | None = None
        #: The cluster's stream while the runtime runs in one (ids are then its numbers).
        self.shared: SharedSse | None = None

    @classmethod
    def from_config(cls, config: SseSettings) -> SseHub:
        return cls(config.sse_history, config.sse_queue, config.sse_keepalive)

    # -- any thread ------------------------------------------------------------------

    def bind(self, loop: TrioLoop) -> None:
        """Attach the hub to the trio loop its streams live on.

        A runtime started again binds its hub to a new loop: what belonged to
        the old one (a scheduled publish, the keepalive task, "closed" from
        the API server's shutdown) is reset; the streams' history is kept. What
        the old loop never published was dead-lettered by the stop.
        """
        if loop is not self._loop and self._loop is not None:
            self._inbox.clear()
            self._drain_scheduled = False
            self._keepalive_running = False
            self.closed = False
        self._loop = loop

    @property
    def loop(self) -> TrioLoop | None:
        return self._loop

    def on_loop_thread(self) -> bool:
        loop = self._loop
        return loop is not None and loop.in_loop_thread()

    def enqueue(self, token: Any, events: list[tuple[Any, ...]]) -> bool:
        """Queue `(workflow_id, channel, data[, event_id])` events for `publish_pending`
        (thread-safe); `event_id`: the number the cluster's stream gave the event.

        Returns True when the caller must schedule `publish_pending` on the
        loop; False when one is already scheduled and will take these too.
        """
        self._inbox.append((token, events))
        if self._drain_scheduled:
            return False
        self._drain_scheduled = True
        return True

    def queued(self) -> list[Any]:
        """The tokens of what is enqueued and not yet published (thread-safe)."""
        return [token for token, _events in list(self._inbox)]

    def drain_not_scheduled(self) -> None:
        """Scheduling `publish_pending` failed: let the next `enqueue` try again."""
        self._drain_scheduled = False

    # -- trio loop only --------------------------------------------------------------------

    async def publish_pending(self) -> list[tuple[Any, list[tuple[int, int] | PublishFailed]]]:
        """Publish everything enqueued, in order; `(token, [(event_id, subscribers)])` per batch.

        An event that cannot be published fails alone (`PublishFailed`): the
        events queued around it are published.
        """
        self._drain_scheduled = False  # before popping: a later enqueue schedules anew
        outcomes = []
        inbox = self._inbox
        while inbox:
            token, events = inbox.popleft()
            outcomes.append((token, [self._publish_one(*event) for event in events]))
        return outcomes

    def _publish_one(self, *event: Any) -> tuple[int, int] | PublishFailed:
        try:
            return self.publish(*event)
        except Exception as error:
            return PublishFailed(self.publish_failed(error))

    def publish_failed(self, error: BaseException) -> str:
        """Count a publishing error for `Runtime.health()`; returns its description."""
        self.publish_errors += 1
        self.last_publish_error = f"could not publish: {describe_error(error)}"
        return self.last_publish_error

    def publish(
        self, workflow_id: str, channel: str, data: bytes, event_id: int | None = None
    ) -> tuple[int, int]:
        """Add one event to a stream and fan it out; returns (event id, subscribers reached).

        `event_id` None: the next number of this hub's stream. Given (the cluster's
        number): an id not above the last one is a repeat and is not published again.
        """
        stream = self._stream(workflow_id)
        if event_id is None:
            event_id = stream.last_id + 1  # taken only once the event could be framed
        elif event_id <= stream.last_id:
            return event_id, 0
        frame = SseFrame(event_id, channel, data, encode_frame(event_id, channel, data))
        stream.last_id = event_id
        history = stream.history
        if len(history) == history.maxlen and history:
            stream.dropped_id = history[0].id
        history.append(frame)
        self.published += 1
        reached = 0
        cut_off: list[Subscription] = []
        now = trio.current_time()
        for subscription in stream.subscribers:
            if event_id <= subscription.seen_up_to:
                continue
            subscription.quiet_since = now
            try:
                subscription.send.send_nowait(frame)
            except trio.WouldBlock:
                subscription.dropped = True
                cut_off.append(subscription)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                cut_off.append(subscription)
            else:
                reached += 1
        for subscription in cut_off:
            self._cut_off(subscription)
        return frame.id, reached

    def _cut_off(self, subscription: Subscription) -> None:
        """Remove a subscriber whose queue is full (or whose reader is gone)."""
        self.unsubscribe(subscription)
        if not subscription.dropped:
            return
        self.disconnected += 1
        logger.info(
            "SSE subscriber of %r disconnected: %d events queued unread",
            subscription.workflow_id,
            self.queue_size,
        )
        if subscription.on_drop is not None:
            try:
                subscription.on_drop()
            except Exception:
                logger.exception("closing a cut-off SSE connection failed")

    def subscribe(self, workflow_id: str, last_event_id: str | None = None) -> Subscription:
        """A new subscriber: the history after `last_event_id` (all of it if None), then live.

        An id that is not a number, or newer than the stream has (a previous
        process), replays the whole history; in a cluster, a newer id replays
        nothing (this node's reader is behind: what follows it arrives live). An id
        older than the history, with events after it dropped, is told
        `history-lost` first.
        """
        if self.closed:
            raise HubClosedError("the SSE hub is shutting down")
        stream = self._stream(workflow_id)
        after = _parse_event_id(last_event_id)
        seen_up_to = 0
        if after is not None and after > stream.last_id and self.shared is not None:
            # The cluster's numbers: this node has not read that far yet; what follows
            # comes live, without the events up to `after` the client already has.
            replay, seen_up_to = [], after
        elif after is None or after > stream.last_id:
            replay = list(stream.history)
        else:
            replay = [frame for frame in stream.history if frame.id > after]
            if after < stream.dropped_id:
                oldest = stream.history[0].id if stream.history else None
                replay.insert(0, history_lost_frame(after, oldest))
        subscription = Subscription(workflow_id, self.queue_size, replay, trio.current_time())
        subscription.seen_up_to = seen_up_to
        stream.subscribers.add(subscription)
        self.subscribers += 1
        if not self._keepalive_running and self._loop is not None:
            self._keepalive_running = True
            self._loop.spawn(self._keep_alive)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        stream = self._streams.get(subscription.workflow_id)
        if stream is not None and subscription in stream.subscribers:
            stream.subscribers.discard(subscription)
            self.subscribers -= 1
        subscription.send.close()

    def close_all(self) -> int:
        """End every stream's subscriptions (shutdown); refuse new ones. Returns how many."""
        self.closed = True
        count = 0
        for stream in self._streams.values():
            for subscription in list(stream.subscribers):
                self.unsubscribe(subscription)
                count += 1
        return count

    def _stream(self, workflow_id: str) -> _Stream:
        stream = self._streams.get(workflow_id)
        if stream is None:
            stream = self._streams[workflow_id] = _Stream(self.history_size)
        return stream

    async def _keep_alive(self) -> None:
        """One task for all streams: a `:keepalive` comment to each subscriber left quiet."""
        tick = max(0.01, self.keepalive / 4)
        while not self.closed:
            await trio.sleep(tick)
            now = trio.current_time()
            for stream in self._streams.values():
                quiet = [
                    subscription
                    for subscription in stream.subscribers
                    if now - subscription.quiet_since >= self.keepalive
                ]
                for subscription in quiet:
                    subscription.quiet_since = now
                    try:
                        subscription.send.send_nowait(KEEPALIVE_FRAME)
                    except trio.WouldBlock:  # full of keepalives it never read
                        subscription.dropped = True
                        self._cut_off(subscription)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self._cut_off(subscription)

    async def frames(self, subscription: Subscription) -> AsyncIterator[bytes]:
        """The bytes to write to one client: its replay, then live events and keepalives."""
        if subscription.replay:
            yield b"".join(frame.wire for frame in subscription.replay)
            subscription.replay = []
        receive = subscription.receive
        while True:
            try:
                frame = await receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            if subscription.dropped:
                return
            chunks = [frame.wire]
            while len(chunks) < MAX_FRAMES_PER_WRITE:
                try:
                    chunks.append(receive.receive_nowait().wire)
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            yield chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _parse_event_id(raw: str | None) -> int | None:
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isdigit():
        return None
    return int(raw)
