"""Replay of dead letters: failed sends delivered again, with their original delivery ids.

Owns `replay_dead_letters` (what `Runtime.replay_dead_letters` and `outbound
replay` do), `ReplayReport` and the time filter (`parse_time`). Where dead
letters are read from:
- with a journal, its dead-letter stream (`journal/deadletters.py`): every
  node's, rebuilt exactly by the journal's codec; a message replayed is
  deleted from the stream once its sends are journaled again;
- and the JSON-lines files under this node's `<data_dir>/dead-letter/`, each
  line turned back into its typed payload by its destination
  (`destinations/<kind>/send.py: from_dead_letter`); a line replayed is marked
  in the sidecar `<file>.replayed` (0600: one `<delivery id> <failed_at>` a
  line, so a send that failed again after a replay, written again with a new
  time, is replayed again). A line the stream also holds is marked `journal`
  there when stored: a replay with the journal leaves it to the stream, one
  without counts it as left to the journal;
- S3 objects written whole (`dead-letter/s3/<bucket>/<key>`) are uploaded as
  they are under their key (content-addressed: an upload twice is the same
  object): from the stream with a journal (deleted once uploaded), and from
  this node's files, marked by `<object>.replayed`.
Replayed sends go through the hand-off like recovered sends
(`HandOff.replayed`: journaled first with a journal), with attempts reset to
0 and `detail["replayed_from"]` naming where they came from. `--since` and
`--until` compare the time the send was dead-lettered (`failed_at`). Takes
what it needs as arguments; must not import the runtime facade.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from outbound.destinations.deadletter import (
    IN_JOURNAL,
    REPLAYED,
    REPLAYED_SUFFIX,
    append_marks,
    line_key,
    read_marks,
    write_private_file,
)
from outbound.destinations.delivery import Send, new_send
from outbound.destinations.registry import DESTINATION_KINDS
from outbound.journal.codec import JournalFormatError
from outbound.journal.deadletters import DeadLetterObject, JournaledDeadLetters, decode_message
from outbound.journal.journal import Journal

logger = logging.getLogger(__name__)

#: The report's key for what cannot be read far enough to know its destination.
UNKNOWN = "(unreadable)"
#: The report's key for S3 objects written whole (counted in objects, not sends).
S3_OBJECTS = "s3 objects"

#: kind name -> `from_dead_letter(fields) -> (payload, size)`
_DECODERS: dict[str, Callable[[Any], tuple[Any, int]]] = {
    kind.name: kind.from_dead_letter for kind in DESTINATION_KINDS if kind.from_dead_letter
}


class HandsOnReplayed(Protocol):
    """The hand-off, as replay uses it (`outbound.handoff.HandOff`)."""

    destinations: Mapping[str, Any]

    def replayed(self, sends: list[Send]) -> list[Send]: ...


@dataclass
class DestinationReplay:
    """What a replay did for one destination (sends; objects for `s3 objects`)."""

    found: int = 0  # dead letters that pass the filters
    replayed: int = 0  # handed to the runtime again (with `--dry-run`: would be)
    already_replayed: int = 0  # marked by an earlier replay: skipped
    unreadable: int = 0  # could not be turned back into a send (kept, not marked)
    not_configured: int = 0  # for a destination this runtime does not have (kept)
    in_journal: int = 0  # lines of a file that the journal holds (replayed with the journal)
    delivered: int = 0  # of those replayed, delivered by the time of `settled()`
    failed_again: int = 0  # ... failed again (dead-lettered again)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class ReplayReport:
    """What `replay_dead_letters` did, per destination; `settled()` adds how the sends ended."""

    source: str  # "journal" (the dead-letter stream) or "files"
    dry_run: bool = False
    destinations: dict[str, DestinationReplay] = field(default_factory=dict)
    _sends: list[Send] = field(default_factory=list, repr=False)

    def destination(self, name: str) -> DestinationReplay:
        return self.destinations.setdefault(name, DestinationReplay())

    @property
    def sends(self) -> list[Send]:
        """The sends handed to the runtime again (their outcomes change as they settle)."""
        return list(self._sends)

    def settled(self) -> ReplayReport:
        """Count the replayed sends delivered and failed again so far (after `rt.flush()`)."""
        for name, entry in self.destinations.items():
            if name != S3_OBJECTS:  # uploaded by the replay itself: counted then
                entry.delivered = entry.failed_again = 0
        for send in self._sends:
            entry = self.destination(send.destination)
            if send.status == "delivered":
                entry.delivered += 1
            elif send.status == "failed":
                entry.failed_again += 1
        return self

    @property
    def ok(self) -> bool:
        """Nothing left that could not be read, sent, or that failed again."""
        return not any(
            entry.unreadable or entry.not_configured or entry.failed_again
            for entry in self.destinations.values()
        )

    @property
    def pending(self) -> int:
        """Replayed sends not yet final."""
        return sum(1 for send in self._sends if not send.final)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dry_run": self.dry_run,
            "destinations": {name: e.as_dict() for name, e in self.destinations.items()},
        }

    def describe(self) -> str:
        """The lines `outbound replay` prints."""
        verb = "would replay" if self.dry_run else "replayed"
        dry = " (dry run: nothing sent or marked)" if self.dry_run else ""
        lines = [f"dead letters from {self.source}{dry}:"]
        if not self.destinations:
            lines.append("  nothing to replay")
        for name in sorted(self.destinations):
            entry = self.destinations[name]
            parts = [f"found {entry.found}", f"{verb} {entry.replayed}"]
            parts.append(f"skipped as already replayed {entry.already_replayed}")
            parts.append(f"could not be read {entry.unreadable}")
            if entry.not_configured:
                parts.append(f"destination not configured {entry.not_configured}")
            if entry.in_journal:
                parts.append(f"left to a replay with the journal {entry.in_journal}")
            if not self.dry_run and name != S3_OBJECTS and entry.replayed:
                parts.append(f"delivered {entry.delivered}")
                parts.append(f"failed again {entry.failed_again}")
            lines.append(f"  {name}: " + ", ".join(parts))
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Which dead letters to replay: a destination, and a window of `failed_at` times."""

    destination: str | None = None
    since: float | None = None
    until: float | None = None

    def wants(self, destination: str, failed_at: float) -> bool:
        if self.destination is not None and destination != self.destination:
            return False
        if self.since is not None and failed_at < self.since:
            return False
        return self.until is None or failed_at <= self.until


def parse_time(value: str | float | datetime | None, name: str = "time") -> float | None:
    """Unix seconds from unix seconds (a number or its text), a datetime or ISO 8601 text.

    ISO 8601 without an offset is UTC. ValueError naming `name` otherwise.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"{name}: must be a finite number of unix seconds")
        return seconds
    elif isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"{name}: {value!r} is neither unix seconds nor ISO 8601 (2026-11-30T12:00:00Z)"
            ) from None
    else:
        raise ValueError(f"{name}: must be unix seconds, ISO 8601 text or a datetime")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def replay_dead_letters(
    data_dir: Path,
    hand_off: HandsOnReplayed,
    dead_letters: Any,
    s3_config: Any,
    wanted: ReplayFilter,
    dry_run: bool = False,
) -> ReplayReport:
    """Send dead letters again (see the module's docstring); what was done, per destination."""
    store = dead_letters if isinstance(dead_letters, JournaledDeadLetters) else None
    journal, stream = (store.journal, store.stream) if store is not None else (None, None)
    files = Path(data_dir) / "dead-letter"
    with_journal = journal is not None and stream is not None
    source = f"the journal and {files}" if with_journal else str(files)
    run = _Replay(hand_off, _S3Uploads(s3_config), wanted, ReplayReport(source, dry_run))
    if journal is not None and stream is not None:
        _from_journal(journal, stream, run)
    # Lines the stream holds are marked `journal` in their sidecar: not sent from here too.
    for path in sorted(files.glob("*.jsonl")):
        _from_file(path, run, with_journal)
    _s3_objects(files / "s3", run)
    return run.report


@dataclass
class _Replay:
    """One replay in progress: where sends go, the filter, and what was done so far."""

    hand_off: HandsOnReplayed
    uploads: _S3Uploads
    wanted: ReplayFilter
    report: ReplayReport
    #: Object files whose object the stream had: not replayed from the files too.
    objects_seen: set[str] = field(default_factory=set)


# -- the journal's dead-letter stream ---------------------------------------------------------


def _from_journal(journal: Journal, stream: Any, run: _Replay) -> None:
    hand_off, wanted, report, uploads = run.hand_off, run.wanted, run.report, run.uploads
    dry_run = report.dry_run
    for seq, data in journal.read(stream):
        try:
            message = decode_message(data)
        except JournalFormatError as error:
            logger.error("replay: %s #%d cannot be read, kept: %s", stream.name, seq, error)
            report.destination(UNKNOWN).unreadable += 1
            continue
        if isinstance(message, DeadLetterObject):
            if not wanted.wants("s3", message.failed_at):
                continue
            run.objects_seen.add(message.file)
            if uploads.replay(message.bucket, message.key, message.data, report):
                journal.acknowledge(stream.name, seq)
                _mark_object(Path(message.file), message.bucket, message.key)
            continue
        if not message.sends:
            continue
        destination = message.sends[0].destination  # one destination a message
        if not wanted.wants(destination, message.failed_at):
            continue
        entry = report.destination(destination)
        entry.found += len(message.sends)
        if destination not in hand_off.destinations:
            entry.not_configured += len(message.sends)
            continue
        if dry_run:
            entry.replayed += len(message.sends)
            continue
        source = f"journal:{stream.name}#{seq}"
        for send in message.sends:
            send.outcome.attempts = 0
            send.outcome.detail["replayed_from"] = source
        left = hand_off.replayed(message.sends)
        handed = [send for send in message.sends if send not in left]
        entry.replayed += len(handed)
        entry.unreadable += len(left)
        report._sends.extend(handed)
        if not left:  # all journaled again (or handed on): the dead letter is done with
            journal.acknowledge(stream.name, seq)
        if message.file:
            _mark(Path(message.file), [line_key(s.id, message.failed_at) for s in handed])


# -- dead-letter files ------------------------------------------------------------------------


def _from_file(path: Path, run: _Replay, with_journal: bool) -> None:
    hand_off, wanted, report, dry_run = run.hand_off, run.wanted, run.report, run.report.dry_run
    try:
        data = path.read_bytes()
    except OSError as error:
        logger.error("replay: cannot read %s: %s", path, error)
        report.destination(UNKNOWN).unreadable += 1
        return
    marked = read_marks(path)
    by_destination: dict[str, list[tuple[Send, str]]] = {}
    lines = data.split(b"\n")
    for line in lines[:-1]:  # the last piece has no newline: empty, or being appended now
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            destination = str(fields["destination"])
            delivery_id = str(fields["delivery_id"])
            failed_at = float(fields["failed_at"])
        except (ValueError, KeyError, TypeError):
            report.destination(UNKNOWN).unreadable += 1
            continue
        if not wanted.wants(destination, failed_at):
            continue
        key = line_key(delivery_id, failed_at)
        marks = marked.get(key, ())
        if with_journal and IN_JOURNAL in marks:
            continue  # one of the stream's: counted there
        entry = report.destination(destination)
        entry.found += 1
        if REPLAYED in marks:
            entry.already_replayed += 1
            continue
        if IN_JOURNAL in marks:  # the journal's stream holds it: a replay with the journal sends it
            entry.in_journal += 1
            continue
        if destination not in hand_off.destinations:
            entry.not_configured += 1
            continue
        try:
            send = _send_of(destination, delivery_id, fields)
        except Exception as error:  # a line this version cannot turn back into a send
            logger.error("replay: %s: delivery %s cannot be read: %s", path, delivery_id, error)
            entry.unreadable += 1
            continue
        send.outcome.detail["replayed_from"] = str(path)
        by_destination.setdefault(destination, []).append((send, key))
    for destination, found in by_destination.items():
        entry = report.destination(destination)
        if dry_run:
            entry.replayed += len(found)
            continue
        sends = [send for send, _ in found]
        left = set(map(id, hand_off.replayed(sends)))
        entry.replayed += len(sends) - len(left)
        entry.unreadable += len(left)
        report._sends.extend(send for send in sends if id(send) not in left)
        _mark(path, [key for send, key in found if id(send) not in left])


def _send_of(destination: str, delivery_id: str, fields: Mapping[str, Any]) -> Send:
    """A dead-letter line as a pending send again, with its ids (attempts 0)."""
    decode = _DECODERS.get(destination)
    if decode is not None:
        payload, size = decode(fields)
    else:  # a custom destination (`ctx.send.to`): its payload as it was written
        if "payload" not in fields:
            raise ValueError("no payload in the line")
        payload = fields["payload"]
        size = len(json.dumps(payload, default=str))
    return new_send(
        destination,
        delivery_id,
        str(fields.get("run_id") or ""),
        str(fields.get("workflow_id") or ""),
        float(fields.get("accepted_at") or 0.0),
        payload,
        size,
        0,
    )


def _mark(path: Path, keys: list[str]) -> None:
    """Mark lines of `path` replayed; a file not on this node is skipped."""
    if not keys or not path.exists():
        return
    try:
        append_marks(path, keys, REPLAYED)
    except OSError as error:
        logger.error("replay: could not mark %d sends replayed in %s: %s", len(keys), path, error)


# -- S3 objects written whole -----------------------------------------------------------------


def _s3_objects(root: Path, run: _Replay) -> None:
    wanted, report, uploads = run.wanted, run.report, run.uploads
    if not root.is_dir() or wanted.destination not in (None, "s3"):
        return
    for path in sorted(path for path in root.rglob("*.gz") if path.is_file()):
        if str(path) in run.objects_seen:
            continue
        try:
            failed_at = path.stat().st_mtime
        except OSError:
            continue
        if not wanted.wants("s3", failed_at):
            continue
        if path.with_name(path.name + REPLAYED_SUFFIX).exists():
            entry = report.destination(S3_OBJECTS)
            entry.found += 1
            entry.already_replayed += 1
            continue
        bucket, *key_parts = path.relative_to(root).parts
        key = "/".join(key_parts)
        try:
            data = path.read_bytes()
        except OSError as error:
            logger.error("replay: cannot read %s: %s", path, error)
            entry = report.destination(S3_OBJECTS)
            entry.found += 1
            entry.unreadable += 1
            continue
        if uploads.replay(bucket, key, data, report):
            _mark_object(path, bucket, key)


def _mark_object(path: Path, bucket: str, key: str) -> None:
    """`<object>.replayed` next to an object file (if it is on this node)."""
    if not path.exists():
        return
    try:
        write_private_file(
            path.with_name(path.name + REPLAYED_SUFFIX), f"s3://{bucket}/{key}\n".encode()
        )
    except OSError as error:
        logger.error("replay: could not mark %s replayed: %s", path, error)


class _S3Uploads:
    """Uploads dead-lettered S3 objects as they are, with the runtime's S3 settings."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._client: Any = None

    def replay(self, bucket: str, key: str, data: bytes, report: ReplayReport) -> bool:
        """Count one object found and upload it (not in a dry run); True once uploaded."""
        entry = report.destination(S3_OBJECTS)
        entry.found += 1
        if not getattr(self.config, "s3_endpoint", None):
            entry.not_configured += 1
            return False
        if report.dry_run:
            entry.replayed += 1
            return False
        try:
            if self._client is None:
                from outbound.destinations.s3.uploader import minio_client

                self._client, _ = minio_client(self.config)
            client = self._client
            if self.config.s3_create_buckets and not client.bucket_exists(bucket):
                client.make_bucket(bucket)
            client.put_object(
                bucket, key, io.BytesIO(data), len(data), content_type="application/gzip"
            )
        except Exception as error:
            logger.error("replay: uploading s3://%s/%s failed: %s", bucket, key, error)
            entry.failed_again += 1
            return False
        entry.replayed += 1
        entry.delivered += 1
        return True
