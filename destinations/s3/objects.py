"""The S3 object format: what one batch of `ctx.send.s3` payloads becomes.

Owns `S3Object` and the layout rules: newline-delimited JSON (one payload per
line, in send order), gzip-compressed, stored under
`PREFIX/YYYY/MM/DD/HH/YYYY-MM-DD-HH-MM-SS-IDENTIFIER.gz` (UTC), where
IDENTIFIER is the SHA-256 of the object's bytes in 64 lowercase hex digits.
The gzip header carries no timestamp, so the same lines always give the same
bytes and the same identifier: a retried upload overwrites itself. Pure
functions only: no client, no actor, no file system.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

GZIP_LEVEL = 6  # zlib's default: most of level 9's ratio at a fraction of its cost


@dataclass(frozen=True, slots=True)
class S3Object:
    """One encoded batch: where it goes and its exact bytes."""

    bucket: str
    key: str
    data: bytes
    events: int
    #: Its manifest is in the journal already (stored before a first upload, or the
    #: object was rebuilt from one at recovery): an upload asks whether it is there first.
    manifested: bool = False
    #: False for an object named by a manifest whose lines could not all be recovered:
    #: `data` is empty, and only asking S3 whether it was uploaded can settle its sends.
    complete: bool = True
    #: The journal sequence numbers of its manifest (parts), deleted once its sends are gone.
    manifest_seqs: tuple[int, ...] = ()


def normalize_prefix(prefix: str) -> str:
    """`logs`, `logs/` and `logs//` name the same folder; `` and `/` the bucket root."""
    return prefix.rstrip("/")


def object_key(prefix: str, identifier: str, moment: datetime) -> str:
    """`PREFIX/YYYY/MM/DD/HH/YYYY-MM-DD-HH-MM-SS-IDENTIFIER.gz`, in UTC."""
    moment = moment.astimezone(UTC)
    name = f"{moment:%Y/%m/%d/%H}/{moment:%Y-%m-%d-%H-%M-%S}-{identifier}.gz"
    folder = normalize_prefix(prefix)
    return f"{folder}/{name}" if folder else name


def gzip_lines(lines: list[bytes]) -> bytes:
    """The object's bytes: the lines as NDJSON, gzipped with no timestamp (deterministic)."""
    body = b"\n".join(lines) + b"\n" if lines else b""
    return gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)


def object_identifier(key: str) -> str:
    """The IDENTIFIER of a key made by `object_key` (the SHA-256 of its bytes)."""
    name = key.rsplit("/", 1)[-1]
    return name.removesuffix(".gz").rsplit("-", 1)[-1]


def encode_object(
    bucket: str, prefix: str, lines: Iterable[bytes], moment: datetime | None = None
) -> S3Object:
    """Gzip the JSON lines (each already encoded, without newline) into one object."""
    lines = list(lines)
    data = gzip_lines(lines)
    identifier = hashlib.sha256(data).hexdigest()
    key = object_key(prefix, identifier, moment or datetime.now(UTC))
    return S3Object(bucket, key, data, len(lines))


def rebuild_object(bucket: str, key: str, lines: Iterable[bytes]) -> S3Object | None:
    """The object `key` again from its lines, in order (recovery from a manifest).

    The same lines give the same bytes (the gzip header has no timestamp), so
    their SHA-256 is the identifier in `key`; None if it is not (the lines are
    not the ones that made it).
    """
    lines = list(lines)
    data = gzip_lines(lines)
    if hashlib.sha256(data).hexdigest() != object_identifier(key):
        return None
    return S3Object(bucket, key, data, len(lines), manifested=True)
