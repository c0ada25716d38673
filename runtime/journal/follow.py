"""Reading a shared stream on every node: `Follower`, one ordered consumer per stream.

The cluster-wide views (SSE history and live events, the emit log) are
streams every node reads in full: from the first message the stream still
keeps, then live. A JetStream ordered consumer does exactly that, with
nothing to acknowledge (ephemeral, in memory on the server, recreated by the
client from the next sequence number after a gap or a server loss, noticed
by a missed idle heartbeat). One follower per stream and node, whatever the
number of local readers: the node fans out itself. Runs on the journal's
loop; must not import the runtime facade.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Seconds without a message or heartbeat after which the client recreates the consumer
#: (a server of the cluster died): short, so a node resumes within seconds.
IDLE_HEARTBEAT = 1.0
#: Tries (0.25 s apart) of a first use of a new replicated stream or bucket.
ELECTION_TRIES = 40


async def once_elected(use: Callable[[], Awaitable[T]]) -> T:
    """`use()`, tried again while a new replicated stream or bucket elects its leader.

    Nodes starting together: only the client that made a stream waited for its
    leader; the others' first requests fail until it has one (seconds at most).
    """
    for attempt in range(ELECTION_TRIES):
        try:
            return await use()
        except Exception:
            if attempt == ELECTION_TRIES - 1:
                raise
            await asyncio.sleep(0.25)
    raise AssertionError("unreachable")


class Follower:
    """Calls `on_message(seq, subject, data)` for every message of a stream, in order."""

    def __init__(
        self,
        js: Any,
        stream: str,
        subjects: str,
        on_message: Callable[[int, str, bytes], None],
    ) -> None:
        self._js = js
        self.stream = stream
        self.subjects = subjects
        self._on_message = on_message
        self._subscription: Any = None
        self._caught_up = asyncio.Event()
        self._catch_up_to = 0
        self.received = 0

    async def start(self, catch_up: float = 10.0) -> None:
        """Subscribe, and wait (at most `catch_up` s) until what the stream held is read:
        a node that answers right after its start shows the history too."""
        import nats.js.api as api

        info = await once_elected(lambda: self._js.stream_info(self.stream))
        self._catch_up_to = info.state.last_seq if info.state.messages else 0
        if self._catch_up_to == 0:
            self._caught_up.set()
        self._subscription = await once_elected(
            lambda: self._js.subscribe(
                self.subjects,
                stream=self.stream,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.ALL,
                idle_heartbeat=IDLE_HEARTBEAT,
                cb=self._received,
            )
        )
        try:
            await asyncio.wait_for(self._caught_up.wait(), catch_up)
        except TimeoutError:
            logger.warning("cluster: %s not read to its end within %.0f s", self.stream, catch_up)

    async def _received(self, message: Any) -> None:
        seq = message.metadata.sequence.stream
        self.received += 1
        try:
            self._on_message(seq, message.subject, message.data)
        except Exception:
            logger.exception("cluster: message #%d of %s could not be taken", seq, self.stream)
        if seq >= self._catch_up_to:
            self._caught_up.set()

    async def stop(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            try:
                await subscription.unsubscribe()
            except Exception as error:  # the connection is going away anyway
                logger.debug("cluster: unsubscribing from %s: %s", self.stream, error)


def stop_following(journal: Any, follower: Follower | None, timeout: float = 5.0) -> None:
    """Stop `follower` from another thread (a node stopping): on the journal's loop, at most
    `timeout` s; a failure is only logged (the connection is closing anyway)."""
    if follower is None:
        return
    try:
        journal._call(follower.stop(), timeout=timeout)
    except Exception as error:
        logger.warning("cluster: stopping the reader of %s failed: %s", follower.stream, error)
