"""Dead-letter files: where sends that could not be delivered by shutdown are kept.

Owns the file layout under `<data_dir>/dead-letter/`: one JSON-lines file per
destination and shutdown, one line per send, with the payload and why it was
not delivered, so an operator can inspect and replay it. Destinations with a
better native form (S3 writes its exact `.gz` objects) write their own files
beside these.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from destinations.delivery import Outgoing


def dead_letter_dir(data_dir: Path) -> Path:
    path = Path(data_dir) / "dead-letter"
    path.mkdir(parents=True, exist_ok=True)
    return path


def timestamped_name(destination: str, suffix: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{destination}-{stamp}-{os.getpid()}-{time.monotonic_ns() % 10**9}{suffix}"


def jsonable(value: Any) -> Any:
    """JSON `default=` hook for payloads: dataclasses, bytes and sets."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def write_jsonl(
    data_dir: Path, destination: str, sends: Iterable[Outgoing], reason: str
) -> Path | None:
    """Append one line per send to a new dead-letter file; None when there was nothing."""
    lines = [
        json.dumps(
            {
                "destination": destination,
                "delivery_id": send.id,
                "run_id": send.run_id,
                "workflow_id": send.workflow_id,
                "accepted_at": send.accepted_at,
                "attempts": send.attempts,
                "last_error": send.error,
                "reason": reason,
                "payload": send.payload,
            },
            default=jsonable,
            ensure_ascii=False,
        )
        for send in sends
        if not send.final  # final sends were settled, and let go of their payload
    ]
    if not lines:
        return None
    path = dead_letter_dir(data_dir) / timestamped_name(destination, ".jsonl")
    with open(path, "a", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
        file.flush()
        os.fsync(file.fileno())
    return path
