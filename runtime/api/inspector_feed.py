"""The inspector's live notices (`GET /inspector/events`): runs that start and end, final sends.

Owns `InspectorFeed`. It is no second fan-out: the notices go through an
`SseHub` of their own (one stream, `STREAM`), so each page gets the hub's
bounded queue, keepalives and drop-on-full (the page reconnects, as
EventSource does, and reloads what it shows), and the SSE endpoint's
`open_stream` serves them like a workflow's stream. The hub keeps no
history: a page reloads its view whenever it (re)connects.

The ledger's listeners are attached only while a page listens, and each
only puts what changed into a deque (they are called on the threads that
start and end runs and settle sends); a task on the runtime's trio loop
publishes what gathered every `COALESCE` s, at most `MAX_NOTICES` at once:
beyond that one `overflow` event tells the pages to reload instead. A run
that started is told only if it still runs then: most runs end within the
`COALESCE` and their end says enough. In a cluster the records every node
stores of its runs are notices too (`RuntimeView.follow_cluster_runs`), so
a page on one node sees the runs of all, a second or so after they end.
Reads the runtime only through `RuntimeView`; must not import
`outbound.runtime`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import threading
from typing import Any

import trio

from outbound.api.view import RuntimeView
from outbound.destinations.sse.hub import SseHub

STREAM = "inspector"
COALESCE = 0.1  # seconds notices gather before they are published together
MAX_NOTICES = 200  # notices published at once; more: one `overflow` event instead


class InspectorFeed:
    """The notices of one runtime's ledger, fanned out to the inspector pages listening."""

    def __init__(self, runtime: RuntimeView) -> None:
        self.runtime = runtime
        config = runtime.config
        self.hub = SseHub(history=0, queue_size=config.sse_queue, keepalive=config.sse_keepalive)
        # (kind, what changed): a run's result or a final send, described when published.
        self._pending: collections.deque[tuple[str, Any]] = collections.deque()
        self._overflowed = False
        self._scheduled = False
        self._lock = threading.Lock()
        self._listening = 0  # pages connected (listeners attached while above 0)
        self._unfollow: Any = None  # stops the cluster's run records' notices

    def bind(self) -> bool:
        """Attach the hub to the runtime's current trio loop; False when it is not running."""
        loop = self.runtime.trio_loop
        if loop is None or not self.runtime.running:
            return False
        if self.hub.loop is not loop:
            # A runtime started again: a publish scheduled on the old loop died with it.
            self._pending.clear()
            self._scheduled = False
            self.hub.bind(loop)  # type: ignore[arg-type]  # a TrioLoop
        return True

    # -- pages come and go ----------------------------------------------------------------

    def page_connected(self) -> None:
        """A page listens: attach the ledger's listeners if it is the first."""
        with self._lock:
            self._listening += 1
            if self._listening == 1:
                ledger = self.runtime.ledger
                ledger.add_start_listener(self._run_started)
                ledger.add_run_listener(self._run_ended)
                ledger.add_listener(self._delivery_final)

    def follow_cluster(self) -> None:
        """In a cluster, while pages listen, also tell them every node's run records.

        Blocking (the records may have to be read first): call it off the event loop,
        after `page_connected`. Pages that left meanwhile undo it at once.
        """
        with self._lock:
            if self._listening == 0 or self._unfollow is not None:
                return
        unfollow = self.runtime.follow_cluster_runs(self._run_ended)  # another node's too
        if unfollow is None:  # not a cluster
            return
        with self._lock:
            if self._listening > 0 and self._unfollow is None:
                self._unfollow = unfollow
                return
        unfollow()  # every page left meanwhile, or another call follows already

    def page_gone(self) -> None:
        with self._lock:
            self._listening -= 1
            last = self._listening == 0
            if last:
                ledger = self.runtime.ledger
                ledger.remove_listener(self._run_started)
                ledger.remove_listener(self._run_ended)
                ledger.remove_listener(self._delivery_final)
                unfollow, self._unfollow = self._unfollow, None
                if unfollow is not None:
                    unfollow()

    # -- any thread: the ledger's listeners ------------------------------------------------

    def _run_started(self, run: Any) -> None:
        self._notice("started", run)

    def _run_ended(self, result: Any) -> None:
        self._notice("run", result)

    def _delivery_final(self, send: Any) -> None:
        self._notice("delivery", send)

    def _notice(self, kind: str, subject: Any) -> None:
        """Keep what changed (a run's result, a final send: neither changes any more) for the
        next publish; the notice is written there, off the threads that call this."""
        if len(self._pending) < MAX_NOTICES:
            self._pending.append((kind, subject))
        else:
            self._overflowed = True
        if self._scheduled:
            return
        self._scheduled = True
        loop = self.hub.loop
        try:
            if loop is None:
                raise RuntimeError("no loop")
            loop.spawn(self._publish)
        except RuntimeError:  # the runtime is stopping: nobody will read these
            self._scheduled = False
            self._pending.clear()

    # -- the trio loop ---------------------------------------------------------------------

    async def _publish(self) -> None:
        await trio.sleep(COALESCE)  # a burst becomes one write per page
        self._scheduled = False  # before taking: a later notice schedules anew
        pending, changes = self._pending, []
        while pending:
            changes.append(pending.popleft())
        overflowed, self._overflowed = self._overflowed, False
        in_progress = self.runtime.run_in_progress
        notices = [
            ("run" if kind == "started" else kind, _notice_of(kind, subject))
            for kind, subject in changes
            if kind != "started" or in_progress(subject.run_id)  # ended: its end says it
        ]
        if overflowed:
            notices = [("overflow", {"reload": True})]
        for kind, notice in notices:
            with contextlib.suppress(Exception):  # nothing a page's notice may break
                self.hub.publish(STREAM, kind, json.dumps(notice).encode())

    def close(self) -> int:
        """End every page's stream (the server stops); returns how many."""
        return self.hub.close_all()


def _notice_of(kind: str, subject: Any) -> dict[str, Any]:
    """The notice of a run that started (its `RunFuture`), that ended (its result), or of a
    send that is final. A run's notice is the event `run`, with its status."""
    if kind == "started":
        return {
            "run_id": subject.run_id,
            "workflow_id": subject.workflow_id,
            "status": "running",
            "started_at": subject.submitted_at,
        }
    if kind == "run":
        return {
            "run_id": subject.run_id,
            "workflow_id": subject.workflow_id,
            "status": subject.status,
            "started_at": subject.started_at,
        }
    return {
        "run_id": subject.run_id,
        "id": subject.id,
        "destination": subject.destination,
        "status": subject.status,
    }
