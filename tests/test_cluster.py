"""A cluster of real `outbound serve` processes sharing one nats-server (issue 16, part 1).

Each test starts its nodes (tests/cluster_support.py: `outbound serve --app
cluster_app:rt`, one cluster name per test) against the module's nats-server
and the session's Postgres, posts events to the nodes' HTTP APIs, and reads
what arrived with its own clients: the HTTP sink's records (by `seq`, with
the Idempotency-Key) and the SQL table (by `seq`, with `_event_id`). Each run
names the node that ran it in what it sends (`GET /runs/{id}` answers only on
that node). Nodes are killed on the way out, whatever happens.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from cluster_app import SUBJECT_CHARACTERS_WORKFLOW, WORKFLOW, register
from cluster_support import (
    EventPoster,
    Nodes,
    PostResults,
    cluster_plans,
    event,
    runs_per_node,
)
from journal_support import Arrivals, SwitchableResponder, http_arrivals, sql_arrivals
from sql_support import Db

from outbound import Runtime
from outbound.embedded import HttpSink

ACK_WAIT = 3.0  # OUTBOUND_JOURNAL_ACK_WAIT of every node: how soon a dead node's work moves


def undelivered(
    responder: SwitchableResponder, path: str, db: Db, table: str, acknowledged: set[int]
) -> dict[str, list[int]]:
    """The acknowledged numbers not yet in the HTTP sink, and not yet in the SQL table."""
    return {
        "http": http_arrivals(responder, path).missing(acknowledged),
        "sql": sql_arrivals(db, table).missing(acknowledged),
    }


def wait_for_delivery(
    responder: SwitchableResponder,
    path: str,
    db: Db,
    table: str,
    acknowledged: set[int],
    timeout: float,
    describe: Callable[[], str],
) -> float:
    """Poll until every acknowledged number arrived at both; return when (time.time())."""
    deadline = time.monotonic() + timeout
    while True:
        missing = undelivered(responder, path, db, table, acknowledged)
        if not any(missing.values()):
            return time.time()
        assert time.monotonic() < deadline, (
            f"not delivered after {timeout} s: http {missing['http'][:20]} "
            f"({len(missing['http'])}), sql {missing['sql'][:20]} ({len(missing['sql'])})\n"
            + describe()
        )
        time.sleep(0.25)


def assert_delivered_once(
    http: Arrivals, sql: Arrivals, acknowledged: set[int], results: PostResults | None
) -> None:
    """Every acknowledged number in both; no SQL duplicate; HTTP repeats only under one key;
    and the delivery ids derive from the run id (its first 24 hex digits)."""
    assert http.missing(acknowledged) == [], http.summary(acknowledged)
    assert sql.missing(acknowledged) == [], sql.summary(acknowledged)
    assert sql.duplicates == 0, sql.summary(acknowledged)
    assert http.with_differing_ids() == {}, http.summary(acknowledged)
    if results is not None:
        for seq in acknowledged:
            run_prefix = results.run_ids[seq][:24]
            (http_id,) = http.ids[seq]
            (sql_id,) = sql.ids[seq]
            sql_id = sql_id.replace("-", "")
            assert http_id[:24] == run_prefix and sql_id[:24] == run_prefix, (seq, results)
            assert http_id != sql_id and len(http_id) == len(sql_id) == 32


def test_runs_spread_over_three_nodes(
    nats_server: Any,
    postgres_url: str,
    db: Db,
    make_sink: Callable[..., HttpSink],
    journal_cluster: str,
    table: str,
    tmp_path: Path,
) -> None:
    responder = SwitchableResponder()
    path = "/spread"
    url = make_sink(responder).url + path
    plans = cluster_plans(3, journal_cluster, nats_server.url, postgres_url, tmp_path)
    with Nodes(plans, tmp_path) as nodes:
        started = time.monotonic()
        results = EventPoster(nodes.nodes, WORKFLOW, 300, url, table).start().join()
        assert results.refused == {}, results.refused
        acknowledged = set(results.acknowledged)
        wait_for_delivery(responder, path, db, table, acknowledged, 60, nodes.logs)
        elapsed = time.monotonic() - started
        nodes.stop_alive()

    http, sql = http_arrivals(responder, path), sql_arrivals(db, table)
    assert_delivered_once(http, sql, acknowledged, results)
    ran = runs_per_node(responder, path)
    print(
        f"\nspread: {len(acknowledged)} acknowledged (by node {dict(results.per_node())}), "
        f"ran by node {dict(ran)}, all delivered in {elapsed:.1f} s"
    )
    assert sum(ran.values()) == len(acknowledged), ran  # each run on exactly one node
    assert len(ran) >= 2, f"only {dict(ran)} ran runs"


def test_events_posted_to_one_node_run_on_the_others_too(
    nats_server: Any,
    postgres_url: str,
    db: Db,
    make_sink: Callable[..., HttpSink],
    journal_cluster: str,
    table: str,
    tmp_path: Path,
) -> None:
    """The work queue is shared: a node that receives every event does not run them all."""
    responder = SwitchableResponder()
    path = "/one-door"
    url = make_sink(responder).url + path
    plans = cluster_plans(3, journal_cluster, nats_server.url, postgres_url, tmp_path)
    with Nodes(plans, tmp_path) as nodes:
        door = nodes["node-1"]
        # Runs that take a while keep node-1 busy, so the others pull from the queue.
        results = EventPoster([door], WORKFLOW, 90, url, table, delay=0.05).start().join()
        assert results.refused == {}, results.refused
        acknowledged = set(results.acknowledged)
        wait_for_delivery(responder, path, db, table, acknowledged, 60, nodes.logs)
        nodes.stop_alive()

    assert_delivered_once(
        http_arrivals(responder, path), sql_arrivals(db, table), acknowledged, results
    )
    ran = runs_per_node(responder, path)
    print(f"\none door: {len(acknowledged)} posted to node-1, ran by node {dict(ran)}")
    assert sum(ran.values()) == len(acknowledged), ran
    assert len(ran) >= 2, f"every event ran where it was posted: {dict(ran)}"


def test_kill_9_of_one_node_under_load_loses_nothing(
    nats_server: Any,
    postgres_url: str,
    db: Db,
    make_sink: Callable[..., HttpSink],
    journal_cluster: str,
    table: str,
    tmp_path: Path,
) -> None:
    responder = SwitchableResponder()
    path = "/kill"
    url = make_sink(responder).url + path
    plans = cluster_plans(3, journal_cluster, nats_server.url, postgres_url, tmp_path)
    with Nodes(plans, tmp_path) as nodes:
        victim = nodes["node-2"]
        # Runs take a little time, so the victim has runs in flight and sends unconfirmed.
        poster = EventPoster(nodes.nodes, WORKFLOW, 600, url, table, delay=0.1).start()
        deadline = time.monotonic() + 60
        while poster.acknowledged_count < 200 and poster.posting:
            assert time.monotonic() < deadline, "the nodes acknowledged too few events"
            time.sleep(0.01)
        victim.kill_9()
        killed_at = victim.killed_at
        assert killed_at is not None
        before_kill = list(responder.delivered_to(path))
        results = poster.join()
        acknowledged = set(results.acknowledged)
        delivered_at = wait_for_delivery(
            responder, path, db, table, acknowledged, ACK_WAIT + 20, nodes.logs
        )
        nodes.stop_alive()  # drained: what arrives, has arrived

    http, sql = http_arrivals(responder, path), sql_arrivals(db, table)
    assert_delivered_once(http, sql, acknowledged, results)
    victim_runs_before = {r.json()["seq"] for r in before_kill if r.json()["node"] == "node-2"}
    after_kill = [r for r in responder.delivered_to(path) if r.received_at > killed_at]
    taken_over = [r.received_at for r in after_kill if r.json()["node"] == "node-2"]
    takeover = f"{max(taken_over) - killed_at:.1f} s" if taken_over else "-"
    # Events journaled before the kill that first arrived an ack wait later: node-2 held them.
    first_arrival: dict[int, float] = {}
    for request in responder.delivered_to(path):
        seq = request.json()["seq"]
        first_arrival[seq] = min(first_arrival.get(seq, request.received_at), request.received_at)
    events_taken_over = [
        seq
        for seq, at in results.acknowledged_at.items()
        if at < killed_at and first_arrival[seq] > killed_at + ACK_WAIT * 0.8
    ]
    print(
        f"\nkill -9: {len(acknowledged) + len(results.refused)} posted, "
        f"{len(acknowledged)} acknowledged (by node {dict(results.per_node())}), "
        f"{len(results.refused)} refused; node-2 had delivered {len(victim_runs_before)} "
        f"runs' HTTP sends at the kill; {len(taken_over)} of its runs' HTTP sends "
        f"delivered after it (taken over, the last {takeover} after the kill); "
        f"{len(events_taken_over)} events acknowledged before the kill first delivered "
        f"after the ack wait (re-run elsewhere); "
        f"runs by node {dict(runs_per_node(responder, path))}; "
        f"HTTP repeats {http.duplicates}; everything delivered "
        f"{delivered_at - killed_at:.1f} s after the kill"
    )
    refused_on_survivors = {
        seq: why for seq, why in results.refused.items() if not why.startswith("node-2")
    }
    assert refused_on_survivors == {}, refused_on_survivors


def test_workflow_ids_with_subject_characters(
    nats_server: Any,
    postgres_url: str,
    db: Db,
    make_sink: Callable[..., HttpSink],
    journal_cluster: str,
    table: str,
    tmp_path: Path,
) -> None:
    responder = SwitchableResponder()
    path = "/subjects"
    url = make_sink(responder).url + path
    plans = cluster_plans(1, journal_cluster, nats_server.url, postgres_url, tmp_path)
    with Nodes(plans, tmp_path) as nodes:
        (node,) = nodes.nodes
        response = httpx.post(
            node.events_url(SUBJECT_CHARACTERS_WORKFLOW), json=event(7, url, table), timeout=15
        )
        assert response.status_code == 202, response.text
        run_id = response.json()["run_id"]
        wait_for_delivery(responder, path, db, table, {7}, 30, nodes.logs)
        run = httpx.get(f"{node.url}/runs/{run_id}", timeout=15).json()
        nodes.stop_alive()

    assert run["workflow_id"] == SUBJECT_CHARACTERS_WORKFLOW and run["status"] == "succeeded", run
    assert_delivered_once(http_arrivals(responder, path), sql_arrivals(db, table), {7}, None)


def test_publish_from_code(
    nats_server: Any,
    postgres_url: str,
    db: Db,
    make_runtime: Callable[..., Runtime],
    make_sink: Callable[..., HttpSink],
    journal_cluster: str,
    table: str,
    tmp_path: Path,
) -> None:
    responder = SwitchableResponder()
    path = "/publish"
    url = make_sink(responder).url + path
    runtimes = {}
    for node_id in ("code-a", "code-b"):
        rt = make_runtime(
            start=False,
            journal=nats_server.url,
            cluster=journal_cluster,
            node_id=node_id,
            journal_ack_wait=ACK_WAIT,
            database_url=postgres_url,
            data_dir=tmp_path / node_id,
            batch_max_age=0.2,
        )
        runtimes[node_id] = register(rt, node_id).start()

    publisher = runtimes["code-a"]
    run_ids = {seq: publisher.publish(WORKFLOW, event(seq, url, table)) for seq in range(20)}
    assert len(set(run_ids.values())) == 20
    acknowledged = set(run_ids)
    assert publisher.flush(timeout=30)  # every send it journaled is final, wherever delivered
    wait_for_delivery(responder, path, db, table, acknowledged, 30, lambda: "")
    for rt in runtimes.values():
        assert rt.flush(timeout=30)

    http, sql = http_arrivals(responder, path), sql_arrivals(db, table)
    assert_delivered_once(http, sql, acknowledged, None)
    ran: Counter[str] = runs_per_node(responder, path)
    assert set(ran) <= set(runtimes) and sum(ran.values()) == 20, ran
    print(f"\npublish: 20 published on code-a, ran by {dict(ran)}")
