"""S3 exactly once across crashes (issue 15, item 1): upload manifests in the journal.

Real processes, real SIGKILL, a real S3-protocol server (moto), and the
test's own client (boto3) to read every object back. A child program
(tests/journal_child.py, sending to S3 only) runs with the journal on and
`OUTBOUND_S3_UPLOAD_PAUSE` (the uploader pauses, and logs it, just before and
just after each PUT): the test kills it at those log lines, so the kills land
between an object's manifest and its upload, and between its upload and the
settle of its sends, round after round on the same data directory. Then every
acknowledged line must be in S3 exactly once.

Each branch of recovery is also tested in-process, on a journal the test
fills itself (entries and a manifest, as a killed process leaves them): the
object is already in S3 (not uploaded again), every send is there (the same
bytes under the manifest's key), some are missing (the others go into a new
object). And without the journal nothing changes (no manifest, no journal).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from journal_support import (
    Child,
    ChildPlan,
    TestNames,
    child_env,
    nats_servers_using,
    read_acknowledged,
    s3_arrivals,
)
from nats_support import NatsServer
from waiting import wait_until

from outbound import Config, Runtime
from outbound.actors.ids import new_id
from outbound.destinations.delivery import Send
from outbound.destinations.s3 import manifests
from outbound.destinations.s3.manifests import Manifest, ManifestStore, joined, manifest_stream
from outbound.destinations.s3.objects import S3Object, encode_object
from outbound.destinations.s3.send import S3Line
from outbound.embedded import S3Server
from outbound.journal.journal import Journal

UPLOAD_PAUSE = 0.4  # seconds: long enough for the test to see the log line and kill
BEFORE = "before uploading"
AFTER = "after uploading"
#: Where each round's kill lands: at the Nth pause of that kind (the child logs each
#: pause before it sleeps; its first upload is often that of the last round's object).
KILL_AT = ((BEFORE, 1), (AFTER, 2), (BEFORE, 2), (AFTER, 1), (AFTER, 2), (BEFORE, 1))
RUNS_PER_ROUND = 300
FINAL_RUNS = 100


@pytest.fixture
def names() -> TestNames:
    unique = new_id()[:12].lower()
    return TestNames("", "", f"once-{unique}", "runs", "", "")


def test_kill_9_during_uploads_writes_every_line_once(
    s3_server: S3Server,
    s3_client: Any,
    names: TestNames,
    children: Callable[..., Child],
    data_dir: Path,
    tmp_path: Path,
) -> None:
    ack_file = tmp_path / "acknowledged"
    config = {**s3_server.config(), "s3_create_buckets": True}
    env = child_env(config, "local", data_dir, s3_upload_pause=UPLOAD_PAUSE)
    landed: list[str] = []
    unsettled_at_kill: list[int] = []
    for round_number, (kill_at, nth) in enumerate(KILL_AT):
        plan = ChildPlan(
            ack_file, round_number * RUNS_PER_ROUND, RUNS_PER_ROUND, ("s3",), names, pace=0.002
        )
        child = children(plan, env, f"round-{round_number}")
        marker = f"OUTBOUND_S3_UPLOAD_PAUSE: {UPLOAD_PAUSE:.2f} s {kill_at}"
        wait_until(lambda: child.log().count(marker) >= nth, timeout=30)  # noqa: B023
        child.kill_9()
        wait_until(lambda: not nats_servers_using(data_dir), timeout=10)
        landed.append(f"{kill_at} #{nth}")
        acknowledged = read_acknowledged(ack_file)
        arrived = s3_arrivals(s3_client, names.bucket, names.prefix)
        unsettled_at_kill.append(len(arrived.missing(acknowledged)))
        assert arrived.duplicates == 0, (
            f"after round {round_number}: {arrived.summary(acknowledged)}"
        )

    final = ChildPlan(
        ack_file, len(KILL_AT) * RUNS_PER_ROUND, FINAL_RUNS, ("s3",), names, then="finish"
    )
    report = children(final, env, "final").finish_report(timeout=60)
    acknowledged = read_acknowledged(ack_file)
    arrivals = s3_arrivals(s3_client, names.bucket, names.prefix)
    objects = sum(
        page.get("KeyCount", 0)
        for page in s3_client.get_paginator("list_objects_v2").paginate(
            Bucket=names.bucket, Prefix=names.prefix
        )
    )
    print(
        f"\nS3 kill -9 x{len(KILL_AT)} at {landed}: {len(acknowledged)} acknowledged, "
        f"not in S3 at each kill {unsettled_at_kill}; {objects} objects; "
        f"{arrivals.summary(acknowledged)}; final stop: {report}"
    )
    assert any(unsettled_at_kill), "every acknowledged line was in S3 at each kill: no test"
    assert not arrivals.missing(acknowledged), arrivals.summary(acknowledged)
    assert arrivals.duplicates == 0, arrivals.summary(acknowledged)
    assert report["flushed"] and report["left_in_journal"] == 0, report
    assert report["dead_lettered"] == 0, report


# -- each branch of recovery, on a journal the test fills ---------------------------------


def s3_sends(bucket: str, prefix: str, numbers: range) -> list[Send]:
    """S3 sends of `{"seq": N}` as a run would make them (the S3 destination is `s3`)."""
    sends = []
    for number in numbers:
        line = json.dumps({"seq": number}, separators=(",", ":")).encode()
        sends.append(
            Send(
                "s3",
                id=new_id(),
                run_id=new_id(),
                workflow_id="once",
                payload=S3Line(bucket, prefix, line),
                size=len(line),
            )
        )
    return sends


def leave_in_journal(config: Config, sends: list[Send], manifest_of: list[Send]) -> S3Object:
    """What a process killed mid-upload leaves: `sends` journaled, and the manifest of the
    object of `manifest_of` (in order), which it returns."""
    bucket, prefix = manifest_of[0].payload.bucket, manifest_of[0].payload.prefix
    s3_object = encode_object(bucket, prefix, [send.payload.line for send in manifest_of])
    journal = Journal(config, config.data_dir, config.max_payload_bytes)
    journal.open()
    try:
        stored = threading.Event()
        journal.append(journal.encode(sends), lambda error: stored.set())
        assert stored.wait(30)
        ManifestStore(journal).store(bucket, s3_object.key, manifest_of)
    finally:
        journal.close()
    return s3_object


def object_lines(s3_client: Any, bucket: str, key: str) -> list[int]:
    body = gzip.decompress(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
    return [json.loads(line)["seq"] for line in body.splitlines()]


def keys_under(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    listing = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [entry["Key"] for entry in listing.get("Contents", [])]


@pytest.fixture
def settings(
    s3_server: S3Server, s3_client: Any, names: TestNames, data_dir: Path
) -> dict[str, Any]:
    """`Config` fields of a runtime with the journal on, and S3 (this test's bucket made)."""
    s3_client.create_bucket(Bucket=names.bucket)
    return {**s3_server.config(), "journal": "local", "data_dir": data_dir}


def recover_and_stop(make_runtime: Callable[..., Runtime], settings: dict[str, Any]) -> Any:
    """Start a runtime on the journal (it recovers what is there), flush, stop: its report."""
    rt = make_runtime(**settings)
    assert rt.flush(timeout=30)
    report = rt.stop(timeout=10)
    assert report.left_in_journal == 0 and report.dead_lettered == 0, report
    return report


@pytest.fixture
def recover(
    s3_client: Any,
    names: TestNames,
    settings: dict[str, Any],
    make_runtime: Callable[..., Runtime],
) -> Callable[..., S3Object]:
    """`recover(journaled, uploaded=False)`: an object of the lines 0-4 was about to be
    uploaded (its manifest stored; `uploaded`: it was) when the process died with the
    sends `journaled` (by number) still in the journal; a runtime starts on that journal,
    flushes and stops. Returns the manifest's object."""

    def recover(journaled: range, uploaded: bool = False) -> S3Object:
        sends = s3_sends(names.bucket, names.prefix, range(5))
        left = [sends[number] for number in journaled]
        s3_object = leave_in_journal(Config(**settings), left, sends)
        if uploaded:  # with a mark that a second PUT would not keep
            s3_client.put_object(
                Bucket=names.bucket, Key=s3_object.key, Body=s3_object.data, Metadata={"mark": "1"}
            )
        recover_and_stop(make_runtime, settings)
        return s3_object

    return recover


def test_recovered_object_already_in_s3_is_not_uploaded_again(
    s3_client: Any, names: TestNames, recover: Callable[..., S3Object]
) -> None:
    s3_object = recover(range(5), uploaded=True)

    assert keys_under(s3_client, names.bucket, names.prefix) == [s3_object.key]
    head = s3_client.head_object(Bucket=names.bucket, Key=s3_object.key)
    assert head["Metadata"] == {"mark": "1"}, "the object was uploaded again"


def test_every_send_recovered_uploads_the_same_object_under_the_manifest_key(
    s3_client: Any, names: TestNames, recover: Callable[..., S3Object]
) -> None:
    s3_object = recover(range(5))

    assert keys_under(s3_client, names.bucket, names.prefix) == [s3_object.key]
    body = s3_client.get_object(Bucket=names.bucket, Key=s3_object.key)["Body"].read()
    assert body == s3_object.data  # the same bytes
    assert object_lines(s3_client, names.bucket, s3_object.key) == list(range(5))


def test_sends_of_a_manifest_not_all_recovered_go_into_a_new_object(
    s3_client: Any, names: TestNames, recover: Callable[..., S3Object]
) -> None:
    # Sends 0 and 1 were final before the crash (failed: dead-lettered), the object absent.
    s3_object = recover(range(2, 5))

    [key] = keys_under(s3_client, names.bucket, names.prefix)
    assert key != s3_object.key
    assert object_lines(s3_client, names.bucket, key) == [2, 3, 4]


def write_three_lines(rt: Runtime, names: TestNames, s3_client: Any, stop: bool = True) -> str:
    """Runs that send lines 0-2 to this test's bucket, flushed (and stopped): the one key."""

    @rt.workflow("once")
    def once(event: dict[str, Any], ctx: Any) -> None:
        ctx.send.s3(bucket=names.bucket, prefix=names.prefix, payload={"seq": event["seq"]})

    rt.start()
    futures = [rt.submit("once", {"seq": number}) for number in range(3)]
    for future in futures:
        future.result(timeout=10)
    assert rt.flush(timeout=30)
    if stop:
        rt.stop(timeout=10)
    [key] = keys_under(s3_client, names.bucket, names.prefix)
    assert sorted(object_lines(s3_client, names.bucket, key)) == [0, 1, 2]
    return key


def test_without_journal_objects_are_written_as_before(
    s3_client: Any,
    names: TestNames,
    s3_server: S3Server,
    data_dir: Path,
    make_runtime: Callable[..., Runtime],
) -> None:
    write_three_lines(
        make_runtime(start=False, **s3_server.config(), s3_create_buckets=True), names, s3_client
    )
    assert not (data_dir / "journal").exists()


def test_with_journal_each_object_has_its_manifest(
    s3_client: Any,
    names: TestNames,
    settings: dict[str, Any],
    make_runtime: Callable[..., Runtime],
) -> None:
    key = write_three_lines(make_runtime(start=False, **settings), names, s3_client)

    journal = Journal(Config(**settings), settings["data_dir"], 1024 * 1024)
    journal.open()
    try:
        manifests = [Manifest.decode(data) for _, data in journal.read(manifest_stream(journal))]
    finally:
        journal.close()
    assert [(m.bucket, m.key, len(m.ids)) for m in manifests] == [(names.bucket, key, 3)]


def test_a_manifest_larger_than_a_journal_message_is_stored_in_parts(
    s3_client: Any,
    names: TestNames,
    settings: dict[str, Any],
    make_runtime: Callable[..., Runtime],
    tmp_path: Path,
    journal_cluster: str,
) -> None:
    with NatsServer(tmp_path / "nats", max_payload="64KB") as nats:
        small = {
            **settings,
            "journal": nats.url,
            "cluster": journal_cluster,
            "max_payload_bytes": 16 * 1024,
        }
        sends = s3_sends(names.bucket, names.prefix, range(3000))  # ~105 KB of ids
        s3_object = leave_in_journal(Config(**small), sends, sends)
        assert nats.stream_messages(f"{journal_cluster}_S3_MANIFESTS".upper()) > 1
        recover_and_stop(make_runtime, small)

    assert keys_under(s3_client, names.bucket, names.prefix) == [s3_object.key]
    assert object_lines(s3_client, names.bucket, s3_object.key) == list(range(3000))


def test_manifest_parts_join_back_in_order() -> None:
    ids = tuple(f"{number:032x}" for number in range(100))
    manifest = Manifest("bucket", "key", ids, 1.0)
    parts = manifest.split(1000)
    assert len(parts) > 1 and all(len(part.encode()) <= 1000 for part in parts)
    assert joined(list(reversed(parts))) == manifest
    assert not joined(parts[1:]).whole


def manifests_stored(nats_url: str, stream: str) -> tuple[int, int]:
    """(messages held, messages ever stored) of the manifests' stream, read with nats-py."""

    async def state() -> tuple[int, int]:
        import nats

        client = await nats.connect(nats_url)
        try:
            info = await client.jetstream().stream_info(stream)
            return int(info.state.messages), int(info.state.last_seq)
        finally:
            await client.close()

    return asyncio.run(state())


def test_manifests_are_deleted_once_their_sends_journal_entries_are_gone(
    s3_client: Any,
    names: TestNames,
    s3_server: S3Server,
    nats_server: NatsServer,
    journal_cluster: str,
    make_runtime: Callable[..., Runtime],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(manifests, "DELETE_AFTER", 0.0)  # at the second sweep, not 30 s on
    rt = make_runtime(
        start=False,
        **s3_server.config(),
        s3_create_buckets=True,
        journal=nats_server.url,
        cluster=journal_cluster,
    )
    write_three_lines(rt, names, s3_client, stop=False)
    stream = f"{journal_cluster}_S3_MANIFESTS".upper()
    wait_until(lambda: manifests_stored(nats_server.url, stream) == (0, 1))
    assert rt.stop(timeout=10).left_in_journal == 0
