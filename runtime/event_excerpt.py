"""A run's event as the inspector shows it: `event_excerpt`, bounded JSON text made once per run.

The runtime does not keep events (a run's sends drop their payloads once
settled, and the history holds `OUTBOUND_RUN_HISTORY` runs), yet a person
looking at a failed run wants to see what it was called with. So each run
keeps a short text of its event, made when the run starts (before the
workflow can change the event), at most `OUTBOUND_RUN_EVENT_EXCERPT`
characters: 10,000 runs of 2,000 characters are at most ~40 MB of text.

This runs once per run on the hot path, so it is one call of the C JSON
encoder made once (`json_encoder`: ~0.5 µs for a small dict, where
`json.dumps` sets an encoder up on each call); the cut happens after
encoding, so a huge event costs its encoding once (as its parsing did). An
event JSON cannot hold (an object, bytes, NaN, a cycle) falls back to a
bounded `reprlib` text. Must not touch actors, the ledger or I/O.
"""

from __future__ import annotations

import reprlib
from typing import Any

from outbound.destinations.json_encoding import json_encoder

#: The mark that ends an excerpt whose event was longer than the limit.
CUT_MARK = "…"

_encode = json_encoder(compact=True)
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 400
_repr.maxlevel = 4
_repr.maxdict = _repr.maxlist = _repr.maxtuple = _repr.maxset = 20


def event_excerpt(event: Any, limit: int) -> str | None:
    """The event as compact JSON text (or a bounded repr when JSON cannot hold it), cut to
    `limit` characters ending with `CUT_MARK`; None when `limit` is 0 (keep none)."""
    if limit <= 0:
        return None
    if type(event) is str and len(event) > limit:
        # Only its first `limit` characters can show: each encodes to one or more, so the
        # cut text is the same, without encoding megabytes of it.
        event = event[:limit]
    try:
        text = _encode(event)
    except (TypeError, ValueError, RecursionError):
        # Not JSON: a Python object passed to rt.submit. Its repr says what it was.
        try:
            text = _repr.repr(event)
        except Exception as error:  # a repr that raises: say so rather than fail the run
            text = f"<{type(event).__name__}: repr failed: {type(error).__name__}>"
    if not text.isascii():
        # A lone surrogate ("\\ud800" parsed from a JSON body) cannot be written as UTF-8:
        # it becomes the escape it came as, so the API can always answer with the excerpt.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        return text[: limit - 1] + CUT_MARK
    return text
