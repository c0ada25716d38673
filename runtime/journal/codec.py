"""What a journal message holds: sends and events as bytes, and back.

Owns `encode_sends` / `decode_sends` (a journal entry: the sends of one or
more runs) and `encode_event` / `decode_event` (an event published for a run).
An entry is `pickle` (protocol 5, the C implementation: ~1 µs a send, against
~8 µs for JSON of the same fields) of plain tuples: each send's fields, its
destination kind's tag, and its typed payload as the tuple of its fields
(`HttpRequest`, `SqlRow`, ...), never the payload object itself. Reading is
the dangerous direction: whoever can write to the stream would otherwise run
code through pickle's `find_class`. `_SafeUnpickler` resolves only plain value
types (containers, datetime, Decimal, UUID) and dataclasses of modules already
imported (a custom destination's payload), so a forged entry can at worst
make sends, never run code. Must not touch the network.

Versions. Nodes of two versions share a journal during a rolling upgrade, so
the format says which changes an older node may read past:

- A field added at the end (of a send's row, of a payload, of an event) that
  an older node may ignore: same magic. Readers take the fields they know and
  ignore what follows, so this version reads a later one's.
- A change an older node must not ignore (a field that changes what is
  delivered, like a signature asked for): the next magic (`OBJ2`, `OBE2`).
  A reader meeting a later magic raises `NewerFormatError`: the message is
  left for a node that reads it (an event is put back for another node,
  sends stay in the journal), never dropped as damaged.

The fields added so far (`depth`, `traceparent`, the HTTP request's `sign`,
`signing_keys`, `traceparent` and `retry`) came before this rule: a node
older than it cannot read messages that carry them.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from outbound.destinations.delivery import Send, new_send
from outbound.destinations.registry import DESTINATION_KINDS

#: The first bytes of every message: a later format can be told apart. The last byte is
#: the format's version (see "Versions" above).
ENTRY_MAGIC = b"OBJ1"
EVENT_MAGIC = b"OBE1"
#: Fields of a send's row this version writes and reads (a later one may add more).
_ROW_FIELDS = 10
#: Fields of an event this version knows (`JournaledEvent`'s; an older one wrote 3 or 4).
_EVENT_FIELDS = 5

# kind name -> (payload class, its field names); class -> kind name
_PAYLOADS: dict[str, tuple[type, tuple[str, ...]]] = {
    kind.name: (kind.payload, tuple(f.name for f in dataclasses.fields(kind.payload)))
    for kind in DESTINATION_KINDS
}
_TAGS: dict[type, str] = {payload: name for name, (payload, _) in _PAYLOADS.items()}

_SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("builtins", name) for name in ("set", "frozenset", "bytearray", "complex", "slice", "range")}
    | {
        ("datetime", name)
        for name in ("datetime", "date", "time", "timedelta", "timezone", "tzinfo")
    }
    | {
        ("decimal", "Decimal"),
        ("uuid", "UUID"),
        ("collections", "OrderedDict"),
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
    }
)


class JournalFormatError(ValueError):
    """A journal message this version cannot read (another format, or a forged global)."""


class NewerFormatError(JournalFormatError):
    """A journal message in a later version of this format: leave it for a node that reads
    it (a rolling upgrade), do not drop it."""


@dataclass(frozen=True, slots=True)
class JournaledEvent:
    """An event published for a run (`rt.publish`, `POST /workflows/{id}/events`)."""

    run_id: str
    workflow_id: str
    event: Any
    depth: int = 0  # emits that led to it (a listener run started by an emit: 1 or more)
    traceparent: str | None = None  # the W3C trace its publisher was in (its run joins it)


def encode_sends(sends: Iterable[Send]) -> bytes:
    """One journal entry: every send's fields and payload, in order."""
    tags = _TAGS
    rows = []
    for send in sends:
        payload = send._payload
        tag = tags.get(type(payload))
        if tag is not None:
            payload = tuple(getattr(payload, name) for name in _PAYLOADS[tag][1])
        outcome = send.outcome
        rows.append(
            (
                send._destination,
                send._id,
                send._run_id,
                send._workflow_id,
                send._accepted_at,
                send._size,
                send._depth,
                outcome.attempts,
                tag,
                payload,
            )
        )
    return ENTRY_MAGIC + pickle.dumps(rows, protocol=5)


def decode_sends(data: bytes) -> list[Send]:
    """The sends of a journal entry, pending again, with their ids and attempts."""
    rows = _load(data, ENTRY_MAGIC)
    sends = []
    payloads = _PAYLOADS
    try:
        for row in rows:
            # A later version's fields after ours are left out (see "Versions").
            destination, id, run_id, workflow_id, at, size, depth, attempts, tag, payload = row[
                :_ROW_FIELDS
            ]
            if tag is not None:
                payload_type, names = payloads[tag]
                payload = payload_type(*payload[: len(names)])
            send = new_send(destination, id, run_id, workflow_id, at, payload, size, depth)
            send.outcome.attempts = attempts
            sends.append(send)
    except (TypeError, ValueError, KeyError) as error:  # of the right format, wrong shape
        raise JournalFormatError(f"a damaged journal entry: {error!r}") from None
    return sends


def encode_event(event: JournaledEvent) -> bytes:
    fields: tuple[Any, ...] = (event.run_id, event.workflow_id, event.event, event.depth)
    if event.traceparent is not None:  # (only then: an untraced event reads as it always did)
        fields += (event.traceparent,)
    return EVENT_MAGIC + pickle.dumps(fields, protocol=5)


def decode_event(data: bytes) -> JournaledEvent:
    # 3 fields before depth was kept, 5 with a traceparent; a later version's after those
    fields = _load(data, EVENT_MAGIC)
    try:
        return JournaledEvent(*fields[:_EVENT_FIELDS])
    except TypeError as error:  # of the right format, wrong shape
        raise JournalFormatError(f"a damaged journal event: {error}") from None


def _load(data: bytes, magic: bytes) -> Any:
    if not data.startswith(magic):
        family, version = magic[:-1], magic[-1:]
        found = data[len(family) : len(magic)]
        if data.startswith(family) and found.isdigit() and found > version:
            raise NewerFormatError(
                f"a journal message of format version {found.decode()} (this version reads "
                f"{version.decode()}): written by a newer Outbound, left for a node that reads it"
            )
        raise JournalFormatError(f"not a journal message of this version: {data[:4]!r}")
    try:
        return _SafeUnpickler(io.BytesIO(memoryview(data)[len(magic) :])).load()
    except JournalFormatError:
        raise
    except Exception as error:
        raise JournalFormatError(f"a damaged journal message: {error}") from error


class _SafeUnpickler(pickle.Unpickler):
    """Resolves plain value types and already-imported dataclasses; refuses everything else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        loaded = sys.modules.get(module)
        found = getattr(loaded, name, None) if loaded is not None and "." not in name else None
        if isinstance(found, type) and dataclasses.is_dataclass(found):
            return found
        raise JournalFormatError(
            f"a journal message names {module}.{name}, which is not a plain value type "
            "or an imported dataclass: refused"
        )
