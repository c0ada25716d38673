"""`ctx.send.emit(...)`: the rules of an emit, and `EmittedEvent`, what it becomes.

Owns `validate_emit` (registered for `ctx.send.emit` in `destinations/registry.py`),
which takes a JSON object and encodes it once, at the call, as the event the
listening workflows will run with (`EmittedEvent`). Pure: no I/O. Must not
import the runtime or another destination.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outbound.destinations.emit.settings import EmitSettings
from outbound.destinations.payloads import quick_init
from outbound.destinations.validation import (
    REPLAY_MAX_BYTES,
    SendError,
    check_size,
    encode_json,
)


@quick_init  # a faster __init__: one payload per send (destinations/payloads.py)
@dataclass(frozen=True, slots=True)
class EmittedEvent:
    """A validated `ctx.send.emit(...)` call: the event as a JSON object."""

    raw_event: bytes  # compact UTF-8 JSON of a JSON object


def validate_emit(
    config: EmitSettings,  # every send takes its settings; an emit needs none of them
    max_bytes: int,
    raw_event: Mapping[str, Any],
) -> tuple[EmittedEvent, int]:
    """`ctx.send.emit(...)` as an `EmittedEvent` for the workflows that listen, and its size."""
    kind = "emit"
    if not isinstance(raw_event, Mapping):
        raise SendError(kind, "raw_event", "must be a JSON object (a dict)")
    data = encode_json(kind, "raw_event", dict(raw_event))
    check_size(kind, "raw_event", len(data), max_bytes)
    return EmittedEvent(data), len(data)


def from_dead_letter(fields: Mapping[str, Any]) -> tuple[EmittedEvent, int]:
    """A dead-letter line's fields (`EmitDestination.dead_letter_fields`) as the event again."""
    event = fields["payload"]
    if isinstance(event, str):  # written before the line held the object: its JSON text
        event = json.loads(event)
    return validate_emit(None, REPLAY_MAX_BYTES, event)  # type: ignore[arg-type]
