"""The S3 destination: batches of `ctx.send.s3` payloads uploaded as gzip NDJSON objects.

Owns `S3Destination` (the batcher actor for S3: one buffer per bucket and
normalized prefix) and the dead-letter form of S3 batches (the exact `.gz`
objects under `<data_dir>/dead-letter/s3/<bucket>/<key>`). A batch is encoded
once (`batch.prepared`), so every retry uploads the same bytes under the same
content-addressed key: an ambiguous failure cannot leave a duplicate object.
The uploads are `uploader.py`'s, the object format `objects.py`'s; batching,
triggers, retries and memory accounting the core's (`destinations/batching.py`).
With a journal, recovery hands this actor the sends of interrupted objects in
`Rebuild` messages (`manifests.py`): each becomes a sealed batch of its own
whose object is the manifest's, so they are written once.
Must not import the runtime or another destination.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any

import pykka

from outbound.actors import LoopResult
from outbound.actors.loops import LoopThread
from outbound.destinations.base import Services
from outbound.destinations.batching import (
    Batch,
    BatchingDestination,
    BatchWritten,
)
from outbound.destinations.deadletter import dead_letter_dir, private_dir, write_private_file
from outbound.destinations.delivery import OPEN, Send
from outbound.destinations.journaling import JournalPort
from outbound.destinations.s3.manifests import ManifestSweeper, Rebuild, claim_recovered
from outbound.destinations.s3.objects import S3Object, normalize_prefix, rebuild_object
from outbound.destinations.s3.send import S3Line
from outbound.destinations.s3.settings import S3Settings
from outbound.destinations.s3.uploader import ObjectNotUploaded, S3Uploader, prepare

logger = logging.getLogger(__name__)

SWEEP_EVERY = 1.0  # seconds between two looks at the manifests of final objects


class S3Destination(BatchingDestination):
    """Batches `S3Line` sends per bucket and prefix; uploads with minio."""

    name = "s3"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        # A resource, not work: each incarnation makes its own client and threads
        # (its sealed batches, in `self.work`, are uploaded again by the next one).
        self.uploader = S3Uploader(services.config, services.journal)
        manifests = self.uploader.manifests
        self.sweeper = ManifestSweeper(manifests) if manifests is not None else None
        self._sweep_timer: Any = None

    def batch_key(self, send: Send) -> Hashable:
        line: S3Line = send.payload
        return (line.bucket, normalize_prefix(line.prefix))

    @property
    def loop(self) -> LoopThread:
        return self.services.trio

    def write_batch(self, batch: Batch) -> Callable[[], Awaitable[BatchWritten]]:
        return functools.partial(self.uploader.write, batch)

    @staticmethod
    def claim_recovered(journal: JournalPort, sends: list[Send]) -> list[Rebuild]:
        """At start, on the runtime's thread: the recovered sends that upload manifests name,
        as `Rebuild` messages for this actor (they must never be batched again)."""
        return claim_recovered(journal, sends)

    def recover(self) -> None:
        super().recover()
        if self.sweeper is not None:
            self._sweep_timer = self.services.timers.every(
                SWEEP_EVERY, self.stable_ref, _SweepManifests()
            )

    def handle(self, message: Any) -> Any:
        if isinstance(message, Rebuild):
            return self.rebuild(message)
        if isinstance(message, _SweepManifests):
            if self.sweeper is not None:
                self.sweeper.sweep(time.monotonic())
            return None
        return super().handle(message)

    def rebuild(self, message: Rebuild) -> None:
        """Write the recovered sends of one manifest as its object, once.

        A sealed batch of their own, whose prepared object is the manifest's:
        rebuilt from their lines when they are all here (the same bytes under
        the same key), else only a name to ask S3 for. Either way the upload
        asks S3 first (`S3Uploader._write`), so an object uploaded before the
        crash settles its sends without a second copy.
        """
        manifest = message.manifest
        sends = [send for send in message.sends if send.outcome.status in OPEN]
        if not sends:
            return
        unfinished = self.unfinished
        for send in sends:
            unfinished[send.id] = send
        line: S3Line = sends[0].payload
        s3_object: S3Object | None = None
        if message.complete and len(sends) == len(message.sends):
            s3_object = rebuild_object(
                manifest.bucket, manifest.key, [s.payload.line for s in sends]
            )
            if s3_object is None:
                logger.error(
                    "s3: the recovered lines of %s/%s do not make its bytes again; "
                    "writing them only if the object is not in S3",
                    manifest.bucket,
                    manifest.key,
                )
        if s3_object is None:
            s3_object = S3Object(
                manifest.bucket,
                manifest.key,
                b"",
                len(manifest.ids),
                manifested=True,
                complete=False,
            )
        s3_object = dataclasses.replace(s3_object, manifest_seqs=message.seqs)
        batch = Batch((line.bucket, normalize_prefix(line.prefix)), sends)
        batch.nbytes = sum(send.size for send in sends)
        batch.prepared = s3_object
        self.sealed[batch.id] = batch
        self._write(batch)

    def on_loop_result(self, result: LoopResult) -> None:
        batch = self.sealed.get(result.tag)
        s3_object: S3Object | None = batch.prepared if batch is not None else None
        # Settling lets go of the sends' journal entries: the sweeper needs them first.
        entries = [send.outcome.entry for send in batch.sends] if s3_object is not None else []
        if batch is not None and isinstance(result.error, ObjectNotUploaded):
            # Its other sends were final without it (failed): those left make a new
            # object now (a flush may have come already: they do not wait for one).
            self._manifest_done(s3_object, entries)
            batch.writing = False
            batch.prepared = None
            self._write(batch)
            return
        # A failed upload's records still name the object it is meant to become.
        if result.error is not None and s3_object is not None:
            for send in batch.sends:  # type: ignore[union-attr]
                send.detail.update(bucket=s3_object.bucket, key=s3_object.key)
        super().on_loop_result(result)
        if batch is not None and batch.id not in self.sealed:  # final: written or failed
            self._manifest_done(s3_object, entries)

    def _manifest_done(self, s3_object: S3Object | None, entries: list[Any]) -> None:
        """The object's manifest is no longer needed once its sends' entries are gone."""
        if self.sweeper is not None and s3_object is not None:
            self.sweeper.settled(s3_object.manifest_seqs, entries)

    @staticmethod
    def dead_letter_fields(send: Send) -> dict[str, Any]:
        line: S3Line = send.payload
        return {"bucket": line.bucket, "prefix": line.prefix, "payload": json.loads(line.line)}

    def dead_letter_batches(self, batches: list[Batch], data_dir: Path, reason: str) -> str:
        """Write each batch as its exact `.gz` object under `dead-letter/s3/<bucket>/<key>`."""
        root = dead_letter_dir(data_dir) / "s3"
        events = 0
        for batch in batches:
            s3_object: S3Object | None = batch.prepared
            if s3_object is None or not s3_object.complete:
                s3_object = batch.prepared = prepare(batch)
            path = write_object_file(root, s3_object)
            events += s3_object.events
            for send in batch.sends:
                send.detail.update(
                    bucket=s3_object.bucket, key=s3_object.key, dead_letter_object=str(path)
                )
        logger.warning(
            "%s: wrote %d undelivered S3 objects (%d events) under %s",
            reason,
            len(batches),
            events,
            root,
        )
        return str(root)

    def on_stop(self) -> None:
        super().on_stop()
        self._cancel_sweeps()
        self.uploader.close()

    def _cancel_sweeps(self) -> None:
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()

    def on_crash(self, error: BaseException | None) -> None:
        self._cancel_sweeps()  # the next incarnation starts its own (its manifests stay)
        # Uploads not started are cancelled (their batches fail and are retried by
        # the next incarnation, which has its own uploader); one started finishes.
        self.uploader.close()
        super().on_crash(error)


@dataclasses.dataclass(frozen=True, slots=True)
class _SweepManifests:
    """Timer message: delete the manifests whose sends' journal entries are gone."""


def write_object_file(root: Path, s3_object: S3Object) -> Path:
    """Write the object's bytes to `root/<bucket>/<key>` durably, readable by its owner only."""
    path = root / s3_object.bucket / s3_object.key
    private_dir(path.parent, root.parent)  # from dead-letter/ down: 0700
    write_private_file(path, s3_object.data)
    return path


def starter(config: S3Settings, **parts: Any) -> Callable[[Services], pykka.ActorRef[Any]]:
    """What starts the S3 actor with the services of a runtime start (it needs no parts)."""
    return S3Destination.start
