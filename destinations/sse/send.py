"""`ctx.send.sse(...)`: the rules of an SSE send, and `SseEvent`, what it becomes.

Owns `validate_sse` (registered for `ctx.send.sse` in `destinations/registry.py`),
which checks the channel (the SSE event name) and encodes the payload once, at
the call, as the `data:` the hub publishes (`SseEvent`). Pure: no I/O. Must not
import the runtime or another destination.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outbound.destinations.payloads import quick_init
from outbound.destinations.sse.settings import SseSettings
from outbound.destinations.validation import (
    CONTROL,
    REPLAY_MAX_BYTES,
    SendError,
    check_size,
    check_unicode,
    encode_json,
)

MAX_CHANNEL_CHARS = 200


@quick_init  # a faster __init__: one payload per send (destinations/payloads.py)
@dataclass(frozen=True, slots=True)
class SseEvent:
    """A validated `ctx.send.sse(...)` call: the event name and its JSON data."""

    channel: str
    data: bytes  # compact UTF-8 JSON


def validate_sse(
    config: SseSettings,  # every send takes its settings; an event needs none of them
    max_bytes: int,
    channel: str,
    payload: Any,
) -> tuple[SseEvent, int]:
    """`ctx.send.sse(...)` as an `SseEvent` for the workflow's stream, named `channel`; its size."""
    kind = "sse"
    if not isinstance(channel, str) or not channel.strip():
        raise SendError(kind, "channel", "must be a non-empty string")
    if CONTROL.search(channel):
        raise SendError(kind, "channel", "must not contain control characters (CR, LF, ...)")
    if len(channel) > MAX_CHANNEL_CHARS:
        raise SendError(kind, "channel", f"must be at most {MAX_CHANNEL_CHARS} characters")
    if not channel.isascii():
        check_unicode(kind, "channel", channel)
    data = encode_json(kind, "payload", payload)
    check_size(kind, "payload", len(data), max_bytes)
    return SseEvent(channel, data), len(data)


def from_dead_letter(fields: Mapping[str, Any]) -> tuple[SseEvent, int]:
    """A dead-letter line's fields (`SseDestination.dead_letter_fields`) as the event again."""
    return validate_sse(None, REPLAY_MAX_BYTES, fields["channel"], fields["payload"])  # type: ignore[arg-type]
