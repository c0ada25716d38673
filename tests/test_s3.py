"""The S3 destination against a real S3-protocol server (moto) on loopback.

Objects are read back with boto3, an independent client, never with the code
under test.
"""

from __future__ import annotations

import base64
import collections
import gzip
import hashlib
import http.client
import json
import math
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import boto3
import botocore.config
import pytest
from waiting import wait_until

from outbound import Runtime, SendError
from outbound.embedded import ReceivedRequest, S3Server, SinkResponse

KEY = re.compile(
    r"^(?:(?P<prefix>.+)/)?(?P<y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/(?P<h>\d{2})/"
    r"(?P=y)-(?P=m)-(?P=d)-(?P=h)-(?P<min>\d{2})-(?P<s>\d{2})-(?P<id>[0-9a-f]{64})\.gz$"
)
MiB = 1024 * 1024


class Store:
    """What is in the S3 server, as boto3 sees it."""

    def __init__(self, server: S3Server) -> None:
        self.client = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
            region_name=server.region,
            config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2),
        )

    def new_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return sorted(keys)

    def read(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def lines(self, bucket: str, key: str) -> list[Any]:
        return [json.loads(line) for line in gzip.decompress(self.read(bucket, key)).splitlines()]

    def all_lines(self, bucket: str) -> list[Any]:
        return [line for key in self.keys(bucket) for line in self.lines(bucket, key)]

    def wait_keys(self, bucket: str, count: int, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            keys = self.keys(bucket)
            if len(keys) >= count or time.monotonic() > deadline:
                return keys
            time.sleep(0.05)


@pytest.fixture
def store(s3_server: S3Server) -> Iterator[Store]:
    store = Store(s3_server)
    yield store
    store.client.close()


@pytest.fixture
def s3_runtime(make_runtime: Callable[..., Runtime], s3_server: S3Server) -> Callable[..., Runtime]:
    """`s3_runtime(**config)`: a started runtime pointed at the S3 server, with a
    workflow `put` that sends `event["sends"]` (a list of s3 keyword dicts)."""

    def make(**overrides: Any) -> Runtime:
        rt = make_runtime(**{**s3_server.config(), **overrides})

        @rt.workflow("put")
        def put(event: dict[str, Any], ctx: Any) -> None:
            for send in event["sends"]:
                ctx.send.s3(**send)

        return rt

    return make


def sends(bucket: str, prefix: str, payloads: list[Any]) -> dict[str, Any]:
    return {"sends": [{"bucket": bucket, "prefix": prefix, "payload": p} for p in payloads]}


# -- object format ------------------------------------------------------------------


def test_object_key_gzip_lines_and_content_hash(
    s3_runtime: Callable[..., Runtime], store: Store
) -> None:
    rt = s3_runtime()
    bucket = store.new_bucket()
    payloads = [{"id": i, "name": f"order {i}", "tags": ["a", "ü"]} for i in range(25)]
    before = datetime.now(UTC).replace(microsecond=0)
    result = rt.run("put", sends(bucket, "orders/", payloads))
    assert rt.flush(timeout=10)
    after = datetime.now(UTC)

    [key] = store.keys(bucket)
    match = KEY.match(key)
    assert match, key
    assert match["prefix"] == "orders"
    stamp = datetime.strptime(key.rsplit("/", 1)[1][:19], "%Y-%m-%d-%H-%M-%S").replace(tzinfo=UTC)
    assert before <= stamp <= after
    data = store.read(bucket, key)
    assert data[:2] == b"\x1f\x8b"  # gzip magic
    assert match["id"] == hashlib.sha256(data).hexdigest()
    assert [json.loads(line) for line in gzip.decompress(data).splitlines()] == payloads

    records = rt.deliveries(result.run_id)
    assert [r.status for r in records] == ["delivered"] * len(payloads)
    assert {(r.detail["bucket"], r.detail["key"]) for r in records} == {(bucket, key)}


def test_prefixes_are_batched_separately_and_slashes_do_not_matter(
    s3_runtime: Callable[..., Runtime], store: Store
) -> None:
    rt = s3_runtime()
    bucket = store.new_bucket()
    plan = [("alpha", 1), ("beta/deep/", 2), ("alpha/", 3), ("", 4), ("beta/deep", 5), ("", 6)]
    rt.run("put", {"sends": [{"bucket": bucket, "prefix": p, "payload": n} for p, n in plan]})
    assert rt.flush(timeout=10)

    by_prefix = {KEY.match(key)["prefix"]: store.lines(bucket, key) for key in store.keys(bucket)}
    assert by_prefix == {"alpha": [1, 3], "beta/deep": [2, 5], None: [4, 6]}
    root_key = next(key for key in store.keys(bucket) if KEY.match(key)["prefix"] is None)
    assert re.match(r"^\d{4}/\d{2}/\d{2}/\d{2}/", root_key)  # date folders at the bucket root


# -- triggers ---------------------------------------------------------------------------


def test_event_count_trigger(s3_runtime: Callable[..., Runtime], store: Store) -> None:
    rt = s3_runtime(batch_max_events=5, batch_max_age=60)
    bucket = store.new_bucket()
    rt.run("put", sends(bucket, "count", list(range(12))))

    keys = store.wait_keys(bucket, 2)
    time.sleep(0.3)  # the last two events must stay buffered: no age or size trigger
    assert store.keys(bucket) == keys
    assert sorted(len(store.lines(bucket, key)) for key in keys) == [5, 5]
    assert rt.flush(timeout=10)
    assert sorted(store.all_lines(bucket)) == list(range(12))
    assert len(store.keys(bucket)) == 3


def test_size_trigger(s3_runtime: Callable[..., Runtime], store: Store) -> None:
    rt = s3_runtime(batch_max_bytes=1000, batch_max_age=60)
    bucket = store.new_bucket()
    payloads = [{"i": i, "pad": "x" * 290} for i in range(10)]  # ~310 bytes each
    rt.run("put", sends(bucket, "size", payloads))

    keys = store.wait_keys(bucket, 2)
    time.sleep(0.3)
    assert store.keys(bucket) == keys
    # sealed as soon as the buffer reaches 1000 bytes: at the 4th event
    assert sorted(len(store.lines(bucket, key)) for key in keys) == [4, 4]
    assert rt.flush(timeout=10)
    assert sorted(p["i"] for p in store.all_lines(bucket)) == list(range(10))


def test_age_trigger(s3_runtime: Callable[..., Runtime], store: Store) -> None:
    max_age = 0.4
    rt = s3_runtime(batch_max_age=max_age)
    bucket = store.new_bucket()
    started = time.monotonic()
    rt.run("put", sends(bucket, "age", ["a", "b", "c"]))

    early = store.keys(bucket)
    if time.monotonic() - started < max_age:  # listed before the batch could be old enough
        assert early == []
    assert wait_until(lambda: len(store.keys(bucket)) == 1, timeout=5)
    # flushed within max_age plus one tick (with slack for a busy machine), without flush()
    assert time.monotonic() - started < max_age + 2.0
    assert store.all_lines(bucket) == ["a", "b", "c"]


def test_flush_uploads_every_buffer_and_waits(
    s3_runtime: Callable[..., Runtime], store: Store
) -> None:
    rt = s3_runtime(batch_max_age=60)
    bucket = store.new_bucket()
    results = [rt.run("put", sends(bucket, f"p{i % 3}", [i])) for i in range(9)]
    time.sleep(0.2)
    assert store.keys(bucket) == []  # nothing triggers before an hour
    assert rt.flush(timeout=10)
    assert len(store.keys(bucket)) == 3
    assert sorted(store.all_lines(bucket)) == list(range(9))
    for result in results:
        [record] = rt.deliveries(result.run_id)
        assert record.status == "delivered" and KEY.match(record.detail["key"])


def test_batch_over_5_mib_is_uploaded_in_multipart_parts(
    s3_runtime: Callable[..., Runtime], store: Store
) -> None:
    rt = s3_runtime(batch_max_bytes=64 * MiB, batch_max_age=60)
    bucket = store.new_bucket()
    # Random base64 hardly compresses: ~11 MiB of lines give a gzip object above 5 MiB.
    payloads = [
        {"i": i, "blob": base64.b64encode(os.urandom(256 * 1024)).decode()} for i in range(32)
    ]
    rt.run("put", sends(bucket, "big", payloads))
    assert rt.flush(timeout=60)

    [key] = store.keys(bucket)
    head = store.client.head_object(Bucket=bucket, Key=key)
    size = head["ContentLength"]
    assert size > 5 * MiB
    etag = head["ETag"].strip('"')
    assert etag.endswith(f"-{math.ceil(size / (5 * MiB))}"), etag  # multipart ETag: md5-PARTS
    data = store.read(bucket, key)
    assert KEY.match(key)["id"] == hashlib.sha256(data).hexdigest()
    assert [json.loads(line) for line in gzip.decompress(data).splitlines()] == payloads


# -- buckets -----------------------------------------------------------------------------


def test_missing_bucket_fails_naming_the_bucket_and_is_dead_lettered_at_once(
    s3_runtime: Callable[..., Runtime], store: Store, data_dir: Path
) -> None:
    rt = s3_runtime()
    missing = f"missing-{uuid.uuid4().hex[:12]}"
    result = rt.run("put", sends(missing, "x/", [1, 2]))
    assert rt.flush(timeout=10)

    records = rt.deliveries(result.run_id)
    assert [r.status for r in records] == ["failed", "failed"]
    assert all(missing in r.error and "does not exist" in r.error for r in records)
    assert "OUTBOUND_S3_CREATE_BUCKETS" in records[0].error
    assert missing not in [b["Name"] for b in store.client.list_buckets()["Buckets"]]
    # Before any stop: the exact object it was meant to be, readable by its owner only.
    root = data_dir / "dead-letter" / "s3"
    assert {r.detail["dead_letter"] for r in records} == {str(root)}
    [path] = {Path(r.detail["dead_letter_object"]) for r in records}
    assert path == root / missing / records[0].detail["key"]
    assert [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()] == [1, 2]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (root.parent, root, *[p for p in path.parents if root in p.parents]):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_create_buckets_option_creates_the_bucket(
    s3_runtime: Callable[..., Runtime], s3_server: S3Server, store: Store
) -> None:
    # The endpoint as host:port (no scheme) works too.
    rt = s3_runtime(s3_create_buckets=True, s3_endpoint=f"{s3_server.host}:{s3_server.port}")
    bucket = f"created-{uuid.uuid4().hex[:12]}"
    result = rt.run("put", sends(bucket, "new/", [{"a": 1}]))
    assert rt.flush(timeout=10)

    assert [r.status for r in rt.deliveries(result.run_id)] == ["delivered"]
    assert store.all_lines(bucket) == [{"a": 1}]


def _delete_bucket(store: Store, bucket: str) -> None:
    for key in store.keys(bucket):
        store.client.delete_object(Bucket=bucket, Key=key)
    store.client.delete_bucket(Bucket=bucket)


def test_a_bucket_deleted_while_running_is_created_again(
    s3_runtime: Callable[..., Runtime], store: Store
) -> None:
    rt = s3_runtime(s3_create_buckets=True)
    bucket = f"again-{uuid.uuid4().hex[:12]}"
    first = rt.run("put", sends(bucket, "p/", [{"n": 1}]))
    assert rt.flush(timeout=10)
    assert [r.status for r in rt.deliveries(first.run_id)] == ["delivered"]
    _delete_bucket(store, bucket)

    second = rt.run("put", sends(bucket, "p/", [{"n": 2}, {"n": 3}]))
    assert rt.flush(timeout=10)
    assert [(r.status, r.attempts) for r in rt.deliveries(second.run_id)] == [("delivered", 1)] * 2
    assert store.all_lines(bucket) == [{"n": 2}, {"n": 3}]


def test_without_create_buckets_a_bucket_deleted_while_running_fails_at_once(
    s3_runtime: Callable[..., Runtime], store: Store
) -> None:
    rt = s3_runtime()
    bucket = store.new_bucket()
    assert rt.run("put", sends(bucket, "p/", [1])).sends == 1
    assert rt.flush(timeout=10)
    _delete_bucket(store, bucket)

    result = rt.run("put", sends(bucket, "p/", [2]))
    assert rt.flush(timeout=10)
    (record,) = rt.deliveries(result.run_id)
    assert record.status == "failed" and record.attempts == 1
    assert f"bucket {bucket!r} does not exist" in record.error
    assert "OUTBOUND_S3_CREATE_BUCKETS=1" in record.error


def test_an_upload_the_s3_client_refuses_to_make_is_final(
    s3_server: S3Server, store: Store
) -> None:
    """Behind the call's own checks: whatever the minio client refuses is not retried."""
    from outbound import Config
    from outbound.destinations.batching import PermanentBatchError
    from outbound.destinations.s3.objects import S3Object
    from outbound.destinations.s3.uploader import S3Uploader

    uploader = S3Uploader(Config(**s3_server.config()))
    bucket = store.new_bucket()
    try:
        with pytest.raises(PermanentBatchError, match="path segment"):
            uploader.put(S3Object(bucket, "./x/object.gz", gzip.compress(b"{}\n"), 1))
        uploader.put(S3Object(bucket, "x/object.gz", gzip.compress(b"{}\n"), 1))
    finally:
        uploader.close()
    assert store.keys(bucket) == ["x/object.gz"]


@pytest.mark.parametrize(
    ("prefix", "rule"),
    [
        ("./x", "'.' path segments"),
        ("x/./y", "'.' path segments"),
        ("x//y", "empty path segments"),
        ("x/\ud800", "valid Unicode"),
    ],
)
def test_prefixes_that_cannot_be_stored_are_refused_and_the_rest_delivered(
    make_runtime: Callable[..., Runtime], s3_server: S3Server, store: Store, prefix: str, rule: str
) -> None:
    rt = make_runtime(start=False, **s3_server.config())
    bucket = store.new_bucket()
    caught: list[SendError] = []

    @rt.workflow("p_mixed")
    def mixed(event: Any, ctx: Any) -> None:
        ctx.send.s3(bucket=bucket, prefix="ok", payload={"n": 1})
        try:
            ctx.send.s3(bucket=bucket, prefix=prefix, payload={"n": 2})
        except SendError as error:
            caught.append(error)
        ctx.send.s3(bucket=bucket, prefix="ok", payload={"n": 3})

    rt.start()
    result = rt.run("p_mixed", None)
    assert [(error.field, rule in error.rule) for error in caught] == [("prefix", True)]
    assert result.sends == 2
    assert rt.flush(timeout=10)
    assert [r.status for r in rt.deliveries(result.run_id)] == ["delivered"] * 2
    (key,) = store.keys(bucket)
    assert key.startswith("ok/") and store.lines(bucket, key) == [{"n": 1}, {"n": 3}]


# -- failures and shutdown -----------------------------------------------------------------


def test_server_stopped_mid_stream_then_restarted_every_event_lands_once(
    s3_runtime: Callable[..., Runtime], s3_server: S3Server, store: Store
) -> None:
    rt = s3_runtime(batch_max_events=10, batch_max_age=0.2)
    bucket = store.new_bucket()

    def send_range(start: int, stop: int) -> list[str]:
        return [
            rt.run("put", sends(bucket, "stream/", [{"n": n}])).run_id for n in range(start, stop)
        ]

    send_range(0, 30)
    s3_server.stop()
    down_runs = send_range(30, 70)
    assert wait_until(
        lambda: any(r.status == "retrying" for i in down_runs for r in rt.deliveries(i)), 10
    ), "uploads should fail while the server is down"
    s3_server.start()
    send_range(70, 100)
    assert rt.flush(timeout=30)

    counts = collections.Counter(line["n"] for line in store.all_lines(bucket))
    assert counts == collections.Counter(range(100))  # each event exactly once
    records = [r for i in down_runs for r in rt.deliveries(i)]
    assert all(r.status == "delivered" for r in records)
    assert max(r.attempts for r in records) > 1


def test_dead_letter_on_stop_while_server_is_down(
    s3_runtime: Callable[..., Runtime], s3_server: S3Server, store: Store, data_dir: Path
) -> None:
    rt = s3_runtime(batch_max_events=4, batch_max_age=60)
    bucket = store.new_bucket()
    s3_server.stop()
    payloads = [{"n": n} for n in range(10)]
    rt.run("put", sends(bucket, "lost/", payloads[:6]))
    rt.run("put", sends(bucket, "", payloads[6:]))

    report = rt.stop(drain=True, timeout=0.5)
    assert not report.drained
    assert report.dead_lettered == 10 and report.per_destination == {"s3": 10}

    root = data_dir / "dead-letter" / "s3" / bucket
    files = sorted(path for path in root.rglob("*") if path.is_file())
    keys = sorted(str(path.relative_to(root)) for path in files)
    assert len(keys) == 3  # 4 + 2 under lost/, 4 at the root
    lines: list[Any] = []
    for path, key in zip(files, keys, strict=True):
        match = KEY.match(key)
        assert match, key
        data = path.read_bytes()
        assert match["id"] == hashlib.sha256(data).hexdigest()
        lines += [json.loads(line) for line in gzip.decompress(data).splitlines()]
    assert sorted(lines, key=lambda p: p["n"]) == payloads
    assert {KEY.match(key)["prefix"] for key in keys} == {"lost", None}


# -- bad input and backpressure ------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "field", "rule"),
    [
        ({"bucket": "Bad_Bucket"}, "bucket", "lowercase"),
        ({"bucket": "ab"}, "bucket", "3-63"),
        ({"bucket": "my..bucket"}, "bucket", "adjacent periods"),
        ({"bucket": "192.168.1.10"}, "bucket", "IP address"),
        ({"prefix": "/root"}, "prefix", "must not start with '/'"),
        ({"prefix": "a/../b"}, "prefix", "'..'"),
        ({"prefix": "a\nb"}, "prefix", "control characters"),
        ({"prefix": "p" * 513}, "prefix", "512 bytes"),
        ({"payload": {1, 2}}, "payload", "JSON-serializable"),
        ({"payload": float("nan")}, "payload", "JSON-serializable"),
        ({"payload": "x" * 2000}, "payload", "limit is 1000"),
    ],
)
def test_bad_input_raises_send_error_at_the_call(
    s3_runtime: Callable[..., Runtime], arguments: dict[str, Any], field: str, rule: str
) -> None:
    rt = s3_runtime(max_payload_bytes=1000)

    @rt.workflow("bad")
    def bad(event: dict[str, Any], ctx: Any) -> Any:
        try:
            ctx.send.s3(**{"bucket": "fine-bucket", "prefix": "ok/", "payload": {}, **event})
        except SendError as error:
            return (error.field, str(error))
        return None

    result = rt.run("bad", arguments)
    assert result.status == "succeeded" and result.sends == 0
    assert result.value is not None, "the send should have been refused"
    got_field, message = result.value
    assert got_field == field and rule in message and "ctx.send.s3()" in message


def test_backpressure_makes_hand_offs_wait_and_loses_nothing(
    s3_runtime: Callable[..., Runtime], s3_server: S3Server, store: Store
) -> None:
    cap = 4000
    rt = s3_runtime(batch_memory_cap=cap, batch_max_events=3, batch_max_age=0.1)
    bucket = store.new_bucket()
    s3_server.stop()
    payloads = [{"n": n, "pad": "x" * 480} for n in range(40)]  # ~500 bytes each
    futures = [rt.submit("put", sends(bucket, "bp", [p])) for p in payloads]

    time.sleep(1.0)
    finished = sum(future.done() for future in futures)
    assert 0 < finished <= cap // 490 + 1  # the rest wait for room instead of buffering
    assert 0 < rt.stats()["buffered_bytes"] <= cap  # the budget, as stats() shows it

    s3_server.start()
    for future in futures:
        assert future.result(timeout=30).status == "succeeded"
    assert rt.flush(timeout=30)
    lines = store.all_lines(bucket)
    assert sorted(line["n"] for line in lines) == list(range(40))


def test_flush_waits_for_hand_offs_held_by_backpressure(
    s3_runtime: Callable[..., Runtime], store: Store
) -> None:
    # A run counts as finished before its sends reach the batcher; a hand-off
    # waiting for memory reaches it only after flush() has flushed. flush() must
    # still upload those sends, not leave them in a batch until max_age.
    rt = s3_runtime(batch_memory_cap=4000, batch_max_events=10**6, batch_max_age=60)
    bucket = store.new_bucket()
    futures = [
        rt.submit("put", sends(bucket, "held", [{"n": n, "pad": "x" * 480}])) for n in range(12)
    ]
    assert wait_until(lambda: sum(future.done() for future in futures) == 8, 5)
    time.sleep(0.1)
    assert sum(future.done() for future in futures) == 8  # 4 hand-offs wait for room

    assert rt.flush(timeout=5)
    assert sorted(line["n"] for line in store.all_lines(bucket)) == list(range(12))


def test_flush_right_after_a_burst_of_runs_writes_one_object(
    s3_runtime: Callable[..., Runtime], store: Store
) -> None:
    # Runs end before their sends reach the batcher (workers hand them off in
    # bulk); a flush that overtook those hand-offs would cut the batch in two.
    rt = s3_runtime(batch_max_events=10**6, batch_max_age=60)
    for _ in range(5):
        bucket = store.new_bucket()
        for n in range(300):
            rt.submit("put", sends(bucket, "burst", [n] * 20))
        assert rt.flush(timeout=30)
        assert len(store.keys(bucket)) == 1
        assert len(store.all_lines(bucket)) == 300 * 20


def test_crash_of_the_s3_actor_keeps_its_open_batches(
    s3_runtime: Callable[..., Runtime], store: Store
) -> None:
    rt = s3_runtime(batch_max_age=60)
    bucket = store.new_bucket()

    @rt.workflow("poison")
    def poison(event: Any, ctx: Any) -> None:
        ctx.send.to("s3", "not a (bucket, prefix, line) tuple")  # crashes the batcher

    before = rt.run("put", sends(bucket, "keep", [1, 2, 3]))
    crash = rt.run("poison", None)
    after = rt.run("put", sends(bucket, "keep", [4, 5]))
    assert rt.flush(timeout=10)

    assert store.all_lines(bucket) == [1, 2, 3, 4, 5]  # one object: the buffer survived
    assert len(store.keys(bucket)) == 1
    for result in (before, after):
        assert {r.status for r in rt.deliveries(result.run_id)} == {"delivered"}
    [crashed] = rt.deliveries(crash.run_id)
    assert crashed.status == "failed" and "crashed" in crashed.error
    assert rt.health()["destinations"]["s3"]["incarnation"] == 2


def test_a_restarted_s3_actor_uploads_with_its_own_client_and_lets_the_old_threads_go(
    s3_runtime: Callable[..., Runtime], store: Store
) -> None:
    """Clients and threads are not carried over a crash: the crashed incarnation's
    upload threads end, and the next one uploads (the open batch included) with its own."""
    rt = s3_runtime(batch_max_age=60)
    bucket = store.new_bucket()

    @rt.workflow("poison")
    def poison(event: Any, ctx: Any) -> None:
        ctx.send.to("s3", "not an S3 line")  # crashes the batcher

    rt.run("put", sends(bucket, "first", [1]))
    assert rt.flush(timeout=10)
    old_threads = upload_threads()
    assert old_threads  # the first incarnation uploaded on threads of its own
    rt.run("put", sends(bucket, "kept", [2, 3]))  # open when the actor crashes
    rt.run("poison", None)
    rt.run("put", sends(bucket, "kept", [4]))
    assert rt.flush(timeout=10)

    assert sorted(store.all_lines(bucket)) == [1, 2, 3, 4]
    assert rt.health()["destinations"]["s3"]["incarnation"] == 2
    assert wait_until(lambda: not old_threads & upload_threads())
    assert upload_threads()  # the new incarnation's


def upload_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("outbound-s3-upload")}


def test_retry_after_an_ambiguous_failure_leaves_one_object(
    make_runtime: Callable[..., Runtime],
    make_sink: Callable[..., Any],
    s3_server: S3Server,
    store: Store,
) -> None:
    # A proxy stores the first upload in S3 but answers 500: the uploader cannot
    # know it landed, retries, and the content-addressed key is overwritten.
    bucket = store.new_bucket()
    puts: list[str] = []

    def forward(request: ReceivedRequest) -> SinkResponse:
        connection = http.client.HTTPConnection(s3_server.host, s3_server.port, timeout=10)
        target = request.path + (f"?{urlencode(request.query)}" if request.query else "")
        connection.request(request.method, target, body=request.body, headers=request.headers)
        response = connection.getresponse()
        body = response.read()
        connection.close()
        if request.method == "PUT":
            puts.append(request.path)
            if len(puts) == 1:
                return SinkResponse(500, {"Content-Type": "application/xml"}, INTERNAL_ERROR)
        kept = {"content-type", "etag", "x-amz-request-id"}
        headers = {k: v for k, v in response.getheaders() if k.lower() in kept}
        return SinkResponse(response.status, headers, body)

    proxy = make_sink(forward)
    rt = make_runtime(**{**s3_server.config(), "s3_endpoint": proxy.url})

    @rt.workflow("put")
    def put(event: Any, ctx: Any) -> None:
        for n in range(5):
            ctx.send.s3(bucket=bucket, prefix="ambiguous/", payload={"n": n})

    result = rt.run("put", None)
    assert rt.flush(timeout=10)

    records = rt.deliveries(result.run_id)
    assert {r.status for r in records} == {"delivered"} and records[0].attempts == 2
    assert len(puts) == 2 and puts[0] == puts[1]  # the same key both times
    [key] = store.keys(bucket)
    assert puts[0].endswith(key) and store.lines(bucket, key) == [{"n": n} for n in range(5)]


INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


def test_stop_while_hand_offs_wait_on_backpressure_dead_letters_every_send(
    s3_runtime: Callable[..., Runtime], s3_server: S3Server, store: Store, data_dir: Path
) -> None:
    rt = s3_runtime(batch_memory_cap=4000, batch_max_events=3, batch_max_age=0.1)
    bucket = store.new_bucket()
    s3_server.stop()
    futures = [
        rt.submit("put", sends(bucket, "bp", [{"n": n, "pad": "x" * 480}])) for n in range(30)
    ]
    assert wait_until(lambda: sum(future.done() for future in futures) >= 8, 5)
    assert not all(future.done() for future in futures)  # the rest wait for room

    report = rt.stop(drain=True, timeout=0.5)
    assert report.dead_lettered == 30 and report.runs_abandoned == 0
    records = [r for future in futures for r in rt.deliveries(future.result(5).run_id)]
    assert len(records) == 30 and {r.status for r in records} == {"failed"}
    root = data_dir / "dead-letter" / "s3" / bucket
    lines = [
        json.loads(line)["n"]
        for path in root.rglob("*.gz")
        for line in gzip.decompress(path.read_bytes()).splitlines()
    ]
    assert sorted(lines) == list(range(30))
