"""Runtimes against a three-server NATS cluster, and the loss of one server under load (issue 17).

Each test gets its own cluster of three nats-servers on loopback
(tests/nats_support.py `NatsCluster`), journals with
`OUTBOUND_JOURNAL=nats://a,nats://b,nats://c` and `OUTBOUND_JOURNAL_REPLICAS=3`
under a cluster name of its own, and reads what arrived with its own clients
(tests/cluster_support.py: `outbound serve` nodes, the HTTP sink and the SQL
table, by `seq`). Servers and nodes are killed on the way out, whatever happens.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest
from cluster_app import WORKFLOW, register
from cluster_support import ClusterCase, EventPoster, Node, NodePlan, Nodes
from nats_support import NatsCluster
from test_cluster import assert_delivered_once

from outbound import Runtime

ACK_WAIT = 3.0  # OUTBOUND_JOURNAL_ACK_WAIT of every node
REPLICAS = 3  # OUTBOUND_JOURNAL_REPLICAS: one copy on each server


@pytest.fixture
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three nats-servers in one JetStream cluster, for one test (a test may kill one)."""
    with NatsCluster(tmp_path_factory.mktemp("nats-cluster")) as cluster:
        yield cluster


@pytest.fixture
def case(nats_cluster: NatsCluster, make_case: Callable[[str], ClusterCase]) -> ClusterCase:
    """This test's cluster name on the NATS cluster, its HTTP sink and SQL table."""
    return make_case(nats_cluster.urls)


def start_nodes(case: ClusterCase, count: int) -> Nodes:
    """`count` ready `outbound serve` nodes whose journal streams have three replicas.

    Started together, as a deploy would: they make the replicated streams and the node
    bucket at the same time, and each first use waits for the leader's election.
    """
    plans = [
        NodePlan(
            f"node-{n}",
            case.cluster,
            case.journal,
            case.database_url,
            case.work_dir / f"node-{n}",
            ack_wait=ACK_WAIT,
            replicas=REPLICAS,
        )
        for n in range(1, count + 1)
    ]
    return Nodes(plans, case.work_dir)


def journal_streams(nats_cluster: NatsCluster, cluster: str) -> list[str]:
    """The streams of one cluster name: its journal streams and its node bucket's."""
    prefix = cluster.upper().replace("-", "_")
    return [
        name
        for name in nats_cluster.streams()
        if name.startswith(f"{prefix}_") or name.startswith(f"KV_{prefix}_")
    ]


def health_status(node: Node) -> str:
    """What the node's `GET /healthz` answers: its status code, or the error."""
    try:
        return str(httpx.get(f"{node.url}/healthz", timeout=2).status_code)
    except httpx.HTTPError as error:
        return type(error).__name__


def test_streams_are_replicated_on_every_server(
    case: ClusterCase, nats_cluster: NatsCluster, make_runtime: Callable[..., Runtime]
) -> None:
    rt = make_runtime(
        start=False,
        journal=case.journal,
        journal_replicas=REPLICAS,
        cluster=case.cluster,
        node_id="replicated",
        journal_ack_wait=ACK_WAIT,
        database_url=case.database_url,
        batch_max_age=0.2,
    )
    register(rt, "replicated").start()
    run_ids = {seq: rt.publish(WORKFLOW, case.event(seq)) for seq in range(10)}
    case.wait_for_delivery(set(run_ids), 30, lambda: "")
    assert rt.flush(timeout=30)

    streams = journal_streams(nats_cluster, case.cluster)
    prefix = case.cluster.upper()
    # The sends, the events (runs anywhere) and the node list (liveness) at least.
    assert {f"{prefix}_SENDS", f"{prefix}_EVENTS", f"KV_{prefix}_NODES"} <= set(streams), streams
    servers = {nats_cluster.server_name(index) for index in range(3)}
    for stream in streams:
        info = nats_cluster.stream_info(stream)
        assert info.config.num_replicas == REPLICAS, (stream, info.config)
        peers = {peer.name for peer in info.cluster.replicas or []}
        assert len(peers) == REPLICAS - 1 and peers | {info.cluster.leader} == servers, (
            stream,
            info.cluster,
        )
    assert_delivered_once(*case.arrivals(), set(run_ids), run_ids)


def test_kill_9_of_a_nats_server_under_load_loses_nothing(
    case: ClusterCase, nats_cluster: NatsCluster
) -> None:
    """The server killed is the one most nodes are connected to (the meta leader among
    equals), made the leader of the events stream (every POST waits for it), the sends
    stream (every run's sends) and the node list (heartbeats) first: its loss makes every
    part of the runtime wait for an election and some nodes reconnect."""
    with start_nodes(case, 3) as nodes:
        node_ids = {node.node_id for node in nodes.nodes}
        connected = {index: set(nats_cluster.clients(index)) & node_ids for index in range(3)}
        meta_leader = nats_cluster.meta_leader()
        victim = max(connected, key=lambda index: (len(connected[index]), index == meta_leader))
        assert connected[victim], connected
        prefix = case.cluster.upper()
        led = [f"{prefix}_EVENTS", f"{prefix}_SENDS", f"KV_{prefix}_NODES"]
        for stream in led:
            nats_cluster.move_leader(stream, victim)

        slow = functools.partial(case.event, delay=0.05)  # runs in flight at the kill
        poster = EventPoster(nodes.nodes, WORKFLOW, 300, slow).start()
        deadline = time.monotonic() + 60
        while poster.acknowledged_count < 100 and poster.posting:
            assert time.monotonic() < deadline, "the nodes acknowledged too few events"
            time.sleep(0.01)
        killed_at = time.time()
        nats_cluster.kill(victim)
        # While posting goes on: when every node is connected to a server left, and which
        # nodes' `GET /healthz` said degraded (the journal disconnected), how often.
        reconnected_at: float | None = None
        degraded: Counter[str] = Counter()
        while poster.posting:
            if reconnected_at is None and node_ids <= nats_cluster.connected_clients():
                reconnected_at = time.time()
            for node in nodes.nodes:
                if health_status(node) != "200":
                    degraded[node.node_id] += 1
            time.sleep(0.1)
        results = poster.join()
        acknowledged = set(results.acknowledged)
        delivered_at = case.wait_for_delivery(acknowledged, ACK_WAIT + 30, nodes.logs)

        # They reconnected by themselves: the same processes, healthy, on the servers left.
        deadline = time.monotonic() + 30
        while not node_ids <= nats_cluster.connected_clients() or any(
            health_status(node) != "200" for node in nodes.nodes
        ):
            assert time.monotonic() < deadline, nodes.logs()
            time.sleep(0.1)
        reconnected_at = reconnected_at or time.time()
        assert all(node.process.poll() is None for node in nodes.nodes), nodes.logs()
        new_leaders = {stream: nats_cluster.stream_info(stream).cluster.leader for stream in led}
        nodes.stop_alive()  # drained: what arrives, has arrived

    http, sql = case.arrivals()
    assert_delivered_once(http, sql, acknowledged, results.run_ids)
    # Refusals are 503s (the journal did not store the event within OUTBOUND_JOURNAL_WAIT
    # while the new leader was elected), never a node that failed: every node kept serving.
    refusals = Counter(why.split(": ", 1)[1] for why in results.refused.values())
    assert set(refusals) <= {"503"}, results.refused
    after_kill = {seq: at for seq, at in results.acknowledged_at.items() if at > killed_at + 0.5}
    acknowledged_after = Counter(results.acknowledged[seq] for seq in after_kill)
    assert set(acknowledged_after) == node_ids, acknowledged_after  # every node serves again
    # The longest wait between two acknowledgements after the kill: posting paused this long.
    times = sorted(at for at in results.acknowledged_at.values() if at > killed_at)
    pause = max(b - a for a, b in zip([killed_at, *times], times, strict=False))
    # A 503 says "not acknowledged", not "not stored": the publish may have been stored
    # after the wait ran out (its answer late), and then the event ran.
    refused_but_ran = sorted(set(results.refused) & set(http.copies))
    print(
        f"\nnats kill -9: n{victim + 1} killed (meta leader: n{meta_leader + 1}; led "
        f"{', '.join(led)}; clients {sorted(connected[victim])}); new leaders {new_leaders}; "
        f"{len(acknowledged) + len(results.refused)} posted, {len(acknowledged)} acknowledged "
        f"({len(times)} after the kill), refused {dict(refusals)} (of which ran anyway: "
        f"{len(refused_but_ran)}); posting paused at most "
        f"{pause:.1f} s; all nodes reconnected {reconnected_at - killed_at:.1f} s after the "
        f"kill; healthz not ok (polls by node) {dict(degraded)}; everything delivered "
        f"{delivered_at - killed_at:.1f} s after the kill; HTTP repeats {http.duplicates}; "
        f"runs by node {dict(case.runs_per_node())}"
    )
