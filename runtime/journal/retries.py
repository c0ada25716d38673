"""Retries kept in the journal: each send in backoff, its attempts and next try.

Owns `RetryRecords`: the stream `<CLUSTER>_RETRIES` (one subject per delivery
id, only the latest message kept, expiring after the retry window and a
margin), the record a rescheduled send leaves there (`RetryRecord`: delivery
id, attempts, next try on the wall clock), and applying those records to the
sends recovered at start, so a restart resumes a backoff instead of starting it
over (attempts go on from the recorded count; a next try still ahead is waited
for). The send itself stays in its original journal entry, acknowledged when it
is final; then its record is purged (`forget`). A record left behind (a purge
that failed, a process killed in between) expires with the stream's `max_age`
and is ignored at recovery: no entry holds its send any more.

Storing a record never blocks the destination that reschedules: it goes
through `Journal.store_soon`, which keeps only the latest record per send
while the server is slow or away. Must not import the runtime facade.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from outbound.destinations.delivery import Send
from outbound.destinations.journaling import StreamRef
from outbound.journal.entries import SendsEntry

logger = logging.getLogger(__name__)

#: Seconds a record outlives the retry window: room for clock skew and a slow start.
RECORD_MARGIN = 3600.0

_TOKEN_SAFE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class RetryRecord:
    """What a restart needs of a send in backoff."""

    delivery_id: str
    attempts: int
    next_try_at: float | None

    def encode(self) -> bytes:
        return json.dumps(
            {"id": self.delivery_id, "attempts": self.attempts, "next_try_at": self.next_try_at}
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> RetryRecord:
        fields = json.loads(data)
        next_try_at = fields.get("next_try_at")
        return cls(
            str(fields["id"]),
            int(fields["attempts"]),
            None if next_try_at is None else float(next_try_at),
        )


class RecordStorage(Protocol):
    """The journal's calls this module makes (`outbound.journal.journal.Journal`)."""

    def stream(self, kind: str, per_key: bool = False, **extra: Any) -> StreamRef: ...

    def store_soon(self, subject: str, data: bytes) -> None: ...

    def purge_soon(self, stream: Any, subject: str) -> None: ...

    def read(self, stream: Any, timeout: float = 120.0) -> list[tuple[int, bytes]]: ...


class RetryRecords:
    """The journal's stream of retry records (made at `Journal.open`)."""

    def __init__(self, journal: RecordStorage, retry_for: float) -> None:
        self._journal = journal
        self.stream: StreamRef = journal.stream(
            "retries",
            per_key=True,
            max_msgs_per_subject=1,
            max_age=retry_for + RECORD_MARGIN,
        )

    def subject_of(self, delivery_id: str) -> str:
        """One subject per delivery id (hex of the id when it is not a NATS token)."""
        key = delivery_id if _TOKEN_SAFE.fullmatch(delivery_id) else delivery_id.encode().hex()
        return self.stream.key_subject(key)

    def rescheduled(self, send: Send) -> None:
        """Keep `send`'s attempts and next try (soon; never blocks the caller)."""
        outcome = send.outcome
        record = RetryRecord(send.id, outcome.attempts, outcome.next_try_at)
        self._journal.store_soon(self.subject_of(send.id), record.encode())

    def forget(self, delivery_ids: Iterable[str]) -> None:
        """Drop the records of sends that are final (soon; never blocks; tried once,
        and a record left behind expires with the stream's `max_age`)."""
        for delivery_id in delivery_ids:
            self._journal.purge_soon(self.stream, self.subject_of(delivery_id))

    def apply(self, entries: Iterable[SendsEntry]) -> int:
        """Give recovered sends the attempts and next try recorded for them; how many.

        Blocking (reads the stream). A send found in backoff goes back to
        status `retrying` with its last error unknown; its entry remembers the
        record, to drop it once the entry is acknowledged.
        """
        entry_of = {send.id: entry for entry in entries for send in entry.sends}
        by_id = {send.id: send for entry in entries for send in entry.sends}
        if not by_id:
            return 0
        applied = 0
        for seq, data in self._journal.read(self.stream):
            try:
                record = RetryRecord.decode(data)
            except (ValueError, KeyError, TypeError) as error:
                logger.error("journal: retry record #%d cannot be read, ignored: %s", seq, error)
                continue
            send = by_id.get(record.delivery_id)
            if send is None:  # its send is final (the record waits to expire)
                continue
            outcome = send.outcome
            outcome.attempts = max(outcome.attempts, record.attempts)
            outcome.next_try_at = record.next_try_at
            outcome.status = "retrying"
            entry = entry_of[record.delivery_id]
            if entry.recorded is None:
                entry.recorded = set()
            entry.recorded.add(record.delivery_id)
            applied += 1
        return applied
