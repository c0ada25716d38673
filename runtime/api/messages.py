"""Request bodies and error answers shared by the API's endpoints.

Owns reading a body up to a size limit (`read_body`, `PayloadTooLargeError`),
parsing it as JSON with a nesting limit (`load_json`, `MAX_JSON_DEPTH`) and the
JSON error answer every endpoint gives (`error_response`). Knows nothing of
runtimes or routes.
"""

from __future__ import annotations

import array
import itertools
import json
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

MAX_JSON_DEPTH = 128  # nesting of request bodies (serde_json's default limit too)


def load_json(body: bytes) -> Any:
    """Parse a request body; ValueError (a 400) when it is not JSON or nests too deeply.

    Too deep is refused here, not only when the parser runs out of stack: a
    value that barely parses would fail again later (encoding it for
    `GET /runs`, copying it into sends) with a RecursionError, a 500.
    """
    try:
        value = json.loads(body)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    # Cheap first: fewer brackets than the limit cannot nest deeper than it.
    brackets = body.count(b"[") + body.count(b"{")
    if brackets > MAX_JSON_DEPTH and json_depth(body) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1, +1, -1, -1 as int8
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def json_depth(body: bytes) -> int:
    """How deeply lists/objects nest in `body`, valid JSON (already parsed).

    Counted on the bytes at C speed (strings removed, brackets as +1/-1, the
    highest running sum): walking the parsed value in Python took four times
    as long as parsing it.
    """
    encoding = json.detect_encoding(body)
    if encoding != "utf-8":
        body = body.decode(encoding).encode("utf-8")
    steps = _JSON_STRING.sub(b"", body).translate(_BRACKET_STEPS, _NOT_BRACKETS)
    return max(itertools.accumulate(array.array("b", steps)), default=0)


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class PayloadTooLargeError(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError
        chunks.append(chunk)
    return b"".join(chunks)
