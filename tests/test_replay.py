"""Replay of dead letters (`rt.replay_dead_letters`, `outbound replay`), end to end.

Real servers only: an HTTP endpoint that refuses (400: a final failure, so
dead-lettered at once) and is then fixed; Postgres; the S3-protocol server
read back with boto3; a nats-server shared by two runtimes with different data
dirs ("a replay sees every node's"). Each replay must keep the delivery ids
(Idempotency-Key, `_event_id`), mark what it replayed, and replay nothing twice.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sql_support import Db
from waiting import wait_until

from outbound import Runtime
from outbound.embedded import HttpSink, ReceivedRequest, S3Server, SinkResponse


class Endpoint:
    """An HTTP endpoint that answers 400 until it is fixed, recording every request."""

    def __init__(self, make_sink: Callable[..., HttpSink]) -> None:
        self.broken = True
        self.sink = make_sink(self.answer)

    def answer(self, request: ReceivedRequest) -> SinkResponse:
        return SinkResponse(400 if self.broken else 200, body=b"{}")

    def keys(self, start: int = 0) -> list[str]:
        return [r.headers["idempotency-key"] for r in self.sink.requests[start:]]


@pytest.fixture
def endpoint(make_sink: Callable[..., HttpSink]) -> Endpoint:
    return Endpoint(make_sink)


def with_posts(rt: Runtime) -> Runtime:
    @rt.workflow("post")
    def post(event: dict[str, Any], ctx: Any) -> None:
        for n in range(event["count"]):
            ctx.send.http(url=event["url"], data={"n": n, "tag": event.get("tag")})

    return rt


def fail_posts(rt: Runtime, endpoint: Endpoint, count: int, tag: str = "") -> list[str]:
    """Run `count` posts against the broken endpoint: their delivery ids, all dead-lettered."""
    result = rt.run("post", {"url": endpoint.sink.url + "/hook", "count": count, "tag": tag})
    assert rt.flush(timeout=10)
    records = rt.deliveries(result.run_id)
    assert [r.status for r in records] == ["failed"] * count
    assert all("dead_letter" in r.detail for r in records)
    return [r.id for r in records]


def test_http_dead_letters_replayed_with_their_idempotency_keys_once(
    make_runtime: Callable[..., Runtime], endpoint: Endpoint, data_dir: Path
) -> None:
    rt = with_posts(make_runtime(start=False)).start()
    ids = fail_posts(rt, endpoint, 3)
    assert sorted(endpoint.keys()) == sorted(ids)

    # Replayed while the endpoint still refuses: they fail again, dead-lettered again.
    report = rt.replay_dead_letters()
    assert rt.flush(timeout=10)
    http = report.settled().destinations["http"]
    assert (http.found, http.replayed, http.failed_again, http.delivered) == (3, 3, 3, 0)
    assert sorted(endpoint.keys(3)) == sorted(ids)
    assert not report.ok

    endpoint.broken = False
    report = rt.replay_dead_letters()
    assert rt.flush(timeout=10)
    http = report.settled().destinations["http"]
    # The first failures are marked; the second ones (written again) are replayed now.
    assert (http.found, http.already_replayed, http.replayed, http.delivered) == (6, 3, 3, 3)
    assert report.ok
    delivered = endpoint.sink.requests[6:]
    assert sorted(r.headers["idempotency-key"] for r in delivered) == sorted(ids)
    assert sorted(r.json()["n"] for r in delivered) == [0, 1, 2]
    replayed = report.sends
    assert {s.detail["replayed_from"] for s in replayed} == {
        str(p) for p in (data_dir / "dead-letter").glob("http-*.jsonl")
    }
    assert all(s.attempts == 1 for s in replayed)  # counted from 0 again
    assert rt.stats()["destinations"]["http"]["replayed"] == 6

    # A third replay finds nothing to send; the marks are the owner's only.
    report = rt.replay_dead_letters()
    http = report.destinations["http"]
    assert (http.found, http.already_replayed, http.replayed) == (6, 6, 0)
    assert len(endpoint.sink.requests) == 9
    [sidecar] = (data_dir / "dead-letter").glob("*.jsonl.replayed")
    assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600


def test_dry_run_sends_and_marks_nothing_and_filters_pick_by_destination_and_time(
    make_runtime: Callable[..., Runtime],
    endpoint: Endpoint,
    data_dir: Path,
    make_sink: Callable[..., HttpSink],
) -> None:
    rt = with_posts(make_runtime(start=False)).start()
    early = fail_posts(rt, endpoint, 2, tag="early")
    between = time.time()
    time.sleep(0.01)
    late = fail_posts(rt, endpoint, 2, tag="late")
    endpoint.broken = False
    requests = len(endpoint.sink.requests)

    report = rt.replay_dead_letters(dry_run=True)
    assert report.dry_run and report.destinations["http"].replayed == 4
    assert "would replay 4" in report.describe()
    assert len(endpoint.sink.requests) == requests
    assert not list((data_dir / "dead-letter").glob("*.replayed"))

    assert rt.replay_dead_letters(destination="sql").destinations == {}
    iso = datetime.fromtimestamp(between, UTC).isoformat().replace("+00:00", "Z")
    report = rt.replay_dead_letters(since=iso)
    assert rt.flush(timeout=10)
    assert report.settled().destinations["http"].delivered == 2
    assert sorted(endpoint.keys(requests)) == sorted(late)

    report = rt.replay_dead_letters(destination="http", until=between)
    assert rt.flush(timeout=10)
    http = report.settled().destinations["http"]
    assert (http.found, http.replayed, http.delivered) == (2, 2, 2)
    assert sorted(endpoint.keys(requests + 2)) == sorted(early)

    with pytest.raises(ValueError, match="since"):
        rt.replay_dead_letters(since="yesterday")


def test_sql_rows_replayed_keep_their_event_id_without_duplicates(
    make_runtime: Callable[..., Runtime], postgres_url: str, db: Db, table: str, data_dir: Path
) -> None:
    from outbound.embedded import free_port

    # Postgres unreachable: the rows wait in their batch, and the stop dead-letters them.
    down = make_runtime(start=False, database_url=f"postgresql://x@127.0.0.1:{free_port()}/x")

    @down.workflow("load")
    def load(event: dict[str, Any], ctx: Any) -> None:
        for n in range(5):
            ctx.send.sql(table=table, payload={"n": n, "name": f"row {n}"})

    result = down.start().run("load", {})
    report = down.stop(drain=True, timeout=1)
    assert report.dead_lettered == 5
    ids = sorted(r.id for r in down.deliveries(result.run_id))

    rt = make_runtime(database_url=postgres_url, batch_max_age=0.1)
    replay = rt.replay_dead_letters()
    assert rt.flush(timeout=20)
    assert replay.settled().destinations["sql"].delivered == 5
    rows = db.fetch(f"SELECT _event_id, n, name FROM {table} ORDER BY n")
    assert sorted(row["_event_id"].hex for row in rows) == ids
    assert [(row["n"], row["name"]) for row in rows] == [(n, f"row {n}") for n in range(5)]

    # Even with the marks lost, a replay cannot duplicate a row: `_event_id` is the id.
    for sidecar in (data_dir / "dead-letter").glob("*.replayed"):
        sidecar.unlink()
    again = rt.replay_dead_letters(destination="sql")
    assert rt.flush(timeout=20)
    assert again.settled().destinations["sql"].delivered == 5
    assert db.count(table) == 5


def test_s3_object_dead_lettered_whole_is_uploaded_as_it_was(
    make_runtime: Callable[..., Runtime], s3_server: S3Server, s3_client: Any, data_dir: Path
) -> None:
    rt = make_runtime(**s3_server.config())

    @rt.workflow("put")
    def put(event: dict[str, Any], ctx: Any) -> None:
        for n in range(3):
            ctx.send.s3(bucket=event["bucket"], prefix="orders/", payload={"n": n})

    bucket = f"later-{uuid.uuid4().hex[:12]}"
    result = rt.run("put", {"bucket": bucket})  # the bucket does not exist yet: dead-lettered
    assert rt.flush(timeout=10)
    records = rt.deliveries(result.run_id)
    assert [r.status for r in records] == ["failed"] * 3
    key = records[0].detail["key"]

    s3_client.create_bucket(Bucket=bucket)
    assert rt.replay_dead_letters(dry_run=True).destinations["s3 objects"].replayed == 1
    report = rt.replay_dead_letters()
    objects = report.destinations["s3 objects"]
    assert (objects.found, objects.replayed) == (1, 1) and report.ok
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert [json.loads(line) for line in gzip.decompress(body).splitlines()] == [
        {"n": n} for n in range(3)
    ]
    again = rt.replay_dead_letters().destinations["s3 objects"]
    assert (again.found, again.already_replayed, again.replayed) == (1, 1, 0)
    listed = s3_client.list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["Key"] for item in listed] == [key]


def test_cli_replays_once_and_dry_run_marks_nothing(
    make_runtime: Callable[..., Runtime], endpoint: Endpoint, data_dir: Path
) -> None:
    rt = with_posts(make_runtime(start=False)).start()
    ids = fail_posts(rt, endpoint, 2)
    rt.stop()
    endpoint.broken = False
    env = {**os.environ, "OUTBOUND_DATA_DIR": str(data_dir), "OUTBOUND_JOURNAL": "off"}

    app = data_dir.parent / "replay_app.py"
    app.write_text(
        "from outbound import Config, Runtime\n"
        f"rt = Runtime(Config(data_dir={str(data_dir)!r}, journal='off'))\n"
    )

    def replay(*options: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "outbound.cli", "replay", *options]
        return subprocess.run(
            command, env=env, cwd=app.parent, capture_output=True, text=True, timeout=60
        )

    dry = replay("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "http: found 2, would replay 2" in dry.stdout
    assert len(endpoint.sink.requests) == 2

    done = replay("--destination", "http", "--timeout", "20")
    assert done.returncode == 0, done.stderr
    assert "http: found 2, replayed 2" in done.stdout and "delivered 2" in done.stdout
    assert sorted(endpoint.keys(2)) == sorted(ids)

    second = replay("--app", "replay_app:rt")  # the user's Runtime, as `serve --app` loads it
    assert second.returncode == 0, second.stderr
    assert "found 2, replayed 0, skipped as already replayed 2" in second.stdout
    assert len(endpoint.sink.requests) == 4

    bad = replay("--since", "not a time")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_with_a_journal_another_node_replays_the_dead_letters(
    make_runtime: Callable[..., Runtime],
    endpoint: Endpoint,
    nats_server: Any,
    journal_cluster: str,
    tmp_path: Path,
) -> None:
    journal = {"journal": nats_server.url, "cluster": journal_cluster}
    node_a = with_posts(make_runtime(start=False, data_dir=tmp_path / "a", **journal)).start()
    ids = fail_posts(node_a, endpoint, 3)
    node_a.stop()  # its dead letters were stored in the journal before it let go of them
    stream = f"{journal_cluster}_DEAD_LETTERS".upper()
    assert nats_server.stream_messages(stream) == 1
    publish(nats_server.url, f"{journal_cluster}.dead_letters", b"not a dead letter")

    node_b = make_runtime(data_dir=tmp_path / "b", **journal)
    dry = node_b.replay_dead_letters(dry_run=True)
    assert dry.destinations["http"].replayed == 3 and not dry.ok  # one message unreadable
    assert nats_server.stream_messages(stream) == 2
    # Still refused: each fails again and is stored in the stream again, as a new dead letter.
    report = node_b.replay_dead_letters()
    assert report.source.startswith("the journal")
    assert node_b.flush(timeout=10)
    assert report.settled().destinations["http"].failed_again == 3
    assert report.destinations["(unreadable)"].unreadable == 1
    assert sorted(endpoint.keys(3)) == sorted(ids)
    assert all(s.detail["replayed_from"].startswith(f"journal:{stream}#") for s in report.sends)

    endpoint.broken = False
    wait_until(lambda: nats_server.stream_messages(stream) == 2)  # old one deleted, new stored
    report = node_b.replay_dead_letters(destination="http")
    assert node_b.flush(timeout=10)
    # Node B's own file has the same 3 (failed again): marked as the stream's, not sent twice.
    http = report.settled().destinations["http"]
    assert (http.found, http.replayed, http.delivered) == (3, 3, 3)
    assert sorted(endpoint.keys(6)) == sorted(ids)

    wait_until(lambda: nats_server.stream_messages(stream) == 1)  # only the unreadable one kept
    assert "http" not in node_b.replay_dead_letters().destinations
    assert len(endpoint.sink.requests) == 9


def test_with_a_journal_an_s3_object_dead_lettered_on_one_node_is_uploaded_by_another(
    make_runtime: Callable[..., Runtime],
    s3_server: S3Server,
    s3_client: Any,
    nats_server: Any,
    journal_cluster: str,
    tmp_path: Path,
) -> None:
    journal = {"journal": nats_server.url, "cluster": journal_cluster, **s3_server.config()}
    node_a = make_runtime(start=False, data_dir=tmp_path / "a", **journal)

    @node_a.workflow("put")
    def put(event: dict[str, Any], ctx: Any) -> None:
        for n in range(3):
            ctx.send.s3(bucket=event["bucket"], prefix="orders/", payload={"n": n})

    bucket = f"later-{uuid.uuid4().hex[:12]}"
    result = node_a.start().run("put", {"bucket": bucket})  # no such bucket: dead-lettered
    assert node_a.flush(timeout=10)
    records = node_a.deliveries(result.run_id)
    assert [r.status for r in records] == ["failed"] * 3
    key = records[0].detail["key"]
    node_a.stop()
    # Node A's disk is gone: only the journal has the object now.
    shutil.rmtree(tmp_path / "a" / "dead-letter")
    s3_client.create_bucket(Bucket=bucket)

    node_b = make_runtime(data_dir=tmp_path / "b", **journal)
    report = node_b.replay_dead_letters(destination="s3")
    objects = report.destinations["s3 objects"]
    assert (objects.found, objects.replayed, objects.delivered) == (1, 1, 1) and report.ok
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert [json.loads(line) for line in gzip.decompress(body).splitlines()] == [
        {"n": n} for n in range(3)
    ]
    stream = f"{journal_cluster}_DEAD_LETTERS".upper()
    wait_until(lambda: nats_server.stream_messages(stream) == 0)
    assert node_b.replay_dead_letters().destinations == {}


def test_files_written_with_and_without_a_journal_are_each_replayed_once(
    make_runtime: Callable[..., Runtime],
    endpoint: Endpoint,
    nats_server: Any,
    journal_cluster: str,
) -> None:
    journal = {"journal": nats_server.url, "cluster": journal_cluster}
    plain = with_posts(make_runtime(start=False)).start()
    before = fail_posts(plain, endpoint, 2)  # files only
    plain.stop()
    journaled = with_posts(make_runtime(start=False, **journal)).start()
    with_journal = fail_posts(journaled, endpoint, 1)  # its file, and the stream
    journaled.stop()
    endpoint.broken = False

    # Without the journal, the line the stream holds is left to a replay with it.
    files = make_runtime().replay_dead_letters(dry_run=True).destinations["http"]
    assert (files.found, files.replayed, files.in_journal) == (3, 2, 1)

    report = make_runtime(**journal).replay_dead_letters()
    assert report.source.startswith("the journal")
    http = report.destinations["http"]
    assert (http.found, http.replayed) == (3, 3)
    wait_until(lambda: len(endpoint.sink.requests) == 6)
    assert sorted(endpoint.keys(3)) == sorted(before + with_journal)


def publish(url: str, subject: str, data: bytes) -> None:
    """Store one message in the journal with an independent client (nats-py)."""

    async def main() -> None:
        import nats

        client = await nats.connect(url)
        try:
            await client.jetstream().publish(subject, data)
        finally:
            await client.close()

    asyncio.run(main())


# -- each destination reads its own dead-letter lines back ----------------------------------


def written_and_read_back(
    directory: Path, destination: str, actor: Any, payload: Any, size: int
) -> Any:
    """Dead-letter one send as the runtime does, then turn its line back into a payload."""
    from outbound.destinations.deadletter import DeadLetterWriter
    from outbound.destinations.delivery import Ledger, new_send, settle
    from outbound.destinations.registry import DESTINATION_KINDS

    writer = DeadLetterWriter(directory / uuid.uuid4().hex)
    if actor is not None:
        writer.register_format(destination, actor.dead_letter_fields)
    ledger = Ledger(dead_letters=writer)
    send = new_send(destination, uuid.uuid4().hex, "run", "wf", time.time(), payload, size, 0)
    ledger.recovered([send])
    settle([send], "failed", error="refused")
    [line] = Path(send.detail["dead_letter"]).read_text().splitlines()
    [kind] = [kind for kind in DESTINATION_KINDS if kind.name == destination]
    return kind.from_dead_letter(json.loads(line))


def test_every_destination_turns_its_dead_letter_line_back_into_the_same_payload(
    tmp_path: Path,
) -> None:
    from outbound.destinations.email.send import Email
    from outbound.destinations.emit.actor import EmitDestination
    from outbound.destinations.emit.send import validate_emit
    from outbound.destinations.http.send import HttpRequest
    from outbound.destinations.s3.actor import S3Destination
    from outbound.destinations.s3.send import validate_s3
    from outbound.destinations.sql.actor import SqlDestination
    from outbound.destinations.sql.send import validate_sql
    from outbound.destinations.sse.actor import SseDestination
    from outbound.destinations.sse.send import validate_sse

    request = HttpRequest(
        method="PUT",
        url="http://127.0.0.1:9/x",
        headers={"X-Ascii": "plain", "X-Latin": "café".encode("latin-1")},
        params={"q": "1", "many": ["a", "b"]},
        body=b"\xff\x00 not utf-8",
        auth=("user", "pass"),
        timeout=2.5,
    )
    assert written_and_read_back(tmp_path, "http", None, request, 12) == (request, 12)
    text_body = HttpRequest(method="POST", url="http://127.0.0.1:9/", body='{"é": 1}'.encode())
    assert written_and_read_back(tmp_path, "http", None, text_body, 9)[0] == text_body

    email = Email("Subject é", "text", "<p>html</p>", ('"A B" <a@example.com>', "c@example.com"))
    assert written_and_read_back(tmp_path, "email", None, email, 15)[0] == email

    row = {"n": 1, "name": "é", "nested": {"a": [1, 2]}, "none": None, "f": 1.5, "b": True}
    for destination, actor, (payload, size) in [
        ("s3", S3Destination, validate_s3(None, 10**6, "bucket", "p/", row)),
        ("sql", SqlDestination, validate_sql(None, 10**6, "Orders", row)),
        ("sse", SseDestination, validate_sse(None, 10**6, "updates", row)),
        ("emit", EmitDestination, validate_emit(None, 10**6, row)),
    ]:
        assert written_and_read_back(tmp_path, destination, actor, payload, size) == (payload, size)
