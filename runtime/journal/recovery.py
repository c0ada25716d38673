"""Recovery at start: what an earlier process left in the journal, delivered again.

(`deliver_entries` also hands on what a node takes over from a dead one.)

Owns `recover_sends`: reads every entry and event still in the journal (a
process killed with kill -9, or a stop that timed out, left them), hands the
sends to the destinations through the hand-off (counted and bounded as if
handed off now, with their original delivery ids and attempts; those a
destination claims, S3's sends of an interrupted upload, in messages of its
own: `HandOff.claim_recovered`) and returns the
events whose runs must run again (the runtime starts them once it is
running, with their original run ids). Takes what it needs as arguments; must
not import the runtime facade.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from outbound.destinations.delivery import Send
from outbound.journal.codec import JournaledEvent
from outbound.journal.entries import EventEntry, SendsEntry
from outbound.journal.journal import Journal

logger = logging.getLogger(__name__)


class TakesRecovered(Protocol):
    """The hand-off, as recovery uses it (`outbound.handoff.HandOff.recovered`)."""

    def recovered(self, sends: list[Send]) -> None: ...

    def claim_recovered(self, sends: list[Send]) -> set[str]: ...


def recover_sends(
    journal: Journal, hand_off: TakesRecovered
) -> list[tuple[EventEntry, JournaledEvent]]:
    """Deliver what the journal still holds; return the events to run again."""
    started = time.monotonic()
    recovered = journal.recover()
    deliver_entries(recovered.entries, hand_off)
    if recovered.entries or recovered.events:
        logger.warning(
            "journal: recovered %d undelivered sends (%d entries) and %d events not yet run, "
            "left by an earlier process (read in %.2f s)",
            recovered.sends,
            len(recovered.entries),
            len(recovered.events),
            time.monotonic() - started,
        )
    return recovered.events


def deliver_entries(entries: list[SendsEntry], hand_off: TakesRecovered) -> None:
    """Hand the sends of entries read back (at start, or taken over from a dead node) on."""
    # Sends a destination takes in messages of its own (S3: objects a crash interrupted).
    claimed = hand_off.claim_recovered([send for entry in entries for send in entry.sends])
    for entry in entries:
        sends = [send for send in entry.sends if send.id not in claimed]
        if sends:
            hand_off.recovered(sends)
