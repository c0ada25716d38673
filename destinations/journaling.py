"""What a destination may ask of the runtime's journal: `JournalPort`, a protocol.

Destinations never import the runtime; the runtime's `outbound.journal.Journal`
satisfies this protocol and is lent to destination actors as
`Services.journal` (None when `OUTBOUND_JOURNAL=off`). A destination that
keeps state of its own across crashes (the S3 destination's upload manifests)
stores it in a stream of its own through these few calls. Must not import the
runtime or touch the network itself.
"""

from __future__ import annotations

from typing import Any, Protocol


class StreamRef(Protocol):
    """A journal stream: its name and subject (`outbound.journal.journal.JournalStream`)."""

    name: str
    subject: str
    per_key: bool

    def key_subject(self, key: str) -> str: ...


class JournalPort(Protocol):
    """The journal's calls a destination may make (all blocking; call off the hot path)."""

    def stream(self, kind: str, per_key: bool = False, **extra: Any) -> StreamRef:
        """Make (or find) the stream `<CLUSTER>_<KIND>`; `extra`: StreamConfig fields."""

    @property
    def max_message_bytes(self) -> int:
        """The largest message `store` can hold."""

    def store(self, subject: str, data: bytes, timeout: float | None = None) -> int:
        """Store one message; its sequence number (`Busy` subclass after `timeout`)."""

    def read(self, stream: StreamRef, timeout: float = 120.0) -> list[tuple[int, bytes]]:
        """(seq, data) of every message in the stream, oldest first."""

    def acknowledge(self, stream: str, seq: int) -> None:
        """Delete message `seq` of stream `stream` (soon, batched; any thread)."""
