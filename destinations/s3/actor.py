"""The S3 destination: batches of `ctx.send.s3` payloads uploaded as gzip NDJSON objects.

Owns `S3Destination` (the batcher actor for S3: one buffer per bucket and
normalized prefix), `S3Uploader` (the `minio` client and the few threads its
blocking calls run on) and the dead-letter form of S3 batches (the exact `.gz`
objects under `<data_dir>/dead-letter/s3/<bucket>/<key>`). A batch is encoded
once (`batch.prepared`), so every retry uploads the same bytes under the same
content-addressed key: an ambiguous failure cannot leave a duplicate object.
Uses only S3 calls MinIO and AWS share (PutObject, multipart upload,
CreateBucket). The object format is in `s3/objects.py`; batching,
triggers, retries and memory accounting in `destinations.batching`.
Must not import `runtime`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import io
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import certifi
import trio
import urllib3
from minio import Minio
from minio.error import S3Error

from outbound.actors import LoopResult
from outbound.actors.loops import LoopThread
from outbound.destinations.base import Services
from outbound.destinations.batching import (
    Batch,
    BatchingDestination,
    BatchWritten,
    PermanentBatchError,
)
from outbound.destinations.deadletter import dead_letter_dir, private_dir, write_private_file
from outbound.destinations.delivery import Outgoing
from outbound.destinations.s3.objects import S3Object, encode_object, normalize_prefix

if TYPE_CHECKING:
    from outbound.config import Config

logger = logging.getLogger(__name__)

PART_SIZE = 5 * 1024 * 1024  # S3's smallest multipart part: larger objects go multipart
UPLOAD_THREADS = 4  # uploads (and their gzip encoding) in progress at once
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0


def minio_client(config: Config, pool_size: int = UPLOAD_THREADS) -> tuple[Minio, str]:
    """A `Minio` client for `config.s3_endpoint` (`host:port` or a URL) and its display URL.

    The client retries a request at most once itself: the batcher's backoff
    does the real retrying, and a store that is down must fail fast.
    """
    endpoint = (config.s3_endpoint or "").strip()
    secure = bool(config.s3_secure)
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"OUTBOUND_S3_ENDPOINT={endpoint!r} must be host:port or http(s)://")
        if parts.path.strip("/") or parts.query:
            raise ValueError(f"OUTBOUND_S3_ENDPOINT={endpoint!r} must not have a path or query")
        secure = parts.scheme == "https"
        endpoint = parts.netloc
    if not endpoint:
        raise ValueError("OUTBOUND_S3_ENDPOINT is empty")
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT),
        maxsize=pool_size,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=1, backoff_factor=0.1, status_forcelist=[502, 503, 504]),
    )
    client = Minio(
        endpoint,
        access_key=config.s3_access_key or None,
        secret_key=config.s3_secret_key or None,
        secure=secure,
        region=config.s3_region or None,
        http_client=http,
    )
    return client, f"{'https' if secure else 'http'}://{endpoint}"


async def _in_thread(executor: concurrent.futures.Executor, fn: Callable[[], Any]) -> Any:
    """Run blocking `fn` on `executor` and await it from trio without blocking the loop."""
    future = executor.submit(fn)
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: concurrent.futures.Future[Any]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    await done.wait()
    return future.result()


class S3Uploader:
    """Encodes and uploads batches on its own threads; owns the minio client."""

    def __init__(self, config: Config) -> None:
        self.client, self.endpoint = minio_client(config)
        self.create_buckets = bool(config.s3_create_buckets)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            UPLOAD_THREADS, thread_name_prefix="outbound-s3-upload"
        )
        self._create_lock = threading.Lock()

    async def write(self, batch: Batch) -> BatchWritten:
        return await _in_thread(self._executor, functools.partial(self._write, batch))

    def _write(self, batch: Batch) -> BatchWritten:
        s3_object: S3Object | None = batch.prepared
        if s3_object is None:
            s3_object = batch.prepared = prepare(batch)
        self.put(s3_object)
        return BatchWritten(
            detail={
                "bucket": s3_object.bucket,
                "key": s3_object.key,
                "object_bytes": len(s3_object.data),
                "object_events": s3_object.events,
            }
        )

    def put(self, s3_object: S3Object) -> None:
        """Upload one object (multipart above `PART_SIZE`); create its bucket if allowed.

        A bucket is created whenever an upload finds it missing, not only the
        first time: one deleted while the runtime runs comes back. Without
        `create_buckets`, a missing bucket fails the batch for good. A request
        the client refuses to make (its argument checks raise ValueError) is
        final too: retrying the same object cannot change the answer.
        """
        try:
            try:
                self._put(s3_object)
            except S3Error as error:
                if error.code != "NoSuchBucket":
                    raise
                if not self.create_buckets:
                    raise PermanentBatchError(
                        f"bucket {s3_object.bucket!r} does not exist at {self.endpoint} "
                        "(create it, or set OUTBOUND_S3_CREATE_BUCKETS=1)"
                    ) from None
                self._create_bucket(s3_object.bucket)
                self._put(s3_object)
        except ValueError as error:
            raise PermanentBatchError(
                f"the S3 client refuses to upload {s3_object.bucket!r}/{s3_object.key!r}: {error}"
            ) from None

    def _put(self, s3_object: S3Object) -> None:
        self.client.put_object(
            s3_object.bucket,
            s3_object.key,
            io.BytesIO(s3_object.data),
            len(s3_object.data),
            content_type="application/gzip",
            part_size=PART_SIZE,
            num_parallel_uploads=1,  # parallelism is across batches, on our threads
        )

    def _create_bucket(self, bucket: str) -> None:
        # Serialized: uploads that find the bucket missing together create it once
        # (the others are told it is already theirs).
        with self._create_lock:
            try:
                self.client.make_bucket(bucket)
            except S3Error as error:
                if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
                return
            logger.info("created S3 bucket %r at %s", bucket, self.endpoint)

    def close(self) -> None:
        """Stop taking uploads; one still in progress (a hung store) is abandoned, not awaited."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.client._http.clear()  # minio keeps its urllib3 pool private


def prepare(batch: Batch) -> S3Object:
    """Encode a batch's payloads as its object, keyed by the time of this call (UTC)."""
    bucket, prefix = batch.key  # type: ignore[misc]
    return encode_object(bucket, prefix, (send.payload[2] for send in batch.sends))


class S3Destination(BatchingDestination):
    """Batches `(bucket, prefix, json_line)` sends per bucket and prefix; uploads with minio."""

    name = "s3"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        if "uploader" not in self.durable:  # a restarted actor keeps its client and threads
            self.durable["uploader"] = S3Uploader(services.config)

    @property
    def uploader(self) -> S3Uploader:
        return self.durable["uploader"]

    def batch_key(self, send: Outgoing) -> Hashable:
        bucket, prefix, _line = send.payload
        return (bucket, normalize_prefix(prefix))

    @property
    def loop(self) -> LoopThread:
        return self.services.trio

    def write_batch(self, batch: Batch) -> Callable[[], Awaitable[BatchWritten]]:
        return functools.partial(self.uploader.write, batch)

    def on_loop_result(self, result: LoopResult) -> None:
        # A failed upload's records still name the object it is meant to become.
        batch = self.sealed.get(result.tag)
        s3_object = batch.prepared if batch is not None else None
        if result.error is not None and s3_object is not None:
            for send in batch.sends:  # type: ignore[union-attr]
                send.detail.update(bucket=s3_object.bucket, key=s3_object.key)
        super().on_loop_result(result)

    @staticmethod
    def dead_letter_fields(send: Outgoing) -> dict[str, Any]:
        bucket, prefix, line = send.payload
        return {"bucket": bucket, "prefix": prefix, "payload": json.loads(line)}

    def dead_letter_batches(self, batches: list[Batch], data_dir: Path, reason: str) -> str:
        """Write each batch as its exact `.gz` object under `dead-letter/s3/<bucket>/<key>`."""
        root = dead_letter_dir(data_dir) / "s3"
        events = 0
        for batch in batches:
            s3_object: S3Object | None = batch.prepared
            if s3_object is None:
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
        uploader = self.durable.pop("uploader", None)
        if uploader is not None:
            uploader.close()


def write_object_file(root: Path, s3_object: S3Object) -> Path:
    """Write the object's bytes to `root/<bucket>/<key>` durably, readable by its owner only."""
    path = root / s3_object.bucket / s3_object.key
    private_dir(path.parent, root.parent)  # from dead-letter/ down: 0700
    write_private_file(path, s3_object.data)
    return path
