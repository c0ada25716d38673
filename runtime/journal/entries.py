"""Journal entries as the runtime holds them while their sends are open.

Owns `SendsEntry` (one journal message of sends: how many are still open; the
settle path calls `sends_final` and the last one acknowledges the entry;
`reschedule` calls `send_rescheduled`, which the journal records) and
`EventEntry` (one journaled event: acknowledged once its run's sends are
journaled). Acknowledging is the journal's (`Journal.acknowledge`); this
module only counts. Must not touch the network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from outbound.destinations.delivery import OPEN, Send

#: `acknowledge(stream, seq)`: the journal's, called once per entry, from any thread.
Acknowledge = Callable[[str, int], None]
#: `rescheduled(send)`: the journal's, keeps a send's attempts and next try (never blocks).
Rescheduled = Callable[[Send], None]


class SendsEntry:
    """One journal message of sends; acknowledged when every send in it is final.

    Satisfies `destinations.delivery.JournalEntry`: the one settle path calls
    `sends_final(n)` for its sends, from whichever destination thread settles
    them. Its sequence number is known (the publish was acknowledged) before
    any of its sends reaches a destination, so before any of them can settle.
    """

    __slots__ = ("stream", "seq", "sends", "open", "_lock", "_acknowledge", "_rescheduled")

    def __init__(
        self,
        stream: str,
        sends: list[Send],
        acknowledge: Acknowledge,
        rescheduled: Rescheduled | None = None,
    ) -> None:
        self.stream = stream
        self.seq = 0  # set once the journal stored it
        self.sends = sends  # kept until acknowledged: what `stop()` leaves in the journal
        self.open = len(sends)
        self._lock = threading.Lock()
        self._acknowledge = acknowledge
        self._rescheduled = rescheduled

    def send_rescheduled(self, send: Send) -> None:
        """One of its sends waits out a backoff: it stays in this entry, and the journal
        keeps its attempts and next try for a restart (`journal.retries`)."""
        if self._rescheduled is not None:
            self._rescheduled(send)

    def sends_final(self, count: int) -> None:
        with self._lock:
            self.open -= count
            done = self.open == 0
        if done:
            self._acknowledge(self.stream, self.seq)

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
