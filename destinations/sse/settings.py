"""The SSE destination's settings (`OUTBOUND_SSE_*`): replay history, keepalive, queue.

Owns these fields only; the runtime's `Config` composes them and reads the
environment (the HTTP API's own settings, token and CORS, are the runtime's).
Must not import the runtime or another destination.
"""

from __future__ import annotations

from dataclasses import dataclass

from outbound.destinations.settings import Settings, always_enabled, setting

#: What a send says when this destination is not running (it always runs).
HOW_TO_ENABLE = "the SSE destination is not running"


@dataclass(frozen=True)
class SseSettings(Settings):
    """How the SSE hub serves subscribers: always enabled."""

    sse_history: int = setting(
        "OUTBOUND_SSE_HISTORY", 100, "events replayed to a new SSE subscriber", rule="at least 1"
    )
    sse_keepalive: float = setting(
        "OUTBOUND_SSE_KEEPALIVE", 15.0, "seconds between SSE keepalive comments", rule="positive"
    )
    sse_queue: int = setting(
        "OUTBOUND_SSE_QUEUE",
        1000,
        "events queued per SSE subscriber before it is disconnected",
        rule="at least 1",
    )


#: Whether the runtime starts this destination: always, there is nothing to configure.
is_enabled = always_enabled
