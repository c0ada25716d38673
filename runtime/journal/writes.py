"""The journal's writes that nobody waits for: deletes (acknowledgements) and background stores.

Owns `Deletes` (messages to delete by sequence number: an entry whose sends
are all final, an event whose run's sends are journaled; queued from any
thread, sent in concurrent batches on the journal's loop, tried again while
the server is away) and `BackgroundStores` (`Journal.store_soon` /
`purge_soon`: the latest message per subject, or a purge of it, published
without blocking the caller, in the order they were queued per subject).
Both run on the journal's loop and reach NATS only through the two calls
they are given (`request`, `publish`); must not import the runtime facade.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from outbound.actors.loops import AsyncioLoop

logger = logging.getLogger(__name__)

#: Deletes (or background stores) sent at once.
BATCH = 256

#: `request(subject, data)`: a NATS request on the journal's connection; its answer.
Request = Callable[[str, bytes], Awaitable[Any]]
#: `publish(subject, data)`: store one message, tried again until stored; its seq.
Publish = Callable[[str, bytes], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Purge:
    """A background store's other kind: delete every message of the subject from `stream`."""

    stream: str


class Deletes:
    """Deletes by sequence number, from any thread, batched on the journal's loop."""

    def __init__(self, loop: AsyncioLoop, request: Request) -> None:
        self._loop = loop
        self._request = request
        self._due: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._wanted: asyncio.Event | None = None

    def start(self) -> None:
        """On the journal's loop, once connected: the task that sends them."""
        self._wanted = asyncio.Event()
        asyncio.get_running_loop().create_task(self._send_forever())

    def add(self, stream: str, seq: int) -> None:
        """Delete message `seq` of `stream` soon (any thread)."""
        with self._lock:
            wake = not self._due
            self._due.append((stream, seq))
        if wake and self._wanted is not None:
            loop = self._loop.loop
            try:
                assert loop is not None
                loop.call_soon_threadsafe(self._wanted.set)
            except (RuntimeError, AssertionError):
                pass  # closed: the entry stays, and is delivered again at the next start

    async def _send_forever(self) -> None:
        assert self._wanted is not None
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self._send()

    async def _send(self) -> None:
        with self._lock:
            due, self._due = self._due, []
        failed: list[tuple[str, int]] = []
        for start in range(0, len(due), BATCH):
            batch = due[start : start + BATCH]
            results = await asyncio.gather(
                *(self._delete(stream, seq) for stream, seq in batch), return_exceptions=True
            )
            failed.extend(item for item, ok in zip(batch, results, strict=True) if ok is not True)
        if failed:
            await asyncio.sleep(0.2)  # the server is away: try these again soon
            with self._lock:
                self._due[:0] = failed
            assert self._wanted is not None
            self._wanted.set()

    async def _delete(self, stream: str, seq: int) -> bool:
        """Delete one message (no_erase: a mark, not an overwrite); a missing one is done."""
        request = json.dumps({"seq": seq, "no_erase": True}).encode()
        reply = await self._request(f"$JS.API.STREAM.MSG.DELETE.{stream}", request)
        answer = json.loads(reply.data)
        error = answer.get("error")
        if error is None or error.get("err_code") in (10057, 10037):  # already gone
            return True
        logger.warning("journal: deleting %s #%d refused: %s", stream, seq, error)
        return True  # a refusal will not change by asking again

    async def drain(self) -> None:
        """Send what is due (before the connection closes)."""
        while True:
            with self._lock:
                if not self._due:
                    return
            await self._send()


class BackgroundStores:
    """The latest message (or purge) per subject, stored without blocking whoever queued it."""

    def __init__(self, loop: AsyncioLoop, publish: Publish, request: Request) -> None:
        self._loop = loop
        self._publish = publish
        self._request = request
        # subject -> latest data not yet stored, or the stream to purge the subject from
        self._due: dict[str, bytes | Purge] = {}
        self._lock = threading.Lock()
        self._storing = False  # a task stores `_due` (read and set on the loop only)

    def queue(self, subject: str, what: bytes | Purge) -> None:
        """Store `what` under `subject` soon (any thread); it replaces one still waiting."""
        with self._lock:
            wake = not self._due
            self._due[subject] = what
        if wake:
            loop = self._loop.loop
            try:
                assert loop is not None
                loop.call_soon_threadsafe(self._start)
            except (RuntimeError, AssertionError):
                pass  # closed: the send keeps the attempts of its entry

    def _start(self) -> None:
        if not self._storing:
            self._storing = True
            asyncio.get_running_loop().create_task(self._store_due())

    async def _store_due(self) -> None:
        try:
            while True:
                with self._lock:
                    due, self._due = self._due, {}
                if not due:
                    return
                items = list(due.items())
                for start in range(0, len(items), BATCH):
                    await asyncio.gather(
                        *(
                            self._store(subject, what)
                            for subject, what in items[start : start + BATCH]
                        ),
                        return_exceptions=True,  # closing: what is left is lost
                    )
        finally:
            self._storing = False

    async def _store(self, subject: str, what: bytes | Purge) -> None:
        if not isinstance(what, Purge):
            await self._publish(subject, what)
            return
        request = json.dumps({"filter": subject}).encode()
        await self._request(f"$JS.API.STREAM.PURGE.{what.stream}", request)

    async def drain(self) -> None:
        """Wait until everything queued is stored (before the connection closes)."""
        while True:
            with self._lock:
                if not self._due and not self._storing:
                    return
            self._start()
            await asyncio.sleep(0.01)
