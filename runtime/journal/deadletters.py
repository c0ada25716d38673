"""Dead letters in the journal too: the ledger's dead-letter store of a runtime.

Owns `JournaledDeadLetters` (a `DeadLetterWriter` that, while a journal is
attached, also stores each write's sends in the journal stream
`<CLUSTER>_DEAD_LETTERS`, so that `outbound replay` on any node sees every
node's dead letters) and the format of that stream's messages
(`DeadLetterMessage`). The runtime makes the store with its ledger, before any
journal exists; the machinery of each start attaches its journal
(`attach_journal`) and detaches it at stop (`detach_journal`, after the
stores still queued are done).

A message holds the sends of one destination failing in one write: a small
JSON envelope (when they failed, the file they were also written to) and the
sends in the journal's own codec (`codec.encode_sends`: ids, payloads and all,
rebuilt exactly); or one S3 object its destination wrote whole
(`DeadLetterObject`: bucket, key and its exact bytes, `written_natively`), when
it fits in a message (`OUTBOUND_MAX_PAYLOAD_BYTES`). The settling thread never
waits on the network: stores are queued to one thread of this store's own,
which tries each until the journal answers (`Journal.store`, up to a minute
through an outage). A write that cannot be stored in time is still in its
file (logged). Must not import the runtime facade.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from outbound.destinations.deadletter import IN_JOURNAL, DeadLetterWriter, append_marks, line_key
from outbound.destinations.delivery import Send
from outbound.journal.codec import JournalFormatError, decode_sends, encode_sends
from outbound.journal.journal import Journal, JournalStream

logger = logging.getLogger(__name__)

#: The kind of the journal stream of dead letters (`<CLUSTER>_DEAD_LETTERS`).
STREAM_KIND = "dead_letters"
#: The first bytes of a dead-letter message: a later format can be told apart.
MAGIC = b"OBD1"
#: ... of a message holding an object its destination wrote whole (S3's `.gz`).
OBJECT_MAGIC = b"OBO1"
#: Seconds `detach_journal` waits for the stores still queued at stop.
DETACH_WAIT = 10.0
#: Seconds one store is tried (through a journal outage) before it is given up, logged.
STORE_WAIT = 60.0


@dataclass(frozen=True, slots=True)
class DeadLetterMessage:
    """One message of the dead-letter stream: sends of one destination that failed together."""

    failed_at: float  # wall-clock time of the failure (what `--since`/`--until` compare)
    file: str | None  # the dead-letter file the same sends were written to (on the writer's node)
    sends: list[Send]  # pending again, with their ids, attempts and payloads


@dataclass(frozen=True, slots=True)
class DeadLetterObject:
    """One message of the dead-letter stream: an S3 object its destination wrote whole."""

    failed_at: float
    file: str  # where it was written on the writer's node
    bucket: str
    key: str
    data: bytes  # its exact bytes: uploaded again as they are


def encode_object(object_: DeadLetterObject) -> bytes:
    fields = {
        "failed_at": object_.failed_at,
        "file": object_.file,
        "bucket": object_.bucket,
        "key": object_.key,
    }
    return OBJECT_MAGIC + json.dumps(fields).encode("utf-8") + b"\n" + object_.data


def encode_message(sends: Sequence[Send], failed_at: float, file: str | None) -> bytes:
    envelope = json.dumps({"failed_at": failed_at, "file": file}).encode("utf-8")
    return MAGIC + envelope + b"\n" + encode_sends(sends)


def decode_message(data: bytes) -> DeadLetterMessage | DeadLetterObject:
    """A stream message back; `JournalFormatError` if it is not one this version reads."""
    if data.startswith(OBJECT_MAGIC):
        envelope, _, body = data[len(OBJECT_MAGIC) :].partition(b"\n")
        try:
            fields = json.loads(envelope)
            return DeadLetterObject(
                float(fields["failed_at"]),
                str(fields["file"]),
                str(fields["bucket"]),
                str(fields["key"]),
                body,
            )
        except (ValueError, KeyError, TypeError) as error:
            raise JournalFormatError(f"a damaged dead-letter object message: {error}") from None
    if not data.startswith(MAGIC):
        raise JournalFormatError(f"not a dead-letter message of this version: {data[:4]!r}")
    envelope, newline, sends = data[len(MAGIC) :].partition(b"\n")
    try:
        fields = json.loads(envelope)
        failed_at = float(fields["failed_at"])
    except (ValueError, KeyError, TypeError) as error:
        raise JournalFormatError(f"a damaged dead-letter message: {error}") from None
    if not newline:
        raise JournalFormatError("a damaged dead-letter message: no sends")
    return DeadLetterMessage(failed_at, fields.get("file"), decode_sends(sends))


class JournaledDeadLetters(DeadLetterWriter):
    """Dead-letter files as ever, and, with a journal attached, the journal stream too."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self._journal: Journal | None = None
        self._stream: JournalStream | None = None
        self._storing: ThreadPoolExecutor | None = None
        self._pending: set[Future[None]] = set()
        self._pending_lock = threading.Lock()

    @property
    def journal(self) -> Journal | None:
        return self._journal

    @property
    def stream(self) -> JournalStream | None:
        """The dead-letter stream of the attached journal (None without one)."""
        return self._stream

    def attach_journal(self, journal: Journal) -> None:
        """From now on, store dead letters in `journal` too (makes the stream; blocking)."""
        self._stream = journal.stream(STREAM_KIND)
        self._storing = ThreadPoolExecutor(1, thread_name_prefix="outbound-dead-letters")
        self._journal = journal

    def detach_journal(self, timeout: float = DETACH_WAIT) -> None:
        """Wait (at most `timeout` s) for the stores still queued, then let go of the journal."""
        storing = self._storing
        self._journal = None
        if storing is None:
            return
        with self._pending_lock:
            pending = list(self._pending)
        _, not_done = concurrent.futures.wait(pending, timeout)
        if not_done:
            logger.error(
                "journal: %d dead-letter messages not stored by the stop (their files have them)",
                len(not_done),
            )
        storing.shutdown(wait=False, cancel_futures=True)
        self._storing = None
        self._stream = None

    def _write(self, destination: str, sends: list[Send], failed_at: float | None = None) -> None:
        # The same time in the file's lines and the message: a replay marks both.
        failed_at = time.time() if failed_at is None else failed_at
        super()._write(destination, sends, failed_at)
        journal, stream, storing = self._journal, self._stream, self._storing
        if journal is None or stream is None or storing is None:
            return
        file = sends[0].outcome.detail.get("dead_letter") if sends else None
        try:
            # Split as the journal splits entries: each message fits the server's max_payload.
            encoded = journal.encode(sends)
            messages = [
                (encode_message(part, failed_at, file), [line_key(s.id, failed_at) for s in part])
                for part, _ in encoded.parts
            ]
        except Exception as error:  # a payload the codec cannot take: its file still has it
            logger.error(
                "could not journal %d dead-lettered %r sends (kept in %s): %s",
                len(sends),
                destination,
                file,
                error,
            )
            return
        if encoded.too_large:
            logger.error(
                "%d dead-lettered %r sends are too large for a journal message (kept in %s)",
                len(encoded.too_large),
                destination,
                file,
            )
        for data, keys in messages:
            try:
                future = storing.submit(self._store, journal, stream.subject, data, file, keys)
            except RuntimeError:  # detached meanwhile (a stop): the file has them
                return
            with self._pending_lock:
                self._pending.add(future)
            future.add_done_callback(self._done)

    def written_natively(self, sends: Sequence[Send]) -> None:
        """Sends their destination wrote whole (S3 objects, named in `detail`): store each
        object in the stream too, read from its file on the storing thread."""
        journal, stream, storing = self._journal, self._stream, self._storing
        if journal is None or stream is None or storing is None:
            return
        failed_at = time.time()
        objects: dict[str, tuple[str, str]] = {}
        for send in sends:
            detail = send.outcome.detail
            path, bucket, key = (
                detail.get(name) for name in ("dead_letter_object", "bucket", "key")
            )
            if path and bucket and key:
                objects.setdefault(str(path), (str(bucket), str(key)))
        for path, (bucket, key) in objects.items():
            try:
                future = storing.submit(
                    self._store_object, journal, stream.subject, path, bucket, key, failed_at
                )
            except RuntimeError:  # detached meanwhile (a stop): the file has it
                return
            with self._pending_lock:
                self._pending.add(future)
            future.add_done_callback(self._done)

    @staticmethod
    def _store_object(
        journal: Journal, subject: str, path: str, bucket: str, key: str, failed_at: float
    ) -> None:
        try:
            data = Path(path).read_bytes()
            if len(data) > journal.max_send_bytes:
                logger.warning(
                    "dead-lettered object %s (%d bytes) is larger than a journal message: "
                    "only its file keeps it",
                    path,
                    len(data),
                )
                return
            message = encode_object(DeadLetterObject(failed_at, path, bucket, key, data))
            journal.store(subject, message, timeout=STORE_WAIT)
        except Exception as error:
            logger.error(
                "could not journal dead-lettered object %s (its file has it): %s", path, error
            )

    def _done(self, future: Future[None]) -> None:
        with self._pending_lock:
            self._pending.discard(future)

    @staticmethod
    def _store(
        journal: Journal, subject: str, data: bytes, file: str | None, keys: list[str]
    ) -> None:
        try:
            journal.store(subject, data, timeout=STORE_WAIT)
        except Exception as error:
            logger.error("could not journal dead-lettered sends (their file has them): %s", error)
            return
        if file:  # the stream has these lines: a replay from the file leaves them to it
            try:
                append_marks(Path(file), keys, IN_JOURNAL)
            except OSError as error:
                logger.error("could not mark dead letters as journaled in %s: %s", file, error)
