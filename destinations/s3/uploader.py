"""The S3 uploader: the `minio` client and the few threads its blocking calls run on.

Owns `minio_client` (a client for `s3_endpoint`, `host:port` or a URL),
`prepare` (a batch's lines as its object, encoded once) and `S3Uploader`,
which puts one batch's object (single PUT or multipart) and,
with `s3_create_buckets`, creates a missing bucket. With a journal, an
object's manifest is stored (`manifests.py`) before its first upload, and an
object whose manifest is already stored is asked for (HEAD) before it is
uploaded again: what a crash interrupted is written once. Uses only S3 calls MinIO
and AWS share (PutObject, multipart upload, CreateBucket). The actor
(`actor.py`) decides what a batch is and when it goes. Must not import the
runtime or another destination.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import certifi
import trio
import urllib3
from minio import Minio
from minio.error import S3Error

from outbound.destinations.batching import Batch, BatchWritten, PermanentBatchError
from outbound.destinations.journaling import JournalPort
from outbound.destinations.s3.manifests import ManifestStore
from outbound.destinations.s3.objects import S3Object, encode_object
from outbound.destinations.s3.settings import S3Settings

logger = logging.getLogger(__name__)

PART_SIZE = 5 * 1024 * 1024  # S3's smallest multipart part: larger objects go multipart
UPLOAD_THREADS = 4  # uploads (and their gzip encoding) in progress at once
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0


def minio_client(config: S3Settings, pool_size: int = UPLOAD_THREADS) -> tuple[Minio, str]:
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


def prepare(batch: Batch) -> S3Object:
    """Encode a batch's payloads as its object, keyed by the time of this call (UTC)."""
    bucket, prefix = batch.key  # type: ignore[misc]
    return encode_object(bucket, prefix, [send.payload.line for send in batch.sends])


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


class ObjectNotUploaded(Exception):
    """A manifest's object whose lines are not all recovered is not in S3: its sends that
    are left go into new batches (the others were final without it)."""


class S3Uploader:
    """Encodes and uploads batches on its own threads; owns the minio client."""

    def __init__(self, config: S3Settings, journal: JournalPort | None = None) -> None:
        self.client, self.endpoint = minio_client(config)
        self.create_buckets = bool(config.s3_create_buckets)
        self.manifests = ManifestStore(journal) if journal is not None else None
        self.upload_pause = float(config.s3_upload_pause or 0.0)  # a testing aid
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
        if s3_object.manifested:
            # A crash (of this actor or of the process) may have come after the upload.
            size = self.stored_size(s3_object)
            if size is not None:
                return written(s3_object, size)
            if not s3_object.complete:
                raise ObjectNotUploaded(f"{s3_object.bucket}/{s3_object.key} is not in S3")
        elif self.manifests is not None:
            # Before the first upload: after a crash, recovery rebuilds this very
            # object from the journal, so its sends are never batched again.
            seqs = self.manifests.store(s3_object.bucket, s3_object.key, batch.sends)
            s3_object = batch.prepared = dataclasses.replace(
                s3_object, manifested=True, manifest_seqs=seqs
            )
        self._pause("before uploading", s3_object)
        self.put(s3_object)
        self._pause("after uploading", s3_object)
        return written(s3_object)

    def _pause(self, when: str, s3_object: S3Object) -> None:
        """`OUTBOUND_S3_UPLOAD_PAUSE` (a testing aid): say where, then wait."""
        if self.upload_pause > 0:
            logger.warning(
                "OUTBOUND_S3_UPLOAD_PAUSE: %.2f s %s %s/%s",
                self.upload_pause,
                when,
                s3_object.bucket,
                s3_object.key,
            )
            time.sleep(self.upload_pause)

    def stored_size(self, s3_object: S3Object) -> int | None:
        """The object's size in S3 (HEAD), None if it is not there; other errors propagate."""
        try:
            stat = self.client.stat_object(s3_object.bucket, s3_object.key)
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"):
                return None
            raise
        return int(stat.size or 0)

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


def written(s3_object: S3Object, size: int | None = None) -> BatchWritten:
    """What the sends of an object in S3 are settled with (`size`: as S3 reported it)."""
    return BatchWritten(
        detail={
            "bucket": s3_object.bucket,
            "key": s3_object.key,
            "object_bytes": len(s3_object.data) if size is None else size,
            "object_events": s3_object.events,
        }
    )
