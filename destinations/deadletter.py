"""Dead-letter files: where every send that failed for good is kept, readable by its owner only.

Owns the layout under `<data_dir>/dead-letter/` and `DeadLetterWriter`, the
one writer failed sends go through: the settle path in `destinations.delivery`
calls it (through the ledger) when sends become `failed`, before they let go
of their payload, so a send is written when it fails, not only at shutdown.
One JSON-lines file per destination, process and UTC day
(`<destination>-<YYYYMMDD>-<pid>.jsonl`), one line per send: its ids, attempts,
final error and its payload in the destination's replayable form
(`Destination.dead_letter_fields`). A call writes the lines of all its sends
with one append and one fsync: a batch of 10,000 refused rows is one write.

Files are created 0600 and directories 0700 whatever the umask, and existing
dead-letter directories are tightened: lines hold payloads and credentials
(HTTP auth and headers). The WARNING logged for each write names the
destination, the file, delivery ids and errors, never payloads or header values;
`FailureLog` keeps a storm of failures to a few lines and a summary.
Each file may have a sidecar `<file>.replayed` (0600) naming the lines that a
replay sent again, or that the journal also holds (`read_marks`, `append_marks`).
Destinations with a better native form (S3 writes its exact `.gz` objects) write
it with `private_dir`/`write_private_file` and name it in the send's
`detail["dead_letter"]`, which tells this writer not to write the send again.
Must not import `runtime`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outbound.destinations.delivery import Send, describe_error

logger = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
#: Delivery ids and errors named in one WARNING line; the file has them all.
LOGGED_SENDS = 3
LOGGED_ERROR_CHARS = 200
#: WARNING lines per destination per window (`FailureLog`): a storm of failures (an
#: endpoint down, thousands of sends failing one by one) is summarized, not a line each.
LOGGED_WRITES_PER_WINDOW = 10
LOG_WINDOW_SECONDS = 10.0

#: A destination's replayable fields of a failed send (`Destination.dead_letter_fields`).
FieldsOf = Callable[[Any], dict[str, Any]]

#: A dead-letter file's sidecar (`<file>.replayed`) and its marks (`read_marks`).
REPLAYED_SUFFIX = ".replayed"
REPLAYED = "replayed"
IN_JOURNAL = "journal"

_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def dead_letter_dir(data_dir: Path) -> Path:
    """`<data_dir>/dead-letter`, created (0700) or tightened to 0700."""
    root = Path(data_dir) / "dead-letter"
    return private_dir(root, root)


def private_dir(path: Path, root: Path) -> Path:
    """Make directory `path` (at or under `root`) and tighten `root` and all below it to 0700.

    Missing directories above `root` (the data dir) are created 0700 too; ones
    that exist are the user's and left as they are.
    """
    path, root = Path(path), Path(root)
    for parent in reversed(root.parents):
        if not parent.exists():
            _mkdir(parent)
    parts = path.relative_to(root).parts
    for level in [root] + [root.joinpath(*parts[: i + 1]) for i in range(len(parts))]:
        _mkdir(level)
        os.chmod(level, DIR_MODE)  # an existing one too, whatever it was
    return path


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise


def append_private(path: Path, data: bytes) -> None:
    """Append `data` to `path` (created 0600, tightened if it exists) and fsync it."""
    _write_synced(path, os.O_APPEND, data)


def write_private_file(path: Path, data: bytes) -> None:
    """Write `data` as `path` (0600) durably: write a partial file, fsync, rename."""
    partial = path.with_name(path.name + ".partial")
    _write_synced(partial, os.O_TRUNC, data)
    partial.replace(path)


def _write_synced(path: Path, flag: int, data: bytes) -> None:
    """Open `path` owner-only (created 0600, tightened if it exists) with `flag`
    (`O_APPEND` or `O_TRUNC`), write `data` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flag | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "ab" if flag == os.O_APPEND else "wb") as file:
        os.fchmod(fd, FILE_MODE)
        file.write(data)
        file.flush()
        os.fsync(fd)


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


def line_key(delivery_id: str, failed_at: float) -> str:
    """What names one line of a dead-letter file in its sidecar: its id and failure time
    (a send that fails again after a replay is a new line, with a new time)."""
    return f"{delivery_id} {failed_at!r}"


def read_marks(path: Path) -> dict[str, set[str]]:
    """The lines of dead-letter file `path` dealt with elsewhere, from its sidecar
    `<file>.replayed`: line key -> its marks, `"replayed"` (sent again) and/or
    `"journal"` (the journal's dead-letter stream holds it)."""
    sidecar = path.with_name(path.name + REPLAYED_SUFFIX)
    try:
        text = sidecar.read_text("utf-8")
    except FileNotFoundError:
        return {}
    marks: dict[str, set[str]] = {}
    for line in text.splitlines():
        delivery_id, _, rest = line.partition(" ")
        failed_at, _, mark = rest.partition(" ")
        marks.setdefault(f"{delivery_id} {failed_at}", set()).add(mark or REPLAYED)
    return marks


def append_marks(path: Path, keys: Sequence[str], mark: str = "replayed") -> None:
    """Mark lines of dead-letter file `path` (`line_key`s) in its sidecar (0600, fsynced)."""
    suffix = "" if mark == REPLAYED else f" {mark}"
    data = "".join(f"{key}{suffix}\n" for key in keys).encode("utf-8")
    append_private(path.with_name(path.name + REPLAYED_SUFFIX), data)


def payload_fields(send: Any) -> dict[str, Any]:
    """The default replayable form of a send: its payload as it is."""
    return {"payload": getattr(send, "payload", None)}


def _json_line(fields: dict[str, Any]) -> str:
    try:
        line = json.dumps(fields, default=jsonable, ensure_ascii=False)
        line.encode("utf-8")  # a lone surrogate would fail the whole write later
    except UnicodeEncodeError:
        line = json.dumps(fields, default=jsonable)  # \u escapes read back the same text
    except ValueError:  # a circular payload
        fields["payload"] = repr(fields.get("payload"))
        line = json.dumps(fields, default=jsonable)
    return line


class DeadLetterWriter:
    """Appends failed sends to `<data_dir>/dead-letter/`: the ledger's dead-letter store.

    Thread-safe: destination actors and hand-off threads settle failures at
    once. `write` never raises; a send it could not write gets
    `detail["dead_letter_error"]` and an ERROR line in the log instead.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._formats: dict[str, FieldsOf] = {}
        self._lock = threading.Lock()
        #: The WARNING lines of the sends written (rate-limited per destination).
        self.failure_log = FailureLog()

    def log_summaries(self) -> None:
        """Log the failures a rate-limited window has not told yet (at a runtime's stop)."""
        self.failure_log.flush()

    @property
    def directory(self) -> Path:
        return self.data_dir / "dead-letter"

    def register_format(self, destination: str, fields_of: FieldsOf) -> None:
        """Write `destination`'s sends as `fields_of(send)` (payload, table, ...) from now on."""
        self._formats[destination] = fields_of

    def path_for(self, destination: str) -> Path:
        """This process's file for `destination` today (UTC)."""
        name = _UNSAFE_IN_NAME.sub("_", destination).lstrip(".") or "destination"
        day = time.strftime("%Y%m%d", time.gmtime())
        return self.directory / f"{name}-{day}-{os.getpid()}.jsonl"

    def write(self, sends: Sequence[Send]) -> None:
        """Append one line per send failing now; name the file in `detail["dead_letter"]`."""
        by_destination: dict[str, list[Send]] = {}
        for send in sends:
            by_destination.setdefault(send.destination, []).append(send)
        for destination, group in by_destination.items():
            self._write(destination, group)

    def _write(self, destination: str, sends: list[Send], failed_at: float | None = None) -> None:
        failed_at = time.time() if failed_at is None else failed_at
        try:
            fields_of = self._formats.get(destination, payload_fields)
            data = "".join(
                _json_line(self._fields(destination, send, fields_of, failed_at)) + "\n"
                for send in sends
            ).encode("utf-8")
            with self._lock:  # one append at a time: lines of two writers never interleave
                path = self.path_for(destination)
                private_dir(path.parent, self.directory)
                append_private(path, data)
        except Exception as error:  # a full disk must not keep the send from settling
            problem = describe_error(error)
            logger.error(
                "could not dead-letter %d failed %r send(s) (%s): %s",
                len(sends),
                destination,
                _summary(sends),
                problem,
            )
            for send in sends:
                send.detail["dead_letter_error"] = problem
            return
        where = str(path)
        for send in sends:
            send.detail["dead_letter"] = where
        self.failure_log.written(destination, sends, where)

    @staticmethod
    def _fields(
        destination: str, send: Send, fields_of: FieldsOf, failed_at: float
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "destination": destination,
            "delivery_id": send.id,
            "run_id": send.run_id,
            "workflow_id": send.workflow_id,
            "accepted_at": send.accepted_at,
            "failed_at": failed_at,
            "attempts": send.attempts,
            "error": send.error,
        }
        try:
            fields.update(fields_of(send))
        except Exception:  # not the shape this destination makes (e.g. `ctx.send.to`)
            fields.update(payload_fields(send))
        return fields


@dataclass(slots=True)
class _Window:
    """One destination's current window of failure lines."""

    started: float
    lines: int = 0
    unlogged_sends: int = 0  # written in this window after its last allowed line
    unlogged_writes: int = 0
    last_error: str = ""
    where: str = ""


class FailureLog:
    """The WARNING lines for sends that failed for good, cheap in a storm.

    Each dead-letter write gets one line (destination, file, the first
    `LOGGED_SENDS` delivery ids with their errors, and as `extra=` fields for
    JSON logs), up to `limit` lines per destination per `window` seconds. The
    writes after that are counted, and told in one summary line when the next
    window of that destination opens (or at the runtime's stop, `flush`):
    10,000 sends failing one by one make 10 lines and one summary, not 10,000
    lines. The files and `outbound_dead_letters_total` still count each one.
    """

    def __init__(
        self,
        limit: int = LOGGED_WRITES_PER_WINDOW,
        window: float = LOG_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def written(self, destination: str, sends: Sequence[Send], where: str) -> None:
        """`sends` of `destination` failed for good and were written to `where`."""
        now = self._clock()
        ended = None
        with self._lock:  # int updates only: the lines are logged after it is released
            current = self._windows.get(destination)
            if current is None or now - current.started >= self.window:
                ended = current
                current = self._windows[destination] = _Window(now)
            if current.lines < self.limit:
                current.lines += 1
                last_line = current.lines == self.limit
            else:
                current.unlogged_sends += len(sends)
                current.unlogged_writes += 1
                current.last_error = (sends[-1].error or "") if sends else ""
                current.where = where
                last_line = None
        if ended is not None and ended.unlogged_sends:
            self._log_summary(destination, ended)
        if last_line is None:
            return
        more = (
            f" (the next failures of {destination!r} in {self.window:g} s are summarized "
            "in one line)"
            if last_line
            else ""
        )
        logger.warning(
            "dead-lettered %d failed %r send(s) to %s: %s%s",
            len(sends),
            destination,
            where,
            _summary(sends),
            more,
            extra={
                "destination": destination,
                "failed_sends": len(sends),
                "delivery_ids": [send.id for send in sends[:LOGGED_SENDS]],
                "error": (sends[0].error or "")[:LOGGED_ERROR_CHARS] if sends else "",
                "dead_letter_file": where,
            },
        )

    def flush(self) -> None:
        """Log every window's failures not told yet (a runtime's stop)."""
        with self._lock:
            windows = self._windows.items()
            ended = {name: window for name, window in windows if window.unlogged_sends}
            self._windows.clear()
        for destination, window in ended.items():
            self._log_summary(destination, window)

    def _log_summary(self, destination: str, window: _Window) -> None:
        logger.warning(
            "dead-lettered %d more failed %r send(s) in %d writes to %s without a line "
            "each (at most %d lines per %g s); last error: %s",
            window.unlogged_sends,
            destination,
            window.unlogged_writes,
            window.where,
            self.limit,
            self.window,
            window.last_error[:LOGGED_ERROR_CHARS],
            extra={
                "destination": destination,
                "failed_sends": window.unlogged_sends,
                "error": window.last_error[:LOGGED_ERROR_CHARS],
                "dead_letter_file": window.where,
            },
        )


def _summary(sends: Sequence[Send]) -> str:
    """Delivery ids and errors of the first few sends, for a log line (no payloads)."""
    shown = [
        f"{send.id}: {(send.error or '')[:LOGGED_ERROR_CHARS]}" for send in sends[:LOGGED_SENDS]
    ]
    if len(sends) > LOGGED_SENDS:
        shown.append(f"... and {len(sends) - LOGGED_SENDS} more")
    return "; ".join(shown)
