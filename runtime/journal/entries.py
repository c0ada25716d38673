"""Journal entries as the runtime holds them while their sends are open.

Owns `SendsEntry` (one journal message of sends: how many are still open; the
settle path calls `sends_final` and the last one acknowledges the entry;
`reschedule` calls `send_rescheduled`, which the journal records, and the
records go when the entry is acknowledged) and
`EventEntry` (one journaled event: acknowledged once its run's sends are
journaled). Acknowledging is the journal's (`Journal.acknowledge`); this
module only counts. Must not touch the network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Protocol

from outbound.destinations.delivery import OPEN, Send

#: `acknowledge(stream, seq)`: the journal's, called once per entry, from any thread.
Acknowledge = Callable[[str, int], None]


class RetryRecorder(Protocol):
    """Where an entry's sends in backoff are recorded (`outbound.journal.retries.RetryRecords`)."""

    def rescheduled(self, send: Send) -> None:
        """Keep a send's attempts and next try (soon; never blocks)."""

    def forget(self, delivery_ids: Iterable[str]) -> None:
        """Drop the records of sends that are final (soon; never blocks)."""


class SendsEntry:
    """One journal message of sends; acknowledged when every send in it is final.

    Satisfies `destinations.delivery.JournalEntry`: the one settle path calls
    `sends_final(n)` for its sends, from whichever destination thread settles
    them. Its sequence number is known (the publish was acknowledged) before
    any of its sends reaches a destination, so before any of them can settle.
    """

    __slots__ = ("stream", "seq", "sends", "open", "recorded", "_lock", "_acknowledge", "_retries")

    def __init__(
        self,
        stream: str,
        sends: list[Send],
        acknowledge: Acknowledge,
        retries: RetryRecorder | None = None,
    ) -> None:
        self.stream = stream
        self.seq = 0  # set once the journal stored it
        self.sends = sends  # kept until acknowledged: what `stop()` leaves in the journal
        self.open = len(sends)
        self.recorded: set[str] | None = None  # delivery ids of its sends with a retry record
        self._lock = threading.Lock()
        self._acknowledge = acknowledge
        self._retries = retries

    def send_rescheduled(self, send: Send) -> None:
        """One of its sends waits out a backoff: it stays in this entry, and the journal
        keeps its attempts and next try for a restart (`journal.retries`)."""
        if self._retries is None:
            return
        with self._lock:
            if self.recorded is None:
                self.recorded = set()
            self.recorded.add(send.id)
        self._retries.rescheduled(send)

    def sends_final(self, count: int) -> None:
        with self._lock:
            self.open -= count
            done = self.open == 0
            recorded, self.recorded = (self.recorded, None) if done else (None, self.recorded)
        if done:
            self._acknowledge(self.stream, self.seq)
            if recorded and self._retries is not None:  # their records are not needed now
                self._retries.forget(recorded)

    def open_sends(self) -> list[Send]:
        return [send for send in self.sends if send.outcome.status in OPEN]


class EventEntry:
    """One journaled event: its run's sends are journaled (or it sent nothing), so let it go."""

    __slots__ = ("stream", "seq", "_acknowledge")

    def __init__(self, stream: str, seq: int, acknowledge: Acknowledge) -> None:
        self.stream = stream
        self.seq = seq
        self._acknowledge = acknowledge

    def run_journaled(self) -> None:
        self._acknowledge(self.stream, self.seq)


def attach(entry: SendsEntry, sends: list[Send]) -> None:
    """Mark sends as held by `entry`: their settle acknowledges it."""
    for send in sends:
        send.outcome.entry = entry
