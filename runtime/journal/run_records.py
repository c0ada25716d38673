"""The run inspector in a cluster: `RunRecords`, every run's record where any node can read it.

Owns the stream `<CLUSTER>_RUN_RECORDS`: one message per run under
`<cluster>.run_records.<run id>` (only the latest kept per run), at most
`OUTBOUND_RUN_HISTORY` runs (the oldest go first), so `GET /runs/{id}` and
`rt.deliveries(run_id)` answer on any node. A record is the run's result and
its deliveries as JSON, the same shapes the API shows.

Writes are off the hot path and coalesced: the ledger's listeners only mark
a run as changed (its end, a delivery becoming final); every `FLUSH_EVERY` s
the journal's loop builds the record of each changed run from the ledger and
publishes it, once its sends are all final or `SETTLE_GRACE` s after it
changed, so most runs are stored once.
They are plain publishes, not acknowledged ones: a record lost to a broken
connection is a stale view until the run's next change, not a lost send.
Reads are a direct get of the run's subject (any replica answers; no
consumer). The list of recent runs (`kept_runs`, the inspector's list) is the
stream read in full by a follower, started the first time someone asks (a node
whose inspector nobody opens decodes nothing): every node's runs, in the order
they were first stored (about when they ended), the latest version of each.
Must not import the runtime facade.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from outbound.destinations.delivery import Delivery, Ledger, Send
from outbound.journal.follow import Follower, stop_following
from outbound.run import RunResult

logger = logging.getLogger(__name__)

STREAM_KIND = "run_records"
#: Seconds between two writes of changed runs (how stale another node's view may be).
FLUSH_EVERY = 0.2
#: Seconds a run whose sends are not all final waits before its record is stored anyway:
#: most runs' sends are final within it, so most runs are stored once, not at their end
#: and again at their last delivery (each store costs a node ~50 µs, NATS ~20 µs).
SETTLE_GRACE = 1.0
#: Seconds a record read from the cluster is answered again from memory, and how many.
READ_CACHE_SECONDS = 0.5
READ_CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run as another node recorded it: its result and its deliveries."""

    result: RunResult
    deliveries: list[Delivery]


def encode_record(result: RunResult, deliveries: list[Delivery]) -> bytes:
    return json.dumps(
        {"run": result.as_dict(), "deliveries": [record.as_dict() for record in deliveries]},
        default=repr,
    ).encode()


def decode_record(data: bytes) -> RunRecord:
    """The record `encode_record` wrote. Fields this version does not know are left out:
    a node of a newer version may add some (a rolling upgrade); missing ones keep their
    defaults (an older node's records)."""
    found = json.loads(data)
    result = RunResult(**_known(found["run"], _RESULT_FIELDS))
    deliveries = [
        Delivery(
            **_known(record, _DELIVERY_FIELDS),
            run_id=result.run_id,
            workflow_id=result.workflow_id,
        )
        for record in found["deliveries"]
    ]
    return RunRecord(result, deliveries)


_RESULT_FIELDS = frozenset(field.name for field in dataclasses.fields(RunResult))
_DELIVERY_FIELDS = frozenset(field.name for field in dataclasses.fields(Delivery)) - {
    "run_id",
    "workflow_id",
}


def _known(fields: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if name in known}


class RunRecords:
    """This node's runs, written to the cluster's run records; any node's, read from them."""

    def __init__(self, journal: Any, ledger: Ledger, history: int) -> None:
        self.journal = journal
        self.ledger = ledger
        self.history = history
        self.stream_name = ""
        self.subject = ""
        # run id -> when it first changed since it was last stored (monotonic seconds)
        self._changed: dict[str, float] = {}
        self._lock = threading.Lock()
        self._task: asyncio.Task[Any] | None = None
        self.stored = 0
        self._read_cache: dict[str, tuple[float, RunRecord]] = {}  # run id -> (read at, record)
        # The cluster's runs, oldest first, once `kept_runs` was asked for (the follower).
        self._listed: collections.OrderedDict[str, RunRecord] | None = None
        self._follower: Follower | None = None
        # Told `(result)` of each record the follower reads (the inspector's live notices).
        self._listeners: list[Callable[[RunResult], None]] = []

    def start(self) -> None:
        import nats.js.api as api

        stream = self.journal.stream(
            STREAM_KIND,
            per_key=True,
            max_msgs_per_subject=1,
            max_msgs=self.history,
            discard=api.DiscardPolicy.OLD,  # a history: the oldest run goes
        )
        self.stream_name, self.subject = stream.name, stream.subject
        self.ledger.add_run_listener(self._run_ended)
        self.ledger.add_listener(self._send_final)
        self.journal._call(self._start_flushing(), timeout=10.0)

    def stop(self) -> None:
        """Stop listening, and store what changed since the last write."""
        self.ledger.remove_listener(self._run_ended)
        self.ledger.remove_listener(self._send_final)
        try:
            self.journal._call(self._stop_flushing(), timeout=10.0)
        except Exception as error:
            logger.warning("cluster: the last run records were not stored: %s", error)
        follower, self._follower = self._follower, None
        stop_following(self.journal, follower)

    # -- marking (any thread, on the hot path: a set add) ----------------------------------

    def _run_ended(self, result: Any) -> None:
        with self._lock:
            self._changed.setdefault(result.run_id, time.monotonic())

    def _send_final(self, send: Send) -> None:
        with self._lock:
            self._changed.setdefault(send.run_id, time.monotonic())

    # -- storing (the journal's loop) -----------------------------------------------------

    async def _start_flushing(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _stop_flushing(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._flush()

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            try:
                await self._flush()
            except Exception as error:
                logger.warning("cluster: storing run records failed: %s", error)

    async def _flush(self) -> None:
        with self._lock:
            changed, self._changed = self._changed, {}
        now = time.monotonic()
        records, later = [], {}
        for run_id, since in changed.items():
            try:
                result = self.ledger.run(run_id)
                deliveries = self.ledger.deliveries(run_id)
            except KeyError:  # not ended yet (its end marks it again), or out of the history
                continue
            if now - since < SETTLE_GRACE and not all(record.final for record in deliveries):
                later[run_id] = since  # its sends are still on their way: store it once, later
                continue
            records.append((f"{self.subject}.{run_id}", encode_record(result, deliveries)))
        if later:
            with self._lock:
                for run_id, since in later.items():
                    self._changed[run_id] = min(since, self._changed.get(run_id, since))
        # Plain NATS publishes (the stream stores whatever comes on its subjects), not
        # JetStream's acknowledged ones: a record is a view, and the next change stores
        # it again, while awaiting an acknowledgement per run cost ~100 µs of a node's CPU.
        publish = self.journal._nc.publish
        for subject, data in records:
            await publish(subject, data)
        self.stored += len(records)

    # -- reading (any thread but the journal's loop) --------------------------------------

    def get(self, run_id: str, timeout: float = 5.0) -> RunRecord | None:
        """The record of run `run_id` from the cluster; None if there is none (or it is gone).

        A record read in the last `READ_CACHE_SECONDS` is answered again without a
        round trip: `GET /runs/{id}` asks for the result and then the deliveries, and
        both must come from the same version of the record.
        """
        if not self.stream_name or not run_id.isalnum():
            return None
        now = time.monotonic()
        with self._lock:
            cached = self._read_cache.get(run_id)
        if cached is not None and now - cached[0] < READ_CACHE_SECONDS:
            return cached[1]
        record = self.journal._call(self._get(run_id), timeout)
        if record is not None:
            with self._lock:
                if len(self._read_cache) >= READ_CACHE_SIZE:
                    self._read_cache.pop(next(iter(self._read_cache)))  # the oldest read
                self._read_cache[run_id] = (now, record)
        return record  # type: ignore[no-any-return]

    async def _get(self, run_id: str) -> RunRecord | None:
        import nats.js.errors

        try:
            message = await self.journal._js.get_last_msg(
                self.stream_name, f"{self.subject}.{run_id}", direct=True
            )
        except nats.js.errors.NotFoundError:
            return None
        return decode_record(message.data)

    # -- the list of every node's runs (the inspector) -------------------------------------

    def kept_runs(self) -> list[tuple[RunResult, list[Delivery]]]:
        """Every node's recent runs, newest first, as `(result, deliveries)` (blocking the
        first time: the stream is read to its end)."""
        self._follow()
        with self._lock:
            assert self._listed is not None
            kept = [(record.result, record.deliveries) for record in self._listed.values()]
        kept.reverse()
        return kept

    def add_listener(self, listener: Callable[[RunResult], None]) -> None:
        """Call `listener(result)` for each record any node stores from now on (on the
        journal's loop: keep it cheap). Blocking the first time, like `kept_runs`."""
        self._follow()
        with self._lock:
            self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: Callable[[RunResult], None]) -> None:
        with self._lock:
            self._listeners = [item for item in self._listeners if item != listener]

    def _follow(self) -> None:
        """Start reading the stream (to its end, then live) unless it is read already."""
        follower = None
        if self._listed is None:
            with self._lock:
                if self._listed is None:
                    self._listed = collections.OrderedDict()
                    follower = self._follower = Follower(
                        self.journal._js, self.stream_name, f"{self.subject}.>", self._listed_one
                    )
        if follower is not None:  # the first to ask: read the stream to its end
            self.journal._call(follower.start(), timeout=60.0)

    def _listed_one(self, seq: int, subject: str, data: bytes) -> None:
        record = decode_record(data)
        listed = self._listed
        assert listed is not None
        with self._lock:
            listed[record.result.run_id] = record  # a new version keeps the run's place
            while len(listed) > self.history:
                listed.popitem(last=False)
        for listener in self._listeners:
            listener(record.result)

    def state(self) -> dict[str, Any]:
        return {"run_records_stored": self.stored}
