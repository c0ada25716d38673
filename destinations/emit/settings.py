"""The emit destination's settings (`OUTBOUND_EMIT_MAX_DEPTH`).

Owns this field only; the runtime's `Config` composes it and reads the
environment. Must not import the runtime or another destination.
"""

from __future__ import annotations

from dataclasses import dataclass

from outbound.destinations.settings import Settings, always_enabled, setting

#: What a send says when this destination is not running (it always runs).
HOW_TO_ENABLE = "the emit destination is not running"


@dataclass(frozen=True)
class EmitSettings(Settings):
    """How far chains of emits may go: always enabled."""

    emit_max_depth: int = setting(
        "OUTBOUND_EMIT_MAX_DEPTH",
        16,
        "longest chain of emits before it is stopped",
        rule="at least 1",
    )


#: Whether the runtime starts this destination: always, there is nothing to configure.
is_enabled = always_enabled
