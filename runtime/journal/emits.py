"""The emit log in a cluster: `ClusterEmits`, every node's emits where every node reads them.

Owns the stream `<CLUSTER>_EMITS` (subject `<cluster>.emits.<workflow>`, the
last `EMIT_HISTORY` records per emitting workflow) and this node's one reader
of it. A record this node makes goes into its own `EmitLog` at once and into
the stream soon after (`EmitLog.shared`, stored in the background, tried
until stored); the reader puts every node's records into the local log,
which keeps each once (by delivery id). So `GET /workflows/{id}/emits`
answers from memory on any node. Records are JSON (never pickle: any
client of the NATS account can write here). Must not import the runtime facade.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from outbound.destinations.emit.log import EMIT_HISTORY, EmitLog, EmitRecord
from outbound.journal.follow import Follower, stop_following
from outbound.journal.subjects import subject_token

logger = logging.getLogger(__name__)

STREAM_KIND = "emits"


def encode_emit(record: EmitRecord) -> bytes:
    fields = record.as_dict()
    fields["raw_event"] = record.raw_event.decode()
    fields["listener_runs"] = [list(pair) for pair in record.listener_runs]
    return json.dumps(fields).encode()


def decode_emit(data: bytes) -> EmitRecord:
    fields = json.loads(data)
    return EmitRecord(
        id=fields["id"],
        workflow_id=fields["workflow_id"],
        run_id=fields["run_id"],
        emitted_at=fields["emitted_at"],
        depth=fields["depth"],
        raw_event=fields["raw_event"].encode(),
        listener_runs=tuple((workflow, run) for workflow, run in fields["listener_runs"]),
        status=fields["status"],
        error=fields["error"],
    )


class ClusterEmits:
    """The cluster's emit log: `start()` once the journal is open, `stop()` before it closes."""

    def __init__(self, journal: Any, log: EmitLog) -> None:
        self.journal = journal
        self.log = log
        self.subject = ""
        self._follower: Follower | None = None
        self._storing: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        import nats.js.api as api

        stream = self.journal.stream(
            STREAM_KIND,
            per_key=True,
            max_msgs_per_subject=EMIT_HISTORY,
            discard=api.DiscardPolicy.OLD,
        )
        self.subject = stream.subject
        self._follower = Follower(self.journal._js, stream.name, f"{stream.subject}.>", self._read)
        self.journal._call(self._follower.start(), timeout=60.0)
        self.log.shared = self.share

    def stop(self) -> None:
        self.log.shared = None
        try:
            self.journal._call(self._stored(), timeout=10.0)
        except Exception as error:
            logger.warning("cluster: emit records not all shared before the stop: %s", error)
        follower, self._follower = self._follower, None
        stop_following(self.journal, follower)

    async def _stored(self) -> None:
        """Wait (at most 5 s) for the records on their way to the stream."""
        if self._storing:
            await asyncio.wait(self._storing, timeout=5.0)

    def share(self, record: EmitRecord) -> None:
        """Store `record` for the other nodes, in the background (any thread)."""
        subject = f"{self.subject}.{subject_token(record.workflow_id)}"
        data = encode_emit(record)
        loop = self.journal._loop.loop
        try:
            loop.call_soon_threadsafe(self._store, subject, data, record.id)
        except (RuntimeError, AttributeError):  # the journal closed: this node keeps it
            logger.warning("cluster: emit %s not shared (the journal is closed)", record.id)

    def _store(self, subject: str, data: bytes, msg_id: str) -> None:
        task = asyncio.get_running_loop().create_task(
            self.journal._publish(subject, data, msg_id=msg_id)
        )
        self._storing.add(task)
        task.add_done_callback(self._storing.discard)

    def _read(self, seq: int, subject: str, data: bytes) -> None:
        self.log.record(decode_emit(data), share=False)
