"""The reused JSON encoders encode exactly as `json.dumps` with the same options."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from outbound.destinations.json_encoding import json_encoder

VALUES: list[Any] = [
    {"sku": "SKU-5", "qty": 6, "tags": ["a", "b"], "nested": {"x": None, "y": True}},
    [1, 2.5, -0.0, 1e300, "é ✓ \u2028", 'quote " and \\ backslash'],
    "just a string",
    42,
    None,
    {1: "int keys become strings"},
]


@pytest.mark.parametrize("value", VALUES)
def test_encodes_as_json_dumps_does(value: Any) -> None:
    assert json_encoder(compact=True)(value) == json.dumps(
        value, ensure_ascii=False, separators=(",", ":")
    )
    assert json_encoder(compact=False)(value) == json.dumps(value, ensure_ascii=False)


def test_refuses_what_is_not_json() -> None:
    encode = json_encoder(compact=True)
    with pytest.raises(ValueError, match="Out of range float"):
        encode({"a": [math.nan]})
    with pytest.raises(TypeError, match="Object of type set is not JSON serializable"):
        encode({"a": {1, 2}})
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(RecursionError):
        encode(loop)
    # The encoder keeps no state between calls: it works again after each failure.
    assert encode({"a": 1}) == '{"a":1}'
