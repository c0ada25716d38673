"""The journal: sends and events kept in NATS JetStream until they are final.

Owns `Journal`, the runtime's one JetStream client, on an asyncio loop thread
of its own (never the user's, never a destination's): it connects (starting
the embedded nats-server for `OUTBOUND_JOURNAL=local`), makes the two streams
(`<CLUSTER>_SENDS`, `<CLUSTER>_EVENTS`), appends entries, acknowledges them,
and reads back what an earlier process left (`recover`).

How an entry lives (README: Durability):
- `append(encode(sends), then)`: the sends of one or more finished runs become one
  message (split when larger than the server's `max_payload`), published with
  a `Nats-Msg-Id` so that a publish retried after a lost answer is stored
  once. Publishes never give up: while the server is unreachable they are
  tried again (and runs wait, which is backpressure); `then()` runs once the
  server stored every part, and only then are the sends handed to their
  destinations and the runs reported finished.
- The entry is acknowledged when its last send is final: the settle path
  (`destinations.delivery._settle`) counts down `SendsEntry.open`, and the
  acknowledger deletes the message by sequence number. This node never
  reads back (or decodes) what it published itself: deletes are cheap
  requests, batched and sent concurrently.
- At start, `recover()` reads every message still in the streams (left by a
  process that was killed, or by a stop that timed out): at once, not after an
  ack wait, since nothing waits on a consumer's redelivery.

Must not import the runtime facade; knows sends only through the codec.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pickle
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outbound.actors.ids import new_id
from outbound.actors.loops import AsyncioLoop
from outbound.admission import Busy
from outbound.destinations.delivery import Send
from outbound.destinations.journaling import StreamRef
from outbound.journal.cluster import Cluster
from outbound.journal.codec import (
    JournaledEvent,
    JournalFormatError,
    decode_event,
    decode_sends,
    encode_event,
    encode_sends,
)
from outbound.journal.entries import EventEntry, SendsEntry, attach
from outbound.journal.retries import RetryRecords
from outbound.journal.settings import JournalSettings, default_node_id, journal_mode
from outbound.journal.subjects import subject_token
from outbound.journal.writes import BackgroundStores, Deletes, Purge

logger = logging.getLogger(__name__)

#: Seconds one publish waits for the server's answer before it is sent again.
PUBLISH_ATTEMPT_TIMEOUT = 5.0
#: Room a message keeps under the server's max_payload for headers and framing.
MESSAGE_HEADROOM = 16 * 1024
#: Messages fetched at once when reading back what a killed process left.
RECOVER_BATCH = 1024


#: The limits of a journal stream that come from settings (`_warn_of_changed_limits`).
_LIMIT_FIELDS = ("max_msgs", "max_msgs_per_subject", "max_age", "num_replicas")


class JournalUnavailable(Busy):
    """The journal did not store an event within `OUTBOUND_JOURNAL_WAIT` s (a 503 for the API)."""


class JournalError(RuntimeError):
    """The journal cannot be used as configured (a clear message says what to change)."""


@dataclass(frozen=True, slots=True)
class Recovered:
    """What an earlier process left in the journal: open entries and events not yet run."""

    entries: list[SendsEntry]
    events: list[tuple[EventEntry, JournaledEvent]]

    @property
    def sends(self) -> int:
        return sum(len(entry.sends) for entry in self.entries)


@dataclass(frozen=True, slots=True)
class JournalStream:
    """A stream of the journal (`Journal.stream`): its name and subject (prefix)."""

    name: str
    subject: str
    per_key: bool = False

    def key_subject(self, key: str) -> str:
        """The subject of one key (`per_key` streams); keys must be NATS-token safe."""
        return f"{self.subject}.{key}"


@dataclass(frozen=True, slots=True)
class Encoded:
    """Sends made into journal messages: (sends, bytes) per message, and those that fit in
    none (a custom payload larger than the server's max_payload: the caller fails them)."""

    parts: list[tuple[list[Send], bytes]]
    too_large: list[Send]


class Journal:
    """One runtime's JetStream journal; `open()` at start, `close()` at stop."""

    def __init__(self, settings: JournalSettings, data_dir: Path, max_send_bytes: int) -> None:
        self.settings = settings
        self.mode = journal_mode(settings.journal)
        self.data_dir = data_dir
        self.max_send_bytes = max_send_bytes
        prefix = settings.cluster
        #: A cluster (`nats://`): nodes share events and take over a dead node's sends.
        self.clustered = self.mode == "nats"
        self.node_id = settings.node_id or default_node_id()
        self.node_token = subject_token(self.node_id)
        self.sends_stream = f"{prefix}_SENDS".upper().replace("-", "_")
        self.events_stream = f"{prefix}_EVENTS".upper().replace("-", "_")
        # Each node journals its sends under a subject of its own, so that the
        # others can find (and take over) what a dead node left.
        self.sends_subjects = f"{prefix}.sends.>"
        self.sends_subject = f"{prefix}.sends.{self.node_token}"
        self.events_subject = f"{prefix}.events"
        self.server: Any = None  # the EmbeddedNats of `local`
        self.cluster: Cluster | None = None  # started by the runtime once it runs (nats://)
        self._loop = AsyncioLoop(name="journal")
        self._nc: Any = None
        self._js: Any = None
        self._max_message = 0
        self._closing = False
        self._open_entries: dict[int, SendsEntry] = {}  # by seq, until acknowledged
        self._entries_lock = threading.Lock()
        self._deletes = Deletes(self._loop, self._request)  # acknowledgements
        self._stores = BackgroundStores(self._loop, self._publish, self._request)
        self._appending = 0  # publishes not yet stored
        self._outage_logged = False
        # Retry records (`journal.retries`): made at open, stored through `store_soon`.
        self.retries: RetryRecords | None = None
        # subject -> latest data not yet stored, or the stream to purge the subject from

    # -- lifecycle ----------------------------------------------------------------------

    def open(self) -> None:
        """Start the embedded server (local), connect, make the streams; JournalError if not."""
        self._closing = False
        if self.mode == "local":
            from outbound.journal.server import EmbeddedNats, ServerOptions

            self.server = EmbeddedNats(
                ServerOptions(
                    store_dir=self.data_dir / "journal",
                    sync=self.settings.journal_sync,
                    max_payload=max(8 * 1024 * 1024, 2 * self.max_send_bytes + MESSAGE_HEADROOM),
                )
            )
            self.server.start()
        self._loop.start()
        try:
            self._call(self._connect(), timeout=max(30.0, self.settings.journal_wait))
            self.retries = RetryRecords(self, getattr(self.settings, "retry_for", 86_400.0))
        except BaseException:
            self._loop.stop()
            if self.server is not None:
                self.server.stop()
            raise

    async def _connect(self) -> None:
        import nats

        options: dict[str, Any] = {
            "name": self.node_id,
            "max_reconnect_attempts": -1,  # the journal is not optional once chosen
            "reconnect_time_wait": 0.25,
            "connect_timeout": 5,
            "allow_reconnect": True,
            "pending_size": 64 * 1024 * 1024,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if self.server is not None:
            servers = [self.server.url]
            options["token"] = self.server.token
        else:
            servers = [url.strip() for url in self.settings.journal.split(",")]
            if self.settings.journal_creds:
                options["user_credentials"] = self.settings.journal_creds
            tls = self._tls_context()
            if tls is not None:
                options["tls"] = tls
        try:
            self._nc = await nats.connect(servers, **options)
        except Exception as error:
            where = "the embedded nats-server" if self.server is not None else "OUTBOUND_JOURNAL"
            raise JournalError(
                f"cannot connect to the journal ({where}): {type(error).__name__}: {error}"
            ) from None
        self._js = self._nc.jetstream(timeout=PUBLISH_ATTEMPT_TIMEOUT)
        max_payload = self._nc.max_payload
        if max_payload < self.max_send_bytes + MESSAGE_HEADROOM:
            raise JournalError(
                f"the NATS server's max_payload is {max_payload} bytes, smaller than one send "
                f"(OUTBOUND_MAX_PAYLOAD_BYTES={self.max_send_bytes}) with its envelope: raise "
                "max_payload in the server's configuration (8MB is common), or lower "
                "OUTBOUND_MAX_PAYLOAD_BYTES"
            )
        self._max_message = max_payload - MESSAGE_HEADROOM
        for name, subject in (
            (self.sends_stream, self.sends_subjects),
            (self.events_stream, self.events_subject),
        ):
            await self._ensure_stream(name, [subject])
        self._deletes.start()

    async def _ensure_stream(self, name: str, subjects: list[str], **extra: Any) -> None:
        import nats.js.api as api

        config = api.StreamConfig(
            name=name,
            subjects=subjects,
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.NEW,  # never drop what is stored to make room
            max_msg_size=-1,
            duplicate_window=120.0,
            allow_direct=True,
            num_replicas=self.settings.journal_replicas,
        )
        for key, value in extra.items():  # a part's own limits (max_age, discard, ...)
            setattr(config, key, value)
        try:
            await self._js.add_stream(config)
        except Exception as error:
            if "already in use" not in str(error):
                raise JournalError(f"cannot make journal stream {name}: {error}") from None
            await self._warn_of_changed_limits(name, config)
            await self._js.update_stream(config)

    async def _warn_of_changed_limits(self, name: str, config: Any) -> None:
        """Say so when this node's settings change a stream another node made: nodes of a
        cluster must share them (`OUTBOUND_SSE_HISTORY`, `OUTBOUND_RUN_HISTORY`, ...), or
        the last node started decides for all."""
        try:
            current = (await self._js.stream_info(name)).config
        except Exception:  # only a warning: the update below says what is wrong, if anything
            return
        changed = [
            f"{field} {getattr(current, field)} -> {getattr(config, field)}"
            for field in _LIMIT_FIELDS
            if getattr(config, field, None) is not None
            and getattr(current, field, None) not in (None, getattr(config, field))
        ]
        if not changed:
            return
        if self.clustered:
            advice = "replace them for every node; give every node of the cluster the same settings"
        else:
            advice = "replace them (settings changed since the journal was made)"
        logger.warning(
            "journal: stream %s was made with other limits (%s): this node's settings %s",
            name,
            ", ".join(changed),
            advice,
        )

    def _tls_context(self) -> ssl.SSLContext | None:
        settings = self.settings
        if not (settings.journal_tls_ca or settings.journal_tls_cert):
            return None
        context = ssl.create_default_context(cafile=settings.journal_tls_ca)
        if settings.journal_tls_cert:
            context.load_cert_chain(settings.journal_tls_cert, settings.journal_tls_key)
        return context

    def close(self, timeout: float = 5.0) -> None:
        """Send the acknowledgements still due, then disconnect and stop the embedded server.

        Appends still waiting for an unreachable server are abandoned: their
        `then(error)` is called, so their runs learn their sends were not journaled.
        """
        if self._nc is not None:
            try:  # retry records of sends left in backoff: what the next start resumes
                self._call(self._stores.drain(), timeout=timeout)
            except Exception as error:
                logger.warning("journal: retry records not stored before close: %s", error)
        self.stop_cluster()
        self._closing = True
        if self._nc is not None:
            try:
                self._call(self._deletes.drain(), timeout=timeout)
            except Exception as error:
                logger.warning("journal: acknowledgements not sent before close: %s", error)
            try:
                self._call(self._nc.close(), timeout=timeout)
            except Exception as error:
                logger.warning("journal: closing the connection failed: %s", error)
        self._loop.stop()
        self._nc = self._js = None
        with self._entries_lock:
            self._open_entries.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None

    def start_cluster(
        self,
        on_event: Callable[[Any, JournaledEvent], None],
        on_taken_over: Callable[[list[SendsEntry]], None],
        room: Callable[[], int],
    ) -> None:
        """Join the cluster (nats:// only): liveness, shared events, takeover (`cluster`)."""
        if self.clustered and self.cluster is None:
            self.cluster = Cluster(self, on_event, on_taken_over, room)
            self.cluster.start()

    def stop_cluster(self) -> None:
        """Stop taking events and sends from the cluster (a stop begins)."""
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            cluster.stop()

    def _call(self, coroutine: Any, timeout: float | None) -> Any:
        loop = self._loop.loop
        assert loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    # -- streams of other parts (manifests, retries, dead letters) ------------------

    def stream(self, kind: str, per_key: bool = False, **extra: Any) -> JournalStream:
        """Make (or find) the stream `<CLUSTER>_<KIND>` for another part of the runtime.

        Its subject is `<cluster>.<kind>`, or `<cluster>.<kind>.<key>` for every key
        with `per_key` (e.g. one subject per delivery id, with
        `max_msgs_per_subject=1` in `extra` to keep only the latest). `extra`:
        more `nats.js.api.StreamConfig` fields (`max_age`, ...). Blocking.
        """
        name = f"{self.settings.cluster}_{kind}".upper().replace("-", "_")
        subject = f"{self.settings.cluster}.{kind.lower()}"
        subjects = [f"{subject}.>"] if per_key else [subject]
        self._call(self._ensure_stream(name, subjects, **extra), timeout=30.0)
        return JournalStream(name, subject, per_key)

    def store(
        self,
        subject: str,
        data: bytes,
        timeout: float | None = None,
        what: str = "a message",
        msg_id: str | None = None,
    ) -> int:
        """Store one message now (blocking, tried again until stored); its sequence number.

        `JournalUnavailable` (naming `what`) after `timeout` s (default
        `OUTBOUND_JOURNAL_WAIT`).
        """
        timeout = self.settings.journal_wait if timeout is None else timeout
        loop = self._loop.loop
        assert loop is not None
        future = asyncio.run_coroutine_threadsafe(self._publish(subject, data, msg_id), loop)
        try:
            return int(future.result(timeout))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise JournalUnavailable(
                f"the journal did not store {what} (OUTBOUND_JOURNAL unreachable)", timeout
            ) from None

    @property
    def max_message_bytes(self) -> int:
        """The largest message `store` can hold (the server's max_payload, less headroom)."""
        return self._max_message

    def store_soon(self, subject: str, data: bytes) -> None:
        """Store one message without waiting (any thread; never blocks).

        Published on the journal's loop and tried again until stored, like an
        entry; while a message for `subject` waits, a newer one replaces it
        (for per-key streams that keep only the latest). Lost if the journal
        closes first.
        """
        self._stores.queue(subject, data)

    def purge_soon(self, stream: JournalStream | StreamRef, subject: str) -> None:
        """Delete every message of `subject` in `stream` without waiting (any thread).

        Ordered with `store_soon`: a purge queued after a store of the same
        subject replaces it, or runs after it if it is already on its way.
        """
        self._stores.queue(subject, Purge(stream.name))

    def read(self, stream: JournalStream, timeout: float = 120.0) -> list[tuple[int, bytes]]:
        """(seq, data) of every message in `stream` now, oldest first. Blocking."""
        pattern = f"{stream.subject}.>" if stream.per_key else stream.subject
        return self._call(self._read_all(stream.name, pattern), timeout)  # type: ignore[no-any-return]

    # -- appending --------------------------------------------------------------------

    def encode(self, sends: list[Send]) -> Encoded:
        """`sends` as journal messages (`append` them), and the sends too large for any."""
        parts, too_large = self._encode(sends)
        return Encoded(parts, too_large)

    def append(self, encoded: Encoded, then: Callable[[BaseException | None], None]) -> None:
        """Journal encoded sends; `then(None)` once every message is stored.

        Returns at once; `then` runs on the journal's loop thread (or
        `then(error)` if the journal closes first). The sends' outcomes point
        at their entries before this returns, so a settle can only come after
        the entry has its sequence number.
        """
        entries = []
        for part, _ in encoded.parts:
            entry = SendsEntry(self.sends_stream, part, self.acknowledge, self.retries)
            attach(entry, part)
            entries.append(entry)
        datas = [data for _, data in encoded.parts]
        with self._entries_lock:
            self._appending += 1
        loop = self._loop.loop
        try:
            assert loop is not None
            loop.call_soon_threadsafe(self._start_append, entries, datas, then)
        except (RuntimeError, AssertionError) as error:  # the loop is closed: we are stopping
            self._append_done(then, JournalError(f"the journal is closed: {error}"))

    def _encode(self, sends: list[Send]) -> tuple[list[tuple[list[Send], bytes]], list[Send]]:
        """Messages of at most `_max_message` bytes (halved until they fit), and the sends
        that fit in none."""
        data = encode_sends(sends)
        if len(data) <= self._max_message:
            return [(sends, data)], []
        if len(sends) == 1:
            return [], sends
        half = len(sends) // 2
        first, first_too_large = self._encode(sends[:half])
        second, second_too_large = self._encode(sends[half:])
        return first + second, first_too_large + second_too_large

    def _start_append(
        self, entries: list[SendsEntry], datas: list[bytes], then: Callable[..., None]
    ) -> None:
        self._loop.loop.create_task(self._append(entries, datas, then))  # type: ignore[union-attr]

    async def _append(
        self, entries: list[SendsEntry], datas: list[bytes], then: Callable[..., None]
    ) -> None:
        try:
            seqs = await asyncio.gather(
                *(self._publish(self.sends_subject, data) for data in datas)
            )
        except BaseException as error:  # closing (cancelled), or a bug of ours
            self._append_done(then, error)
            if not isinstance(error, Exception):
                raise
            return
        with self._entries_lock:
            for entry, seq in zip(entries, seqs, strict=True):
                entry.seq = seq
                self._open_entries[seq] = entry
        self._append_done(then, None)

    def _append_done(self, then: Callable[..., None], error: BaseException | None) -> None:
        with self._entries_lock:
            self._appending -= 1
        try:
            then(error)
        except Exception:
            logger.exception("journal: handing journaled sends on failed")

    async def _publish(self, subject: str, data: bytes, msg_id: str | None = None) -> int:
        """Store one message, trying again until the server answers; its sequence number.

        `msg_id`: what makes a publish of the same thing again (a redelivery) be stored
        once within the stream's duplicate window; by default, unique to this message.
        """
        headers = {"Nats-Msg-Id": msg_id or new_id()}  # a retry after a lost answer: once
        delay = 0.05
        while True:
            if self._closing:
                raise JournalError("the journal closed before this entry was stored")
            try:
                ack = await self._js.publish(
                    subject, data, timeout=PUBLISH_ATTEMPT_TIMEOUT, headers=headers
                )
            except Exception as error:
                if not self._outage_logged:
                    self._outage_logged = True
                    logger.warning(
                        "journal: cannot store an entry (%s: %s); trying again until it answers",
                        type(error).__name__,
                        error,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if self._outage_logged:
                self._outage_logged = False
                logger.warning("journal: storing entries again")
            return int(ack.seq)

    def append_event(
        self, event: JournaledEvent, timeout: float | None = None, once: bool = False
    ) -> EventEntry:
        """Journal one event before its run starts; `JournalUnavailable` after `timeout` s.

        `once`: the run id is stable (an emit's listener run): journaling it again
        within the duplicate window (a redelivered emit) stores it once.
        """
        try:
            data = encode_event(event)
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            raise TypeError(
                f"event: cannot be journaled ({error}); use plain values (dict, list, str, "
                "numbers, bool, None) or dataclasses"
            ) from None
        msg_id = event.run_id if once else None
        seq = self.store(self.events_subject, data, timeout, what="the event", msg_id=msg_id)
        return EventEntry(self.events_stream, seq, self.acknowledge)

    # -- acknowledging ------------------------------------------------------------------

    def acknowledge(self, stream: str, seq: int) -> None:
        """An entry is done with: delete it from its stream (soon, batched). Any thread."""
        if stream == self.sends_stream:
            with self._entries_lock:
                self._open_entries.pop(seq, None)
        self._deletes.add(stream, seq)

    async def _request(self, subject: str, data: bytes) -> Any:
        """A request on the journal's connection (the JetStream API), with the attempt timeout."""
        return await self._nc.request(subject, data, timeout=PUBLISH_ATTEMPT_TIMEOUT)

    # -- reading back -------------------------------------------------------------------

    def recover(self, timeout: float = 120.0) -> Recovered:
        """Every entry and event still in the journal (left by an earlier process), its
        sends with the attempts and next try recorded while they were in backoff."""
        recovered: Recovered = self._call(self._recover(), timeout)
        if self.retries is not None and recovered.entries:
            self.retries.apply(recovered.entries)
        return recovered

    async def _recover(self) -> Recovered:
        # Alone (`local`), everything left is ours, whatever node id wrote it (the
        # default one has the pid in it). In a cluster, this node's own subject
        # (a node restarted with the same OUTBOUND_NODE_ID); what other nodes
        # left is taken over once they are gone (`journal.cluster`), and events
        # come through the shared consumer.
        subject = self.sends_subject if self.clustered else self.sends_subjects
        entries = self.entries_from(await self._read_all(self.sends_stream, subject))
        events = []
        if not self.clustered:
            for seq, data in await self._read_all(self.events_stream, self.events_subject):
                try:
                    event = decode_event(data)
                except JournalFormatError as error:
                    logger.error("journal: event #%d cannot be read, kept: %s", seq, error)
                    continue
                events.append((EventEntry(self.events_stream, seq, self.acknowledge), event))
        return Recovered(entries, events)

    def entries_from(self, found: list[tuple[int, bytes]]) -> list[SendsEntry]:
        """Entries of sends read back (`_read_all`), held open until their sends are final.

        Entries this node holds already (taken over before) are left out; one that
        cannot be read stays in the journal, logged.
        """
        entries: list[SendsEntry] = []
        for seq, data in found:
            with self._entries_lock:
                if seq in self._open_entries:
                    continue
            try:
                sends = decode_sends(data)
            except JournalFormatError as error:
                logger.error("journal: sends #%d cannot be read, kept: %s", seq, error)
                continue
            entry = SendsEntry(self.sends_stream, sends, self.acknowledge, self.retries)
            entry.seq = seq
            attach(entry, sends)
            entries.append(entry)
        with self._entries_lock:
            self._open_entries.update((entry.seq, entry) for entry in entries)
        return entries

    async def _read_all(self, stream: str, subject: str) -> list[tuple[int, bytes]]:
        """(seq, data) of every message in `stream` now, oldest first (an ephemeral reader)."""
        import nats.errors
        import nats.js.api as api

        info = await self._js.stream_info(stream, subjects_filter=subject)
        last = info.state.last_seq
        # Messages under `subject` alone (the stream may hold other nodes' too).
        stored = sum((info.state.subjects or {}).values())
        if stored == 0:
            return []
        reader = await self._js.pull_subscribe(
            subject,
            stream=stream,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.NONE,
                deliver_policy=api.DeliverPolicy.ALL,
                inactive_threshold=60.0,
                mem_storage=True,
            ),
        )
        found: list[tuple[int, bytes]] = []
        try:
            while True:
                try:
                    messages = await reader.fetch(RECOVER_BATCH, timeout=1.0)
                except nats.errors.TimeoutError:
                    break
                for message in messages:
                    seq = message.metadata.sequence.stream
                    if seq <= last:
                        found.append((seq, message.data))
                if len(found) >= stored or (
                    messages and messages[-1].metadata.sequence.stream >= last
                ):
                    break
        finally:
            await reader.unsubscribe()
        return found

    # -- what is still open -----------------------------------------------------------

    def open_sends(self) -> list[Send]:
        """The sends of entries not yet acknowledged that are still open (stop leaves them)."""
        with self._entries_lock:
            entries = list(self._open_entries.values())
        return [send for entry in entries for send in entry.open_sends()]

    def state(self) -> dict[str, Any]:
        """What `rt.stats()["journal"]` and `rt.health()` show of the journal."""
        nc = self._nc
        with self._entries_lock:
            open_entries = len(self._open_entries)
        return {
            "mode": self.mode,
            "connected": bool(nc is not None and nc.is_connected),
            "storing": not self._outage_logged,  # False while stores keep failing
            "open_entries": open_entries,  # stored, not yet acknowledged
            "appending": self._appending,  # runs' sends waiting to be stored
            "server_restarts": self.server.restarts if self.server is not None else 0,
            "server_pid": self.server.pid if self.server is not None else None,  # local
            "node_id": self.node_id,
            **({"cluster": self.cluster.state()} if self.cluster is not None else {}),
        }

    # -- connection events (logged; never a secret) --------------------------------

    async def _on_error(self, error: Exception) -> None:
        if not self._closing:
            logger.warning("journal connection: %s: %s", type(error).__name__, error)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            logger.warning("journal: disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        logger.warning("journal: reconnected to NATS")
