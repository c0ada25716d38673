"""`ctx.send.s3(...)`: the rules of an S3 send, and `S3Line`, what it becomes.

Owns `validate_s3` (registered for `ctx.send.s3` in `destinations/registry.py`),
which checks the bucket and prefix against S3's naming rules and encodes the
payload once, at the call, as the JSON line the batch's object will hold
(`S3Line`). Pure: no I/O. Must not import the runtime or another destination.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outbound.destinations.payloads import quick_init
from outbound.destinations.s3.settings import S3Settings
from outbound.destinations.validation import (
    CONTROL,
    REPLAY_MAX_BYTES,
    SendError,
    check_size,
    check_unicode,
    encode_json,
    is_ipv4,
)

# With `fullmatch`: `$` alone would let a trailing newline through.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MAX_PREFIX_BYTES = 512
_VALID_S3_TARGETS: set[tuple[str, str]] = set()  # (bucket, prefix) pairs already checked


@quick_init  # a faster __init__: one payload per send (destinations/payloads.py)
@dataclass(frozen=True, slots=True)
class S3Line:
    """A validated `ctx.send.s3(...)` call: one JSON line for the batch of `bucket`/`prefix`."""

    bucket: str
    prefix: str
    line: bytes  # compact UTF-8 JSON, no newline


def validate_s3(
    config: S3Settings,  # every send takes its settings; S3 needs none of them
    max_bytes: int,
    bucket: str,
    prefix: str,
    payload: Any,
) -> tuple[S3Line, int]:
    """`ctx.send.s3(...)` as an `S3Line` for the NDJSON batch of `bucket`/`prefix`, and its size."""
    kind = "s3"
    if type(bucket) is not str or type(prefix) is not str:
        _check_bucket(bucket)
        _check_prefix(prefix)
    elif (bucket, prefix) not in _VALID_S3_TARGETS:
        _check_bucket(bucket)
        _check_prefix(prefix)
        if len(_VALID_S3_TARGETS) < 4096:
            _VALID_S3_TARGETS.add((bucket, prefix))
    line = encode_json(kind, "payload", payload)
    check_size(kind, "payload", len(line), max_bytes)
    return S3Line(bucket, prefix, line), len(line)


def _check_bucket(bucket: Any) -> None:
    rule = None
    if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket):
        rule = (
            "must be 3-63 characters of lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    elif ".." in bucket:
        rule = "must not contain two adjacent periods"
    elif is_ipv4(bucket):
        rule = "must not be formatted as an IP address"
    elif bucket.startswith(("xn--", "sthree-")) or bucket.endswith(("-s3alias", "--ol-s3")):
        rule = "must not use a prefix or suffix reserved by S3 (xn--, sthree-, -s3alias, --ol-s3)"
    if rule:
        raise SendError("s3", "bucket", f"{rule} (S3 bucket naming rules); got {bucket!r}")


def _check_prefix(prefix: Any) -> None:
    if not isinstance(prefix, str):
        raise SendError("s3", "prefix", "must be a string (use '' for the bucket root)")
    if prefix.startswith("/"):
        raise SendError("s3", "prefix", "must not start with '/'")
    if ".." in prefix:
        raise SendError("s3", "prefix", "must not contain '..'")
    if CONTROL.search(prefix):
        raise SendError("s3", "prefix", "must not contain control characters")
    if check_unicode("s3", "prefix", prefix) > MAX_PREFIX_BYTES:
        raise SendError("s3", "prefix", f"must be at most {MAX_PREFIX_BYTES} bytes")
    # Trailing slashes are dropped (`normalize_prefix`); inside, '.' segments are
    # refused by the minio client, and they (even with spaces around) and empty
    # ones ('a//b') by MinIO's server, while AWS keeps both as part of the name:
    # neither can be delivered alike.
    segments = prefix.rstrip("/").split("/")
    if any(segment.strip() == "." for segment in segments):
        raise SendError("s3", "prefix", "must not contain '.' path segments (such as './x')")
    if prefix.rstrip("/") and "" in segments:
        raise SendError("s3", "prefix", "must not contain empty path segments ('//')")


def from_dead_letter(fields: Mapping[str, Any]) -> tuple[S3Line, int]:
    """A dead-letter line's fields (`S3Destination.dead_letter_fields`) as the line again."""
    bucket, prefix, payload = fields["bucket"], fields["prefix"], fields["payload"]
    return validate_s3(None, REPLAY_MAX_BYTES, bucket, prefix, payload)  # type: ignore[arg-type]
