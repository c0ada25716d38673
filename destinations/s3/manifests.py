"""S3 exactly once across crashes: upload manifests in the journal, and recovery from them.

Owns `Manifest` (what an object holds: bucket, key and the delivery ids of its
lines, in order), `ManifestStore` (stores one in the journal stream
`<CLUSTER>_S3_MANIFESTS` before the object's first upload, in parts if it is
larger than a journal message), `ManifestSweeper` (deletes them), `Rebuild`
(the message that hands the S3 actor the recovered sends a manifest names) and
`claim_recovered` (at start: which recovered sends belong to a manifest, and so
must never be batched again). Only through `JournalPort`, from the journal
alone (no local file): any process can recover what another one left. Must not
import the runtime or another destination.

A manifest is deleted (`ManifestSweeper`) `DELETE_AFTER` seconds after the
last journal entry holding its sends was acknowledged, not when its object
settles: an entry may outlive that settle (it is acknowledged when all its
sends, of every destination, are final), and a manifest deleted before the
entry would let its send be batched again after a crash. What a crash leaves
(a manifest whose sweep never came) expires after `MANIFEST_MAX_AGE`. The
one gap left: deletes that fail while the journal is unreachable are sent
again together, so a kill at that instant could see the manifest's delete
land before its entry's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from outbound.destinations.delivery import Send
from outbound.destinations.journaling import JournalPort, StreamRef

logger = logging.getLogger(__name__)

#: The journal stream of manifests (`<CLUSTER>_S3_MANIFESTS`).
MANIFEST_KIND = "s3_manifests"
#: How long a manifest is kept: longer than any stop a journal is expected to
#: outlive (a send still in the journal after that is batched again, and may be
#: written twice if its object was uploaded before the crash).
MANIFEST_MAX_AGE = 7 * 24 * 3600.0
#: Seconds from the acknowledgement of a manifest's last journal entry to its deletion:
#: the entry's delete (queued first) reaches the server long before the manifest's.
DELETE_AFTER = 30.0


@dataclass(frozen=True, slots=True)
class Manifest:
    """One object as it is about to be uploaded: where, and which sends' lines, in order.

    Stored as `parts` messages (`part` 0, 1, ...) when its ids do not fit in one
    journal message; `whole` is False for one read back with a part missing.
    """

    bucket: str
    key: str
    ids: tuple[str, ...]
    created_at: float
    part: int = 0
    parts: int = 1
    whole: bool = True

    def encode(self) -> bytes:
        return json.dumps(
            {
                "bucket": self.bucket,
                "key": self.key,
                "ids": list(self.ids),
                "created_at": self.created_at,
                "part": self.part,
                "parts": self.parts,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        fields = json.loads(data)
        return cls(
            fields["bucket"],
            fields["key"],
            tuple(fields["ids"]),
            fields["created_at"],
            int(fields.get("part", 0)),
            int(fields.get("parts", 1)),
        )

    def split(self, max_bytes: int) -> list[Manifest]:
        """This manifest as parts of at most `max_bytes` encoded (halved until they fit)."""
        if len(self.encode()) <= max_bytes or len(self.ids) <= 1:
            return [self]
        ids = self.ids
        per_part = len(ids)
        while per_part > 1 and any(
            len(dataclasses.replace(self, ids=ids[at : at + per_part]).encode()) > max_bytes
            for at in range(0, len(ids), per_part)
        ):
            per_part = (per_part + 1) // 2
        chunks = [ids[at : at + per_part] for at in range(0, len(ids), per_part)]
        return [
            dataclasses.replace(self, ids=chunk, part=number, parts=len(chunks))
            for number, chunk in enumerate(chunks)
        ]


def joined(parts: list[Manifest]) -> Manifest:
    """The parts of one manifest (any order, repeats allowed) as one; not `whole` if one
    is missing."""
    by_number = {part.part: part for part in parts}
    first = parts[0]
    ids = tuple(i for number in sorted(by_number) for i in by_number[number].ids)
    whole = sorted(by_number) == list(range(first.parts))
    return Manifest(first.bucket, first.key, ids, first.created_at, whole=whole)


@dataclass(frozen=True, slots=True)
class Rebuild:
    """Recovery to the S3 actor: the recovered sends `manifest` names (in its order).

    The actor settles them as the object `manifest.key`: delivered if it is in
    S3 already; else uploaded again from their lines if they are all there;
    else (the others were final without the upload) batched as new sends.
    """

    manifest: Manifest
    sends: list[Send]
    seqs: tuple[int, ...] = ()  # where its parts are in the journal

    @property
    def complete(self) -> bool:
        """Every line of the object is here: it can be made again."""
        return self.manifest.whole and len(self.sends) == len(self.manifest.ids)


def manifest_stream(journal: JournalPort) -> StreamRef:
    """Make (or find) the manifests' stream. Blocking."""
    return journal.stream(MANIFEST_KIND, max_age=MANIFEST_MAX_AGE)


class ManifestStore:
    """Stores manifests before their objects' first upload (blocking: upload threads only)."""

    def __init__(self, journal: JournalPort) -> None:
        self.journal = journal
        self._stream: StreamRef | None = None
        self._lock = threading.Lock()

    def stream(self) -> StreamRef:
        """The manifests' stream (made at the first call: blocking)."""
        with self._lock:
            if self._stream is None:
                self._stream = manifest_stream(self.journal)
            return self._stream

    def store(self, bucket: str, key: str, sends: Iterable[Send]) -> tuple[int, ...]:
        """Store the manifest of object `key` (in parts if it is large); their seqs."""
        manifest = Manifest(bucket, key, tuple(send.id for send in sends), time.time())
        subject = self.stream().subject
        parts = manifest.split(self.journal.max_message_bytes)
        return tuple(self.journal.store(subject, part.encode()) for part in parts)


@dataclass(eq=False)
class _Settled:
    """A manifest whose object is final: the journal entries of its sends still open."""

    seqs: tuple[int, ...]
    entries: list[Any]
    clear_since: float | None = None


class ManifestSweeper:
    """Deletes the manifests of final objects once their sends' journal entries are gone.

    Owned by the S3 actor (its thread only). Entries are `SendsEntry`s; one whose
    `open` count reached 0 has been acknowledged (its delete queued).
    """

    def __init__(self, store: ManifestStore) -> None:
        self.store = store
        self.pending: list[_Settled] = []

    def settled(self, seqs: tuple[int, ...], entries: Iterable[Any]) -> None:
        """The object of manifest `seqs` is final; `entries`: those of its sends."""
        if seqs:
            unique = {id(entry): entry for entry in entries if entry is not None}
            self.pending.append(_Settled(seqs, list(unique.values())))

    def sweep(self, now: float) -> None:
        """Delete the manifests due (from a timer on the actor's thread)."""
        due: list[_Settled] = []
        for settled in self.pending:
            settled.entries = [entry for entry in settled.entries if getattr(entry, "open", 0) > 0]
            if settled.entries:
                continue
            if settled.clear_since is None:
                settled.clear_since = now
            elif now - settled.clear_since >= DELETE_AFTER:
                due.append(settled)
        if due:
            name = self.store.stream().name
            for settled in due:
                self.pending.remove(settled)
                for seq in settled.seqs:
                    self.store.journal.acknowledge(name, seq)


def claim_recovered(journal: JournalPort, sends: list[Send]) -> list[Rebuild]:
    """The recovered S3 sends that manifests name, one `Rebuild` per object. Blocking.

    A send named by several manifests (its batch was encoded again after some
    of its sends failed) belongs to the newest: the older object was never
    uploaded with it, or the send would have settled with it.
    """
    if not sends:
        return []
    stream = manifest_stream(journal)
    parts_by_key: dict[str, list[tuple[int, Manifest]]] = {}
    for seq, data in journal.read(stream):
        try:
            part = Manifest.decode(data)
        except (ValueError, KeyError, TypeError) as error:
            logger.error("s3: manifest #%d cannot be read, ignored: %s", seq, error)
            continue
        # Stored again by a retry after a crash: the key moves to its newest place.
        parts_by_key[part.key] = [*parts_by_key.pop(part.key, []), (seq, part)]
    by_id = {send.id: send for send in sends}
    claimed: set[str] = set()
    rebuilds: list[Rebuild] = []
    for parts in reversed(parts_by_key.values()):
        manifest = joined([part for _, part in parts])
        held = [by_id[i] for i in manifest.ids if i in by_id and i not in claimed]
        if held:
            claimed.update(send.id for send in held)
            rebuilds.append(Rebuild(manifest, held, tuple(seq for seq, _ in parts)))
    return rebuilds
