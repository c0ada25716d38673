"""The cluster (`OUTBOUND_JOURNAL=nats://...`): who is alive, shared runs, and takeover.

Owns `Cluster`, started on every node of a cluster (processes with the same
NATS and the same `OUTBOUND_CLUSTER`), on the journal's loop:
- **Liveness.** Each node keeps a key in the KV bucket `<CLUSTER>_NODES`
  (its node id as a subject token), written every third of
  `OUTBOUND_JOURNAL_ACK_WAIT`; the bucket's TTL is the ack wait, so a node
  that stops writing (killed, hung, cut off) is gone from it within that time.
- **Runs anywhere.** Events (`rt.publish`, `POST /workflows/{id}/events` on
  any node) wait in `<CLUSTER>_EVENTS`; one durable pull consumer,
  `<CLUSTER>_RUNS`, shared by all nodes, hands each to one node. A node fetches
  only as many as it has room for (admission): a busy node takes less. The
  event is acknowledged once its run's sends are journaled (a run that takes
  longer tells the consumer it goes on, every third of the ack wait); one not
  acknowledged within the ack wait (its node died) goes to another node, which
  runs it again with the same run id, hence the same delivery ids.
- **A bounded queue.** Every `QUEUE_CHECK_EVERY` s each node reads how many
  events wait for a node (the consumer's pending count); a publish on a node
  that sees `OUTBOUND_JOURNAL_MAX_QUEUED` or more waiting waits for room, then
  is refused (`ClusterFull`, a `Busy`: the API's 503), so a cluster whose
  nodes cannot keep up pushes back on its callers instead of filling NATS's
  disk. The count is a node's estimate between checks (its own publishes
  added): a soft bound. Listener runs of emits are never refused (an emit
  already delivered must start them).
- **Takeover.** Sends are journaled under a subject per node
  (`<cluster>.sends.<node>`) and delivered by that node. Every third of the
  ack wait, each node looks for subjects with messages whose node is not
  alive, claims one (a KV key only one node can create; it expires with the
  ack wait), reads its entries and delivers them as a restarted node would;
  the entries are acknowledged (deleted) as their sends become final.

The hand-off side (what to do with taken-over sends and pulled events) is
given as callbacks; must not import the runtime facade.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from outbound.admission import Busy
from outbound.destinations.delivery import describe_error
from outbound.journal.codec import (
    JournaledEvent,
    JournalFormatError,
    NewerFormatError,
    decode_event,
)
from outbound.journal.entries import EventEntry, SendsEntry
from outbound.journal.follow import once_elected
from outbound.journal.subjects import text_of

logger = logging.getLogger(__name__)

#: Events fetched at once at most (a node also takes no more than it has room for).
PULL_AT_MOST = 64
#: Seconds between two reads of how many events wait for a node (the queue's bound).
QUEUE_CHECK_EVERY = 0.5
#: Seconds a publish waiting for room in the queue sleeps between two looks.
QUEUE_POLL = 0.05


class ClusterFull(Busy):
    """The cluster's queue holds `OUTBOUND_JOURNAL_MAX_QUEUED` events waiting for a node:
    nothing was published; try again later (the API answers 503 with Retry-After)."""


class PulledEvent(EventEntry):
    """An event a node pulled from the shared consumer: acknowledged to it, then deleted."""

    __slots__ = ("_message", "_loop", "pulled_at", "done")

    def __init__(self, stream: str, seq: int, acknowledge: Any, message: Any, loop: Any) -> None:
        super().__init__(stream, seq, acknowledge)
        self._message = message
        self._loop = loop
        self.pulled_at = time.monotonic()
        self.done = False

    def run_journaled(self) -> None:
        self.done = True
        try:
            self._loop.call_soon_threadsafe(self._ack)
        except RuntimeError:  # the loop closed (stopping): redelivered after the ack wait
            return
        super().run_journaled()

    def _ack(self) -> None:  # on the journal's loop
        self._loop.create_task(self._message.ack())

    async def still_running(self) -> None:
        """Tell the consumer this event's run goes on (it restarts the ack wait)."""
        await self._message.in_progress()


class Cluster:
    """One node's part in a cluster: `start()` once the journal is open, `stop()` first at stop."""

    def __init__(
        self,
        journal: Any,
        on_event: Callable[[PulledEvent, JournaledEvent], None],
        on_taken_over: Callable[[list[SendsEntry]], None],
        room: Callable[[], int],
    ) -> None:
        self.journal = journal
        self.ack_wait = journal.settings.journal_ack_wait
        self.on_event = on_event
        self.on_taken_over = on_taken_over
        self.room = room
        self.bucket = f"{journal.settings.cluster}_NODES".upper().replace("-", "_")
        self.consumer = f"{journal.settings.cluster}_RUNS".upper().replace("-", "_")
        self.taken_over = 0  # sends taken over from dead nodes, since start
        self.events_pulled = 0
        self._kv: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._running: set[PulledEvent] = set()  # pulled here, run not yet journaled
        self._stopping = False
        self.max_queued = journal.settings.journal_max_queued
        # Events waiting for a node: as last read, plus this node's publishes since.
        self.queued = 0

    # -- lifecycle (called from other threads; the work runs on the journal's loop) ------

    def start(self) -> None:
        self.journal._call(self._start(), timeout=30.0)

    def stop(self) -> None:
        """Stop pulling events and sweeping; leave the bucket (the others may take over now)."""
        self._stopping = True
        try:
            self.journal._call(self._stop(), timeout=10.0)
        except Exception as error:
            logger.warning("cluster: leaving the cluster cleanly failed: %s", error)

    async def _start(self) -> None:
        import nats.js.api as api

        js = self.journal._js
        try:
            self._kv = await js.create_key_value(
                bucket=self.bucket,
                ttl=self.ack_wait,
                storage=api.StorageType.FILE,
                replicas=self.journal.settings.journal_replicas,
            )
        except Exception:  # made by another node (maybe with another ack wait): use it
            self._kv = await js.key_value(self.bucket)
        await once_elected(self._beat)  # a new replicated bucket may have no leader yet
        subscription = await once_elected(
            lambda: js.pull_subscribe(
                self.journal.events_subject,
                durable=self.consumer,
                stream=self.journal.events_stream,
                config=api.ConsumerConfig(
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=self.ack_wait,
                    max_deliver=-1,
                    max_ack_pending=-1,
                ),
            )
        )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._heartbeat()),
            loop.create_task(self._sweep_forever()),
            loop.create_task(self._pull(subscription)),
            loop.create_task(self._keep_long_runs()),
            loop.create_task(self._watch_queue()),
        ]

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._kv is not None:
            try:
                await self._kv.delete(self.journal.node_token)
            except Exception as error:
                logger.warning("cluster: could not leave the node list: %s", error)

    # -- the queue's bound ---------------------------------------------------------------

    async def _watch_queue(self) -> None:
        js = self.journal._js
        while True:
            try:
                info = await js.consumer_info(self.journal.events_stream, self.consumer)
                self.queued = info.num_pending or 0
            except Exception as error:  # NATS away: keep the last count; publishes wait anyway
                logger.debug("cluster: reading the queue's length failed: %s", error)
            await asyncio.sleep(QUEUE_CHECK_EVERY)

    def wait_for_room(self, timeout: float) -> None:
        """Return once fewer than `OUTBOUND_JOURNAL_MAX_QUEUED` events wait for a node (and
        count the one about to be published); `ClusterFull` after `timeout` s. Any thread
        but the journal's loop."""
        deadline = time.monotonic() + timeout
        while self.queued >= self.max_queued:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterFull(
                    f"the cluster's queue holds {self.queued} events waiting for a node "
                    f"(OUTBOUND_JOURNAL_MAX_QUEUED={self.max_queued}): nothing was published",
                    timeout,
                )
            time.sleep(min(QUEUE_POLL, left))
        self.queued += 1  # (not atomic: a soft bound, read again every QUEUE_CHECK_EVERY s)

    # -- liveness -----------------------------------------------------------------------

    async def _beat(self) -> None:
        about = {"node": self.journal.node_id, "at": time.time()}
        await self._kv.put(self.journal.node_token, json.dumps(about).encode())

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            try:
                await self._beat()
            except Exception as error:  # NATS away: the client reconnects; try again
                logger.warning("cluster: heartbeat not written: %s", error)

    async def alive(self) -> set[str]:
        """The subject tokens of the nodes alive now (this one included)."""
        import nats.js.errors

        try:
            keys = await self._kv.keys()
        except nats.js.errors.NoKeysError:
            return set()
        return {key for key in keys if not key.startswith("claim.")}

    # -- takeover -----------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as error:
                logger.warning("cluster: looking for dead nodes' sends failed: %s", error)
            await asyncio.sleep(self.ack_wait / 3)

    async def sweep(self) -> None:
        """Take over the sends of one node that is gone, if there is one."""
        journal = self.journal
        info = await journal._js.stream_info(
            journal.sends_stream, subjects_filter=journal.sends_subjects
        )
        waiting = {subject: count for subject, count in (info.state.subjects or {}).items()}
        if not waiting:
            return
        alive = await self.alive()
        for subject in waiting:
            token = subject.rsplit(".", 1)[1]
            if token == journal.node_token or token in alive:
                continue
            if not await self._claim(token):
                continue  # another node is on it
            found = await journal._read_all(journal.sends_stream, subject)
            entries = journal.entries_from(found)
            if not entries:
                continue
            sends = sum(len(entry.sends) for entry in entries)
            self.taken_over += sends
            logger.warning(
                "cluster: node %r is gone; taking over its %d undelivered sends",
                text_of(token),
                sends,
            )
            # Off the loop: handing sends on may wait for room in the memory budget.
            await asyncio.get_running_loop().run_in_executor(None, self.on_taken_over, entries)

    async def _claim(self, token: str) -> bool:
        """Create `claim.<token>` (only one node can; it expires with the ack wait)."""
        try:
            await self._kv.create(f"claim.{token}", self.journal.node_token.encode())
        except Exception:
            return False
        return True

    # -- runs anywhere ------------------------------------------------------------------

    async def _pull(self, subscription: Any) -> None:
        import nats.errors

        loop = asyncio.get_running_loop()
        while True:
            room = min(self.room(), PULL_AT_MOST)
            if room <= 0:
                await asyncio.sleep(0.02)  # busy: leave events to the other nodes
                continue
            try:
                messages = await subscription.fetch(room, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as error:
                if not self._stopping:
                    logger.warning("cluster: pulling events failed: %s", describe_error(error))
                await asyncio.sleep(0.5)
                continue
            for message in messages:
                seq = message.metadata.sequence.stream
                try:
                    event = decode_event(message.data)
                except NewerFormatError as error:  # a rolling upgrade: a newer node runs it
                    logger.warning("cluster: event #%d left for another node: %s", seq, error)
                    await message.nak(delay=self.ack_wait)
                    continue
                except JournalFormatError as error:
                    logger.error("cluster: event #%d cannot be read, dropped: %s", seq, error)
                    await message.term()
                    continue
                entry = PulledEvent(
                    self.journal.events_stream, seq, self.journal.acknowledge, message, loop
                )
                self.events_pulled += 1
                self._running.add(entry)
                try:
                    self.on_event(entry, event)
                except Exception as error:  # e.g. a workflow this node lacks: another may run it
                    logger.error("cluster: event #%d not run here: %s", seq, error)
                    await message.nak(delay=self.ack_wait)

    async def _keep_long_runs(self) -> None:
        """A run longer than the ack wait would be run again elsewhere: every third of
        the ack wait, tell the consumer that each run pulled here a while ago goes on."""
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            self._running = {entry for entry in self._running if not entry.done}
            a_while_ago = time.monotonic() - self.ack_wait / 3
            for entry in [entry for entry in self._running if entry.pulled_at < a_while_ago]:
                try:
                    await entry.still_running()
                except Exception as error:  # NATS away: the run may be taken over (same ids)
                    logger.warning("cluster: could not extend a long run's event: %s", error)

    def state(self) -> dict[str, Any]:
        return {
            "node_id": self.journal.node_id,
            "events_pulled": self.events_pulled,
            "sends_taken_over": self.taken_over,
            "queued_events": self.queued,
        }
