"""Retries that outlast outages and survive restarts (README: Delivery guarantees).

What a user sees: a send keeps being retried for `OUTBOUND_RETRY_FOR` (with
the journal on, the max-attempts defaults grow to fill it), then fails naming
the window, dead-lettered; its attempts and next try are in the delivery record
and in /metrics; a restart during a backoff goes on from the recorded attempts
and waits for the recorded next try; and a 60 s outage of an HTTP endpoint,
the SMTP server, S3 and Postgres at once, each a real network failure (a proxy
that refuses and cuts connections), ends with everything delivered.
"""

from __future__ import annotations

import collections
import gzip
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from outage_support import OutageProxy
from sql_support import Db
from waiting import wait_until

from outbound import Config, Runtime
from outbound.api.metrics import metrics_for
from outbound.destinations.settings import max_attempts
from outbound.embedded import HttpSink, ReceivedRequest, S3Server, SinkResponse, SmtpServer


@pytest.fixture
def proxies() -> Iterator[Callable[[int], OutageProxy]]:
    """`proxy(port)` -> an OutageProxy in front of 127.0.0.1:port, stopped at teardown."""
    made: list[OutageProxy] = []

    def make(port: int) -> OutageProxy:
        proxy = OutageProxy(port).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop()


def dead_letter_files(data_dir: Path) -> list[Path]:
    folder = data_dir / "dead-letter"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_attempt_defaults_grow_to_fill_the_window_with_the_journal_on() -> None:
    off = Config(retry_for=3600, retry_cap=30)
    on = Config(journal="local", retry_for=3600, retry_cap=30)
    assert max_attempts(off, off.http_max_attempts) == 5
    assert max_attempts(on, on.http_max_attempts) == 3600 / 30 + 10
    assert max_attempts(on, on.email_max_attempts) == 3600 / 30 + 10
    explicit = Config(journal="local", http_max_attempts=3)
    assert max_attempts(explicit, explicit.http_max_attempts) == 3  # the user's setting wins
    assert Config.from_env({"OUTBOUND_RETRY_FOR": "7200"}).retry_for == 7200.0
    with pytest.raises(ValueError, match="retry_for must be positive"):
        Config(retry_for=0)


def test_a_send_past_the_retry_window_fails_naming_it_dead_lettered(
    make_runtime: Callable[..., Runtime],
    sink: HttpSink,
    proxies: Callable[[int], OutageProxy],
    data_dir: Path,
) -> None:
    proxy = proxies(sink.port)
    proxy.down()  # and it stays down
    rt = make_runtime(retry_for=2.0, http_max_attempts=10_000, retry_base=0.05, retry_cap=0.3)
    rt.register("ping", lambda event, ctx: ctx.send.http(proxy.replace_port(sink.url), data=event))
    started = time.monotonic()
    result = rt.run("ping", {"n": 1}, timeout=10)
    assert rt.flush(timeout=20)
    [delivery] = rt.deliveries(result.run_id)
    assert delivery.status == "failed"
    assert "retry window of 2 s (OUTBOUND_RETRY_FOR) is over" in (delivery.error or "")
    # Retried until the window ended it, far from the attempt limit (how many attempts
    # fit in 2 s depends on the machine's load).
    assert 1 <= delivery.attempts < 10_000
    assert time.monotonic() - started >= 2.0
    [path] = dead_letter_files(data_dir)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["delivery_id"] for line in lines] == [delivery.id]
    assert sink.count == 0


def test_a_batch_past_the_retry_window_fails_dead_lettered(
    make_runtime: Callable[..., Runtime],
    s3_server: S3Server,
    s3_client: Any,
    proxies: Callable[[int], OutageProxy],
    data_dir: Path,
) -> None:
    s3_client.create_bucket(Bucket="window")
    proxy = proxies(s3_server.port)
    proxy.down()
    config = {**s3_server.config(), "s3_endpoint": proxy.replace_port(s3_server.endpoint)}
    rt = make_runtime(retry_for=2.0, batch_max_age=0.1, retry_base=0.05, retry_cap=0.3, **config)
    rt.register("put", lambda event, ctx: ctx.send.s3(bucket="window", prefix="p", payload=event))
    result = rt.run("put", {"n": 1}, timeout=10)
    assert rt.flush(timeout=20)
    [delivery] = rt.deliveries(result.run_id)
    assert delivery.status == "failed"
    assert "(OUTBOUND_RETRY_FOR) is over" in (delivery.error or "")
    assert delivery.attempts >= 1
    assert dead_letter_files(data_dir)  # S3 writes its native .gz form
    assert s3_client.list_objects_v2(Bucket="window").get("KeyCount", 0) == 0


def test_a_restart_in_backoff_goes_on_from_the_recorded_attempts_and_next_try(
    make_sink: Callable[..., HttpSink], data_dir: Path, nats_server: Any, journal_cluster: str
) -> None:
    # The endpoint is down and says so: 503 with a Retry-After (1 s, then 4 s), so the
    # next try is known exactly; after the restart it answers.
    down = threading.Event()
    down.set()
    refused = itertools.count(1)

    def responder(request: ReceivedRequest) -> SinkResponse:
        if not down.is_set():
            return SinkResponse(200)
        wait = "1" if next(refused) == 1 else "4"
        return SinkResponse(503, headers={"Retry-After": wait})

    sink = make_sink(responder)
    config = Config(
        journal=nats_server.url,
        cluster=journal_cluster,
        data_dir=data_dir,
        retry_base=0.05,
        retry_cap=0.3,
    )
    records = f"{journal_cluster.upper()}_RETRIES"  # one per send in backoff

    first = Runtime(config)
    first.register("ping", lambda event, ctx: ctx.send.http(sink.url, data=event))
    first.start()
    try:
        result = first.run("ping", {"n": 1}, timeout=10)

        def waits_out_the_second_refusal() -> bool:
            [record] = first.deliveries(result.run_id)
            # The record is marked before the retry is counted: wait for both.
            counted = first.stats()["destinations"]["http"].get("retries") == 2
            return (
                counted and record.next_try_at is not None and record.next_try_at > time.time() + 2
            )

        wait_until(waits_out_the_second_refusal, timeout=10)
        [record] = first.deliveries(result.run_id)
        assert record.attempts == 2
        assert record.status == "retrying"
        assert record.as_dict()["next_try_at"] == record.next_try_at
        assert record.next_try_at is not None and record.next_try_at > time.time() + 2
        assert first.stats()["destinations"]["http"]["retrying"] == 1
        metrics = metrics_for(first).render().decode()
        assert 'outbound_deliveries_retrying{destination="http"} 1.0' in metrics
        assert 'outbound_retries_total{destination="http"} 2.0' in metrics
    finally:
        report = first.stop(timeout=0.2)
    assert report.left_in_journal == 1
    assert nats_server.stream_messages(records) == 1
    next_try_at = record.next_try_at
    down.clear()

    final: list[Any] = []
    second = Runtime(config)
    second.register("ping", lambda event, ctx: ctx.send.http(sink.url, data=event))
    second.ledger.add_listener(lambda send: final.append(send.snapshot()))
    second.start()
    try:
        assert second.flush(timeout=20)
        requests = sink.requests
        assert len(requests) == 3
        assert requests[2].headers["idempotency-key"] == record.id
        # The first try after the restart waited for the recorded next try.
        assert requests[2].received_at >= next_try_at - 0.05
        [delivered] = final
        assert delivered.status == "delivered" and delivered.id == record.id
        assert delivered.attempts == 3  # on from the 2 recorded, not 1
        assert second.stats()["destinations"]["http"]["retrying"] == 0
        wait_until(lambda: nats_server.stream_messages(records) == 0)  # final: record gone
    finally:
        second.stop(timeout=5)
    assert not dead_letter_files(data_dir)


# -- a 60 s outage of every destination at once -------------------------------------------

OUTAGE = 60.0


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    yield server
    server.stop()


def summarize(final: list[Any]) -> dict[str, dict[str, int]]:
    """Per destination: sends final, delivered, failed, and the most attempts one took."""
    by_destination: dict[str, list[Any]] = collections.defaultdict(list)
    for delivery in final:
        by_destination[delivery.destination].append(delivery)
    return {
        name: {
            "sends": len(records),
            "delivered": sum(r.status == "delivered" for r in records),
            "failed": sum(r.status == "failed" for r in records),
            "max_attempts": max(r.attempts for r in records),
        }
        for name, records in by_destination.items()
    }


def test_a_60_s_outage_of_http_smtp_s3_and_postgres_ends_with_everything_delivered(
    sink: HttpSink,
    smtp: SmtpServer,
    s3_server: S3Server,
    s3_client: Any,
    postgres_url: str,
    db: Db,
    table: str,
    proxies: Callable[[int], OutageProxy],
    data_dir: Path,
) -> None:
    pg_port = int(postgres_url.rsplit(":", 1)[1].split("/")[0])
    http_proxy, smtp_proxy, s3_proxy, pg_proxy = (
        proxies(port) for port in (sink.port, smtp.port, s3_server.port, pg_port)
    )
    s3_client.create_bucket(Bucket="outage")
    config = Config(
        journal="local",
        data_dir=data_dir,
        retry_base=0.2,
        retry_cap=2.0,
        batch_max_age=0.5,
        database_url=pg_proxy.replace_port(postgres_url),
        **{**smtp.config(), "smtp_url": smtp_proxy.replace_port(smtp.url)},
        **{**s3_server.config(), "s3_endpoint": s3_proxy.replace_port(s3_server.endpoint)},
    )
    url = http_proxy.replace_port(sink.url)
    rt = Runtime(config)
    final: list[Any] = []
    rt.ledger.add_listener(lambda send: final.append(send.snapshot()))

    @rt.workflow("everywhere")
    def everywhere(event: dict[str, Any], ctx: Any) -> None:
        ctx.send.http(url, data=event)
        ctx.send.email(subject=f"n {event['n']}", text="outage")
        ctx.send.s3(bucket="outage", prefix="o", payload=event)
        ctx.send.sql(table=table, payload=event)

    rt.start()
    try:
        rt.run("everywhere", {"n": -1}, timeout=10)  # the table exists before the outage
        assert rt.flush(timeout=20)
        outage = (http_proxy, smtp_proxy, s3_proxy, pg_proxy)
        for proxy in outage:
            proxy.down()
        sent = 1
        ends = time.monotonic() + OUTAGE
        while time.monotonic() < ends:
            rt.run("everywhere", {"n": sent}, timeout=10)
            sent += 1
            time.sleep(0.25)
        stats = rt.stats()["destinations"]
        assert all(stats[name]["delivered"] == 1 for name in ("http", "email", "s3", "sql"))
        for proxy in outage:
            proxy.up()
        assert rt.flush(timeout=60)
        stats = rt.stats()["destinations"]
    finally:
        rt.stop(timeout=10)

    summary = summarize(final)
    print(f"\noutage of {OUTAGE:g} s: {summary}")
    for name in ("http", "email", "s3", "sql"):
        assert summary[name]["sends"] == sent, (name, summary)
        assert summary[name]["delivered"] == sent, (name, summary)
        assert summary[name]["max_attempts"] > 1, (name, summary)
        assert stats[name]["retrying"] == 0
    assert not dead_letter_files(data_dir)
    # What each server holds, read by the tests' own clients.
    assert {r.headers["idempotency-key"] for r in sink.requests} == {
        r.id for r in final if r.destination == "http"
    }
    assert len({m.subject for m in smtp.wait_for(sent)}) == sent
    lines = [
        json.loads(line)
        for key in (o["Key"] for o in s3_client.list_objects_v2(Bucket="outage")["Contents"])
        for line in gzip.decompress(
            s3_client.get_object(Bucket="outage", Key=key)["Body"].read()
        ).splitlines()
    ]
    assert sorted(line["n"] for line in lines) == [-1, *range(1, sent)]
    assert db.count(table) == sent
