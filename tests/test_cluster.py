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

import asyncio
import functools
import logging
import pickle
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from cluster_app import SUBJECT_CHARACTERS_WORKFLOW, WORKFLOW, register
from cluster_support import ClusterCase, EventPoster
from journal_support import Arrivals
from waiting import wait_until

from outbound import Runtime

ACK_WAIT = 3.0  # OUTBOUND_JOURNAL_ACK_WAIT of every node: how soon a dead node's work moves


def assert_delivered_once(
    http: Arrivals, sql: Arrivals, acknowledged: set[int], run_ids: dict[int, str]
) -> None:
    """Every acknowledged number in both; no SQL duplicate; HTTP repeats only under one key;
    and the delivery ids derive from the run id (its first 24 hex digits; `run_ids`: by seq)."""
    assert http.missing(acknowledged) == [], http.summary(acknowledged)
    assert sql.missing(acknowledged) == [], sql.summary(acknowledged)
    assert sql.duplicates == 0, sql.summary(acknowledged)
    assert http.with_differing_ids() == {}, http.summary(acknowledged)
    for seq in acknowledged:
        run_prefix = run_ids[seq][:24]
        (http_id,) = http.ids[seq]
        (sql_id,) = sql.ids[seq]
        sql_id = sql_id.replace("-", "")
        assert http_id[:24] == run_prefix and sql_id[:24] == run_prefix, (seq, run_ids[seq])
        assert http_id != sql_id and len(http_id) == len(sql_id) == 32


def test_runs_spread_over_three_nodes(case: ClusterCase) -> None:
    with case.start_nodes(3) as nodes:
        started = time.monotonic()
        results = EventPoster(nodes.nodes, WORKFLOW, 300, case.event).start().join()
        assert results.refused == {}, results.refused
        acknowledged = set(results.acknowledged)
        case.wait_for_delivery(acknowledged, 60, nodes.logs)
        elapsed = time.monotonic() - started
        nodes.stop_alive()

    assert_delivered_once(*case.arrivals(), acknowledged, results.run_ids)
    ran = case.runs_per_node()
    print(
        f"\nspread: {len(acknowledged)} acknowledged (by node {dict(results.per_node())}), "
        f"ran by node {dict(ran)}, all delivered in {elapsed:.1f} s"
    )
    assert sum(ran.values()) == len(acknowledged), ran  # each run on exactly one node
    assert len(ran) >= 2, f"only {dict(ran)} ran runs"


def test_events_posted_to_one_node_run_on_the_others_too(case: ClusterCase) -> None:
    """The work queue is shared: a node that receives every event does not run them all."""
    with case.start_nodes(3) as nodes:
        # Runs that take a while keep node-1 busy, so the others pull from the queue.
        slow = functools.partial(case.event, delay=0.05)
        results = EventPoster([nodes["node-1"]], WORKFLOW, 90, slow).start().join()
        assert results.refused == {}, results.refused
        acknowledged = set(results.acknowledged)
        case.wait_for_delivery(acknowledged, 60, nodes.logs)
        nodes.stop_alive()

    assert_delivered_once(*case.arrivals(), acknowledged, results.run_ids)
    ran = case.runs_per_node()
    print(f"\none door: {len(acknowledged)} posted to node-1, ran by node {dict(ran)}")
    assert sum(ran.values()) == len(acknowledged), ran
    assert len(ran) >= 2, f"every event ran where it was posted: {dict(ran)}"


def test_kill_9_of_one_node_under_load_loses_nothing(case: ClusterCase) -> None:
    with case.start_nodes(3) as nodes:
        victim = nodes["node-2"]
        # Runs take a little time, so the victim has runs in flight and sends unconfirmed.
        slow = functools.partial(case.event, delay=0.1)
        poster = EventPoster(nodes.nodes, WORKFLOW, 600, slow).start()
        deadline = time.monotonic() + 60
        while poster.acknowledged_count < 200 and poster.posting:
            assert time.monotonic() < deadline, "the nodes acknowledged too few events"
            time.sleep(0.01)
        victim.kill_9()
        killed_at = victim.killed_at
        assert killed_at is not None
        before_kill = list(case.responder.delivered_to(case.path))
        results = poster.join()
        acknowledged = set(results.acknowledged)
        delivered_at = case.wait_for_delivery(acknowledged, ACK_WAIT + 20, nodes.logs)
        nodes.stop_alive()  # drained: what arrives, has arrived

    http, sql = case.arrivals()
    assert_delivered_once(http, sql, acknowledged, results.run_ids)
    refused_on_survivors = {
        seq: why for seq, why in results.refused.items() if not why.startswith("node-2")
    }
    assert refused_on_survivors == {}, refused_on_survivors

    # The figures: what node-2 had done, and what the others took over from it.
    delivered = case.responder.delivered_to(case.path)
    victim_runs_before = {r.json()["seq"] for r in before_kill if r.json()["node"] == "node-2"}
    taken_over = [
        r.received_at
        for r in delivered
        if r.received_at > killed_at and r.json()["node"] == "node-2"
    ]
    takeover = f"{max(taken_over) - killed_at:.1f} s" if taken_over else "-"
    # Events journaled before the kill that first arrived an ack wait later: node-2 held them.
    first_arrival: dict[int, float] = {}
    for request in delivered:
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
        f"after the ack wait (re-run elsewhere); runs by node {dict(case.runs_per_node())}; "
        f"HTTP repeats {http.duplicates}; everything delivered "
        f"{delivered_at - killed_at:.1f} s after the kill"
    )


def test_workflow_ids_with_subject_characters(case: ClusterCase) -> None:
    with case.start_nodes(1) as nodes:
        (node,) = nodes.nodes
        url = node.events_url(SUBJECT_CHARACTERS_WORKFLOW)  # URL-encoded
        response = httpx.post(url, json=case.event(7), timeout=15)
        assert response.status_code == 202, response.text
        run_id = response.json()["run_id"]
        case.wait_for_delivery({7}, 30, nodes.logs)
        run = httpx.get(f"{node.url}/runs/{run_id}", timeout=15).json()
        nodes.stop_alive()

    assert run["workflow_id"] == SUBJECT_CHARACTERS_WORKFLOW and run["status"] == "succeeded", run
    assert_delivered_once(*case.arrivals(), {7}, {7: run_id})


def test_publish_from_code(case: ClusterCase, make_runtime: Callable[..., Runtime]) -> None:
    runtimes = {}
    for node_id in ("code-a", "code-b"):
        rt = make_runtime(
            start=False,
            journal=case.journal,
            cluster=case.cluster,
            node_id=node_id,
            journal_ack_wait=ACK_WAIT,
            database_url=case.database_url,
            data_dir=case.work_dir / node_id,
            batch_max_age=0.2,
        )
        runtimes[node_id] = register(rt, node_id).start()

    publisher = runtimes["code-a"]
    run_ids = {seq: publisher.publish(WORKFLOW, case.event(seq)) for seq in range(20)}
    assert len(set(run_ids.values())) == 20
    acknowledged = set(run_ids)
    assert publisher.flush(timeout=30)  # every send it journaled is final, wherever delivered
    case.wait_for_delivery(acknowledged, 30, lambda: "")
    for rt in runtimes.values():
        assert rt.flush(timeout=30)

    assert_delivered_once(*case.arrivals(), acknowledged, run_ids)
    ran = case.runs_per_node()
    assert set(ran) <= set(runtimes) and sum(ran.values()) == 20, ran
    print(f"\npublish: 20 published on code-a, ran by {dict(ran)}")


def test_an_event_of_a_newer_format_is_left_for_a_node_that_reads_it(
    case: ClusterCase, make_runtime: Callable[..., Runtime], caplog: Any
) -> None:
    """A rolling upgrade: an event a newer Outbound journaled (format version 2) is put
    back for another node, again and again, never dropped; the node runs the others."""
    import nats

    caplog.set_level(logging.WARNING, logger="outbound.journal.cluster")
    rt = make_runtime(
        start=False,
        journal=case.journal,
        cluster=case.cluster,
        node_id="older-node",
        journal_ack_wait=1.0,
        database_url=case.database_url,
        data_dir=case.work_dir / "older-node",
        batch_max_age=0.2,
    )
    rt = register(rt, "older-node").start()
    events_subject = rt._machinery.journal.events_subject

    async def publish_newer() -> None:
        connection = await nats.connect(case.journal)
        newer = b"OBE2" + pickle.dumps(("r-newer", WORKFLOW, case.event(0)), protocol=5)
        await connection.jetstream().publish(events_subject, newer)
        await connection.close()

    asyncio.run(publish_newer())

    def left_for_another_node() -> int:
        return sum("left for another node" in record.getMessage() for record in caplog.records)

    wait_until(lambda: left_for_another_node() >= 2, timeout=20)  # put back, offered again
    assert not any("dropped" in record.getMessage() for record in caplog.records)
    run_id = rt.publish(WORKFLOW, case.event(1))
    case.wait_for_delivery({1}, 30, lambda: "")
    assert_delivered_once(*case.arrivals(), {1}, {1: run_id})


def test_a_full_cluster_queue_refuses_publishes_and_loses_none_it_took(
    case: ClusterCase, make_runtime: Callable[..., Runtime]
) -> None:
    """Nodes that cannot keep up push back: once `OUTBOUND_JOURNAL_MAX_QUEUED` events wait
    for a node, `rt.publish` gives up with `ClusterFull` (a `Busy`, the API's 503) and
    nothing of it is run; every event it took runs once room comes back."""
    from outbound import Busy
    from outbound.journal.cluster import ClusterFull

    release = threading.Event()
    ran: list[int] = []
    rt = make_runtime(
        start=False,
        journal=case.journal,
        cluster=case.cluster,
        node_id="busy-node",
        max_pending=1,  # one run at a time: the rest of the events wait in the queue
        journal_max_queued=3,
        data_dir=case.work_dir / "busy-node",
    )

    @rt.workflow("p_slow")
    def slow(event: Any, ctx: Any) -> None:
        release.wait(30)
        ran.append(event["n"])

    rt.start()
    try:
        accepted, refused = [], []
        for n in range(8):
            try:
                rt.publish("p_slow", {"n": n}, timeout=1.2)  # the queue is read every 0.5 s
            except ClusterFull as error:
                assert isinstance(error, Busy)
                assert "OUTBOUND_JOURNAL_MAX_QUEUED=3" in str(error), error
                refused.append(n)
            else:
                accepted.append(n)
        # One runs (it holds the node's room), three wait: the rest were refused (the bound
        # is soft: the count is read every 0.5 s, so one more may pass).
        assert 4 <= len(accepted) <= 5 and refused == list(range(len(accepted), 8)), refused
        assert rt.stats()["journal"]["cluster"]["queued_events"] >= 3
        from outbound.api.metrics import RuntimeMetrics

        exposed = RuntimeMetrics(rt).render().decode()
        gauge = re.search(r"^outbound_cluster_queued_events (\S+)$", exposed, re.MULTILINE)
        assert gauge is not None and float(gauge.group(1)) >= 3, exposed
    finally:
        release.set()
    wait_until(lambda: sorted(ran) == accepted, timeout=30)
    rt.publish("p_slow", {"n": 99}, timeout=5)  # room again
    wait_until(lambda: 99 in ran, timeout=30)
    assert sorted(ran) == [*accepted, 99]


def test_a_node_whose_settings_change_a_shared_streams_limits_says_so(
    case: ClusterCase, make_runtime: Callable[..., Runtime], caplog: Any
) -> None:
    caplog.set_level(logging.WARNING, logger="outbound.journal.journal")
    for node_id, run_history in (("first", 100), ("second", 100), ("third", 250)):
        make_runtime(
            journal=case.journal,
            cluster=case.cluster,
            node_id=node_id,
            run_history=run_history,
            data_dir=case.work_dir / node_id,
        )
        warnings = [r.getMessage() for r in caplog.records if "other limits" in r.getMessage()]
        if node_id != "third":  # the same settings: nothing to say
            assert warnings == [], warnings
    [warning] = warnings
    assert "_RUN_RECORDS was made with other limits (max_msgs 100 -> 250)" in warning, warning
    assert "give every node of the cluster the same settings" in warning
