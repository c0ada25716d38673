"""Log lines of the `outbound` commands: plain text or JSON lines (`OUTBOUND_LOG_FORMAT`).

Owns `configure_logging` (one stderr handler on the root logger, `outbound.*`
records from INFO, other libraries' from WARNING), `JsonFormatter` (one JSON
object per line, for log shippers) and `log_format_from_env`. Only commands
that own their process call `configure_logging` (`outbound serve`,
`outbound replay`): the library never configures logging, so an embedding
application's own handlers decide where `outbound.*` records go. Adds nothing
to a record beyond its own fields, its `extra=` fields and its exception:
what a log line holds is what the code that logged it chose (never a secret).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

#: `OUTBOUND_LOG_FORMAT`'s values: `plain` (the default) and `json`.
LOG_FORMATS = ("plain", "json")
LOG_FORMAT_VARIABLE = "OUTBOUND_LOG_FORMAT"
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The attributes every LogRecord has: anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def check_log_format(value: str) -> str:
    """`value` if it is a log format; ValueError naming the variable otherwise."""
    if value not in LOG_FORMATS:
        raise ValueError(f"{LOG_FORMAT_VARIABLE}={value!r}: expected plain or json")
    return value


def log_format_from_env(environ: dict[str, str] | None = None) -> str:
    """`OUTBOUND_LOG_FORMAT` (plain when unset), read before an app's `Config` exists."""
    environ = dict(os.environ) if environ is None else environ
    return check_log_format(environ.get(LOG_FORMAT_VARIABLE, "").strip() or "plain")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: `time` (UTC, ISO 8601), `level`, `logger`,
    `message`, each `extra=` field (delivery ids, workflow, ...) and `exception` (the
    formatted traceback) when there is one. A line a log shipper parses without rules."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _utc_iso(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def formatter_for(log_format: str) -> logging.Formatter:
    if check_log_format(log_format) == "json":
        return JsonFormatter()
    formatter = logging.Formatter(PLAIN_FORMAT)
    formatter.converter = time.gmtime  # UTC, as the JSON lines are
    return formatter


def configure_logging(
    log_format: str, stream: TextIO | None = None, level: int = logging.INFO
) -> logging.Handler:
    """Send log records to `stream` (stderr) in `log_format`: `outbound.*` from `level`
    (INFO), other libraries' from WARNING. For commands that own their process only;
    calling it again replaces the handler it added (never one the application added)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter_for(log_format))
    handler.set_name("outbound")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "outbound"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("outbound").setLevel(level)
    return handler
