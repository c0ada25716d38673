"""S3 exactly once across crashes: upload manifests in the journal, and recovery from them.

Owns `Manifest` (what an object holds: bucket, key and the delivery ids of its
lines, in order), `ManifestStore` (stores one in the journal stream
`<CLUSTER>_S3_MANIFESTS` before the object's first upload), `Rebuild` (the
message that hands the S3 actor the recovered sends a manifest names) and
`claim_recovered` (at start: which recovered sends belong to a manifest, and so
must never be batched again). Only through `JournalPort`, from the journal
alone (no local file): any process can recover what another one left. Must not
import the runtime or another destination.

Manifests are never deleted one by one: a send's journal entry may outlive
its object's settle (an entry is acknowledged when all its sends, of every
destination, are final), and a manifest deleted before the entry would let its
send be batched again. They expire after `MANIFEST_MAX_AGE` instead.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from outbound.destinations.delivery import Send
from outbound.destinations.journaling import JournalPort, StreamRef

logger = logging.getLogger(__name__)

#: The journal stream of manifests (`<CLUSTER>_S3_MANIFESTS`).
MANIFEST_KIND = "s3_manifests"
#: How long a manifest is kept: longer than any stop a journal is expected to
#: outlive (a send still in the journal after that is batched again, and may be
#: written twice if its object was uploaded before the crash).
MANIFEST_MAX_AGE = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Manifest:
    """One object as it is about to be uploaded: where, and which sends' lines, in order."""

    bucket: str
    key: str
    ids: tuple[str, ...]
    created_at: float

    def encode(self) -> bytes:
        return json.dumps(
            {
                "bucket": self.bucket,
                "key": self.key,
                "ids": list(self.ids),
                "created_at": self.created_at,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        fields = json.loads(data)
        return cls(fields["bucket"], fields["key"], tuple(fields["ids"]), fields["created_at"])


@dataclass(frozen=True, slots=True)
class Rebuild:
    """Recovery to the S3 actor: the recovered sends `manifest` names (in its order).

    The actor settles them as the object `manifest.key`: delivered if it is in
    S3 already; else uploaded again from their lines if they are all there;
    else (the others were final without the upload) batched as new sends.
    """

    manifest: Manifest
    sends: list[Send]

    @property
    def complete(self) -> bool:
        return len(self.sends) == len(self.manifest.ids)


def manifest_stream(journal: JournalPort) -> StreamRef:
    """Make (or find) the manifests' stream. Blocking."""
    return journal.stream(MANIFEST_KIND, max_age=MANIFEST_MAX_AGE)


class ManifestStore:
    """Stores manifests before their objects' first upload (blocking: upload threads only)."""

    def __init__(self, journal: JournalPort) -> None:
        self.journal = journal
        self._stream: StreamRef | None = None
        self._lock = threading.Lock()

    def store(self, bucket: str, key: str, sends: Iterable[Send]) -> None:
        manifest = Manifest(bucket, key, tuple(send.id for send in sends), time.time())
        with self._lock:
            if self._stream is None:
                self._stream = manifest_stream(self.journal)
            stream = self._stream
        self.journal.store(stream.subject, manifest.encode())


def claim_recovered(journal: JournalPort, sends: list[Send]) -> list[Rebuild]:
    """The recovered S3 sends that manifests name, one `Rebuild` per object. Blocking.

    A send named by several manifests (its batch was encoded again after some
    of its sends failed) belongs to the newest: the older object was never
    uploaded with it, or the send would have settled with it.
    """
    if not sends:
        return []
    stream = manifest_stream(journal)
    by_id = {send.id: send for send in sends}
    claimed: set[str] = set()
    rebuilds: list[Rebuild] = []
    seen_keys: set[str] = set()
    for seq, data in reversed(journal.read(stream)):
        try:
            manifest = Manifest.decode(data)
        except (ValueError, KeyError, TypeError) as error:
            logger.error("s3: manifest #%d cannot be read, ignored: %s", seq, error)
            continue
        if manifest.key in seen_keys:  # stored again by a retry after a crash
            continue
        seen_keys.add(manifest.key)
        held = [by_id[i] for i in manifest.ids if i in by_id and i not in claimed]
        if held:
            claimed.update(send.id for send in held)
            rebuilds.append(Rebuild(manifest, held))
    return rebuilds
