"""JSON encoders built once and reused, for the per-send paths.

`json.dumps` and `JSONEncoder.encode` build a new C encoder object on every
call, and for the small values a send carries that set-up is most of the
cost (measured here: 1.7 µs to encode `[{"sku": "SKU-5", "qty": 6}]`, 0.6 µs
with an encoder made once). `json_encoder` makes one and reuses it. It does
not track circular references: a cycle ends in `RecursionError`, which every
caller already reports as "nested too deeply". Must not touch actors or I/O.

Text is written as it is (`ensure_ascii=False`: no `\\uXXXX` escapes), so a
lone surrogate (`"\\ud800"`) passes through into the JSON text and is caught
by the caller's `.encode("utf-8")`, which refuses it. That is the rule: such
text is refused, never escaped, because `"\\ud800"` in JSON is rejected by
strict receivers (Postgres jsonb, I-JSON / RFC 7493) and silently replaced by
U+FFFD in lenient ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def json_encoder(*, compact: bool) -> Callable[[Any], str]:
    """A function encoding a value as JSON text: UTF-8 text kept as it is, NaN refused.

    `compact` drops the spaces after `,` and `:`; without it the text has the
    separators of Postgres's own jsonb output.
    """
    item_separator, key_separator = (",", ":") if compact else (", ", ": ")
    if c_make_encoder is None:  # an interpreter without the C accelerator
        encoder = json.JSONEncoder(
            ensure_ascii=False,
            allow_nan=False,
            check_circular=False,
            separators=(item_separator, key_separator),
        )
        return encoder.encode
    encode = c_make_encoder(
        None, _not_json, encode_basestring, None, key_separator, item_separator, False, False, False
    )

    def encode_json(value: Any) -> str:
        return "".join(encode(value, 0))

    return encode_json
