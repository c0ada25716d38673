"""Acknowledged sends survive crashes: kill -9, a killed nats-server, and SIGTERM (issue 14).

Real processes and real signals. A child program (tests/journal_child.py)
embeds a runtime with the journal on, sends to HTTP, S3, SQL and email on
servers that this pytest process runs (shared per module), and records what
the runtime acknowledged (a settled `submit()` future, a returned `publish()`).
The tests kill it with SIGKILL at seeded random points (once while it starts,
once together with its nats-server), or SIGTERM it (and SIGKILL it in the
middle of the drain), restart it on the same data directory, and then check
each service with their own client: every acknowledged send arrived, SQL
without a duplicate row, repeated HTTP requests and emails only under the same
Idempotency-Key / Message-ID, and no nats-server outlived its process. Two
more kill the journal's server (one the test runs, and the embedded one) under
a stream of runs in this process. Without the journal (the behaviour the issue
measured: everything lost) every one of these tests fails.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from journal_support import (
    Arrivals,
    Child,
    ChildPlan,
    RunStream,
    Services,
    SwitchableResponder,
    TestNames,
    email_arrivals,
    http_arrivals,
    nats_servers_using,
    read_acknowledged,
    s3_arrivals,
    sql_arrivals,
)
from nats_support import NatsServer
from sql_support import Db
from waiting import wait_until

from outbound import Runtime
from outbound.actors.ids import new_id
from outbound.embedded import HttpSink, S3Server, SmtpServer

SEED = 1414  # the kill points are random, and the same every time
KILL_ROUNDS = 4
RUNS_PER_ROUND = 1500
SUBMIT_PACE = 0.001  # seconds between submits: most kills come in the middle of a round
FINAL_RUNS = 1000
KILL_DURING_START = 2  # this round is killed while its runtime is still starting
KILL_WITH_SERVER = 1  # this round's nats-server is killed with it (a container's OOM kill)
ALL_KINDS = ("http", "s3", "sql", "email")


@pytest.fixture(scope="module")
def services(postgres_url: str) -> Iterator[Services]:
    """The HTTP sink, S3 (moto) and SMTP servers, shared by the tests of this module."""
    responder = SwitchableResponder()
    with HttpSink(responder) as sink, S3Server() as s3, SmtpServer() as smtp:
        yield Services(sink.url, responder, s3.config(), smtp, postgres_url)


@pytest.fixture(scope="module")
def s3_reader(services: Services) -> Iterator[Any]:
    """boto3, the test's own S3 client."""
    client = boto3.client(
        "s3",
        endpoint_url=services.s3_config["s3_endpoint"],
        aws_access_key_id=services.s3_config["s3_access_key"],
        aws_secret_access_key=services.s3_config["s3_secret_key"],
        region_name=services.s3_config["s3_region"],
    )
    yield client
    client.close()


@pytest.fixture
def names(services: Services) -> TestNames:
    """This test's own path, bucket, table and subject on the shared servers."""
    unique = new_id()[:12].lower()
    return TestNames(
        http_url=f"{services.http_url}/hooks/{unique}",
        http_path=f"/hooks/{unique}",
        bucket=f"crash-{unique}",
        prefix="runs",
        table=f"crash_{unique}",
        subject=f"crash-{unique}",
    )


@pytest.fixture
def ack_file(tmp_path: Path) -> Path:
    """Where the child programs append the numbers of the runs they saw acknowledged."""
    return tmp_path / "acknowledged"


def assert_no_nats_server_survives(data_dir: Path) -> None:
    """The embedded nats-server dies with the process that embeds it (no orphan)."""
    try:
        wait_until(lambda: not nats_servers_using(data_dir), timeout=10)
    except AssertionError:
        raise AssertionError(
            f"nats-server processes still use {data_dir}: {nats_servers_using(data_dir)}"
        ) from None


def assert_all_arrived(arrivals: Arrivals, acknowledged: set[int]) -> None:
    missing = arrivals.missing(acknowledged)
    assert not missing, (
        f"{len(missing)} acknowledged {arrivals.destination} sends never arrived "
        f"(first: {missing[:10]}); {arrivals.summary(acknowledged)}"
    )


def assert_repeats_keep_their_id(arrivals: Arrivals) -> None:
    differing = arrivals.with_differing_ids()
    assert not differing, (
        f"{len(differing)} {arrivals.destination} sends arrived again under another id "
        f"(first: {sorted(differing.items())[:3]})"
    )


def restart_and_finish(
    children: Callable[..., Child], plan: ChildPlan, env: dict[str, str], data_dir: Path
) -> dict[str, Any]:
    """The program again on the same data directory, with no new runs: it delivers what the
    journal kept, flushes and stops (nothing left in the journal, no nats-server behind)."""
    restart = dataclasses.replace(plan, first=0, count=0, then="finish", signals=False)
    report = children(restart, env, "restarted").finish_report(timeout=60)
    assert_no_nats_server_survives(data_dir)
    assert report["flushed"] and report["left_in_journal"] == 0, report
    return report


def assert_http_recovered(services: Services, names: TestNames, acknowledged: set[int]) -> str:
    """Every acknowledged number reached the HTTP sink, repeats under the same key; a summary."""
    http = http_arrivals(services.responder, names.http_path)
    assert_all_arrived(http, acknowledged)
    assert_repeats_keep_their_id(http)
    return http.summary(acknowledged)


def assert_sql_exactly_once(db: Db, table: str, arrivals: Arrivals) -> None:
    rows = db.value(f'SELECT count(*) FROM "{table}"')
    distinct_ids = db.value(f'SELECT count(DISTINCT _event_id) FROM "{table}"')
    assert rows == distinct_ids, f"{rows - distinct_ids} duplicate _event_id rows in {table}"
    assert arrivals.duplicates == 0, f"{arrivals.duplicates} sequence numbers have several rows"


def test_kill_9_repeatedly_loses_nothing(
    services: Services,
    names: TestNames,
    db: Db,
    s3_reader: Any,
    children: Callable[..., Child],
    data_dir: Path,
    ack_file: Path,
) -> None:
    env = services.env("local", data_dir)
    kill_points = random.Random(SEED)
    acknowledged_per_round: list[int] = []
    undelivered_at_kill: list[dict[str, int]] = []
    for round_number in range(KILL_ROUNDS):
        first = round_number * RUNS_PER_ROUND
        plan = ChildPlan(ack_file, first, RUNS_PER_ROUND, ALL_KINDS, names, pace=SUBMIT_PACE)
        child = children(plan, env, f"round-{round_number}")
        if round_number == KILL_DURING_START:
            # As soon as its nats-server runs: while start() recovers the last round.
            wait_until(lambda: nats_servers_using(data_dir) or child.statuses())  # noqa: B023
        else:
            child.wait_for_status("started")
            # Right after start (while it may still be redelivering the last round's
            # sends) up to well into the stream of runs.
            time.sleep(kill_points.uniform(0.0, 2.0))
        child.kill_9(with_servers_using=data_dir if round_number == KILL_WITH_SERVER else None)
        assert_no_nats_server_survives(data_dir)
        acknowledged = read_acknowledged(ack_file)
        acknowledged_per_round.append(len(acknowledged) - sum(acknowledged_per_round))
        # Acknowledged, not yet delivered when the process died: only the journal has them.
        arrived_so_far = (
            http_arrivals(services.responder, names.http_path),
            sql_arrivals(db, names.table),
            email_arrivals(services.smtp, names.subject),
        )
        undelivered_at_kill.append(
            {arrived.destination: len(arrived.missing(acknowledged)) for arrived in arrived_so_far}
        )
    acknowledged_before_final = read_acknowledged(ack_file)
    final = ChildPlan(
        ack_file, KILL_ROUNDS * RUNS_PER_ROUND, FINAL_RUNS, ALL_KINDS, names, then="finish"
    )
    report = children(final, env, "final").finish_report(timeout=60)
    assert_no_nats_server_survives(data_dir)

    acknowledged = read_acknowledged(ack_file)
    arrivals = {
        "http": http_arrivals(services.responder, names.http_path),
        "sql": sql_arrivals(db, names.table),
        "s3": s3_arrivals(s3_reader, names.bucket, names.prefix),
        "email": email_arrivals(services.smtp, names.subject),
    }
    print(
        f"\nkill -9 x{KILL_ROUNDS}: runs acknowledged per round {acknowledged_per_round}, "
        f"{len(acknowledged)} in all; acknowledged but undelivered at each kill: "
        f"{undelivered_at_kill}; final stop: {report}"
    )
    for destination_arrivals in arrivals.values():
        print(destination_arrivals.summary(acknowledged))
    assert any(sum(at_kill.values()) for at_kill in undelivered_at_kill), (
        "every acknowledged send was delivered before its kill: nothing was tested"
    )
    assert len(acknowledged) == len(acknowledged_before_final) + FINAL_RUNS
    for destination_arrivals in arrivals.values():
        assert_all_arrived(destination_arrivals, acknowledged)
    assert report["flushed"], report
    assert report["left_in_journal"] == 0, report
    assert_sql_exactly_once(db, names.table, arrivals["sql"])
    assert arrivals["s3"].duplicates == 0, arrivals["s3"].summary(acknowledged)  # manifests
    assert_repeats_keep_their_id(arrivals["http"])
    assert_repeats_keep_their_id(arrivals["email"])


@pytest.fixture
def streaming_runtime(
    services: Services, names: TestNames, make_runtime: Callable[..., Runtime]
) -> Callable[..., Runtime]:
    """`streaming_runtime(**config)` -> a started runtime whose `stream` workflow sends
    `{"seq": N}` to this test's HTTP path and SQL table."""

    def make(**config: Any) -> Runtime:
        rt = make_runtime(
            start=False, database_url=services.database_url, batch_max_age=0.3, **config
        )

        @rt.workflow("stream")
        def stream(event: dict[str, Any], ctx: Any) -> None:
            ctx.send.http(url=names.http_url, method="POST", data={"seq": event["seq"]})
            ctx.send.sql(table=names.table, payload={"seq": event["seq"]})

        return rt.start()

    return make


def assert_stream_delivered(
    services: Services, names: TestNames, db: Db, acknowledged: set[int]
) -> str:
    """Every acknowledged run's HTTP request and SQL row arrived, each effect once; a summary."""
    http = http_arrivals(services.responder, names.http_path)
    sql = sql_arrivals(db, names.table)
    assert_all_arrived(http, acknowledged)
    assert_all_arrived(sql, acknowledged)
    assert_repeats_keep_their_id(http)
    assert_sql_exactly_once(db, names.table, sql)
    return f"{http.summary(acknowledged)}; {sql.summary(acknowledged)}"


def test_nats_server_killed_and_restarted_under_load(
    services: Services,
    names: TestNames,
    db: Db,
    streaming_runtime: Callable[..., Runtime],
    tmp_path: Path,
) -> None:
    with NatsServer(tmp_path / "nats-store", max_payload="1MB") as nats:
        # A server left at NATS's default max_payload (1 MiB): sends must stay below that.
        rt = streaming_runtime(journal=nats.url, max_payload_bytes=512 * 1024)
        stream = RunStream(rt, "stream", total=1200).start()
        try:
            wait_until(lambda: stream.settled >= 300)
            nats.kill()
            # One submit may have begun before the kill and returned after it.
            submitted_at_kill = len(stream.futures) + 1
            outage_ends = time.monotonic() + 3.0
            while len(stream.futures) < submitted_at_kill + 100 and time.monotonic() < outage_ends:
                time.sleep(0.01)  # runs keep coming (or submit() waits) while it is down
            during_outage = list(stream.futures[submitted_at_kill:])
            submit_was_waiting = stream.submitting and len(stream.futures) < stream.total
            settled_during_outage = [future for future in during_outage if future.done()]
            nats.start()  # same port, same store directory
        finally:
            stream.join()
        acknowledged = stream.acknowledged()
        assert rt.flush(timeout=60)
        report = rt.stop(timeout=10)

    summary = assert_stream_delivered(services, names, db, acknowledged)
    print(
        f"\nnats-server killed after {submitted_at_kill} submits, {len(during_outage)} more "
        f"during the outage; {summary}; {report}"
    )
    assert during_outage or submit_was_waiting, "no run came while the server was down"
    assert not settled_during_outage, (
        f"{len(settled_during_outage)} runs submitted while the journal's server was dead "
        "settled before it came back: acknowledged without being journaled"
    )
    assert report.left_in_journal == 0, report


def test_embedded_nats_server_killed_under_load_is_restarted_by_the_runtime(
    services: Services,
    names: TestNames,
    db: Db,
    streaming_runtime: Callable[..., Runtime],
    data_dir: Path,
) -> None:
    rt = streaming_runtime(journal="local")  # on the data_dir fixture's directory
    [first_server] = nats_servers_using(data_dir)
    stream = RunStream(rt, "stream", total=1200).start()
    try:
        wait_until(lambda: stream.settled >= 300)
        os.kill(first_server, signal.SIGKILL)
        # The runtime starts another one on its own (same URL, same store).
        wait_until(lambda: nats_servers_using(data_dir) not in ([], [first_server]))
    finally:
        stream.join()
    acknowledged = stream.acknowledged()
    assert rt.flush(timeout=60)
    report = rt.stop(timeout=10)
    assert_no_nats_server_survives(data_dir)

    summary = assert_stream_delivered(services, names, db, acknowledged)
    print(f"\nembedded nats-server killed after 300 settled runs; {summary}; {report}")
    assert report.left_in_journal == 0, report


@pytest.mark.parametrize(
    "killed_mid_drain", [False, True], ids=["drain-times-out", "sigkill-mid-drain"]
)
def test_sigterm_of_embedding_process_leaves_sends_in_journal(
    services: Services,
    names: TestNames,
    children: Callable[..., Child],
    data_dir: Path,
    ack_file: Path,
    killed_mid_drain: bool,
) -> None:
    """SIGTERM: the drain ends at its timeout and leaves what is undelivered in the journal;
    or the orchestrator's SIGKILL comes when its grace period ends, in the middle of the drain."""
    runs = 200
    # The endpoint answers 503 until the restart, and the runtime keeps retrying:
    # nothing can be delivered before SIGTERM, and nothing gives up for good.
    drain_for = 60.0 if killed_mid_drain else 1.0
    env = services.env(
        "local", data_dir, shutdown_timeout=drain_for, http_max_attempts=1000, retry_cap=0.2
    )
    services.responder.down.add(names.http_path)
    plan = ChildPlan(ack_file, 0, runs, ("http",), names, signals=True)
    child = children(plan, env, "terminated")
    child.wait_for_status("settled")
    child.terminate()
    if killed_mid_drain:
        wait_until(lambda: "received SIGTERM" in child.log())
        child.kill_9()
    else:
        code = child.wait(timeout=30)
        assert code == 128 + signal.SIGTERM, child.log()
    stop_lines = [line for line in child.log().splitlines() if "journal" in line]
    assert_no_nats_server_survives(data_dir)
    dead_letters = data_dir / "dead-letter"
    assert not dead_letters.exists() or not any(dead_letters.iterdir()), (
        "with a journal, stop() leaves undelivered sends in the journal; it dead-lettered them"
    )

    services.responder.down.discard(names.http_path)
    report = restart_and_finish(children, plan, env, data_dir)

    acknowledged = read_acknowledged(ack_file)
    assert acknowledged == set(range(runs))
    summary = assert_http_recovered(services, names, acknowledged)
    print(f"\nSIGTERM: the child said {stop_lines}; after the restart {summary}; {report}")


def test_published_events_survive_kill_9_before_their_runs(
    services: Services,
    names: TestNames,
    children: Callable[..., Child],
    data_dir: Path,
    ack_file: Path,
) -> None:
    events = 64
    env = services.env("local", data_dir)
    # Runs take a while (64 runs of 0.2 s on 8 pool threads: 1.6 s at least), so most
    # have not ended, nor sent anything, when the kill comes right after the publishes.
    plan = ChildPlan(ack_file, 0, events, ("http",), names, publish=True, run_delay=0.2)
    child = children(plan, env, "published")
    child.wait_for_status("published")
    child.kill_9()
    assert_no_nats_server_survives(data_dir)
    delivered_before_kill = len(http_arrivals(services.responder, names.http_path).copies)

    report = restart_and_finish(children, plan, env, data_dir)

    acknowledged = read_acknowledged(ack_file)
    assert acknowledged == set(range(events))
    assert delivered_before_kill < events, "every run ended before the kill: nothing was tested"
    summary = assert_http_recovered(services, names, acknowledged)
    print(f"\npublish, kill -9: {delivered_before_kill} delivered before; {summary}; {report}")
