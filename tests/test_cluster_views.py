"""SSE streams, emits and the run inspector across a cluster of real processes (issue 17, 1-3).

Each test starts its `outbound serve --app cluster_app:rt` nodes (two or three;
tests/cluster_support.py, a cluster name of its own) on the module's
nats-server and the session's Postgres, posts events round-robin to their
HTTP APIs and reads what every node shows with its own clients: SSE streams
(tests/sse_support.py's parser), `GET /workflows/{id}/emits`, `GET /runs/{id}`,
and the HTTP sink, where each listener and `deliver` run names the node that
ran it. A runtime in this process joins a cluster where a test needs runs in
a known place (`rt.run` runs locally) or `rt.deliveries`; a `PausableProxy`
holds one node's NATS traffic to make it fall behind. Nodes are killed on the
way out, whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from cluster_app import (
    EMITTER,
    FAILING_WORKFLOW,
    LISTENER,
    LOOP_WORKFLOW,
    SSE_CHANNEL,
    SSE_SUBJECT_CHARACTERS_WORKFLOW,
    SSE_WORKFLOW,
    WORKFLOW,
    register,
)
from cluster_support import (
    ClusterCase,
    Node,
    Nodes,
    PausableProxy,
    StreamReader,
    post_round_robin,
)
from journal_support import http_arrivals
from sse_support import Event
from waiting import wait_until

from outbound import Runtime
from outbound.actors.ids import new_id

#: The nodes' keepalive: a `StreamReader` notices its `close()` at the next one.
KEEPALIVE = 0.3
#: How long a run's record, an emit or an SSE event may take to show on the other nodes.
SPREAD_TIMEOUT = 20.0


def start_nodes(case: ClusterCase, count: int = 3, first: int = 1, **settings: Any) -> Nodes:
    """`count` nodes, from `node-<first>` on, that send SSE keepalives often."""
    return case.start_nodes(count, first, sse_keepalive=KEEPALIVE, **settings)


def wait_subscribed(nodes: list[Node], expected: dict[str, int]) -> None:
    """Wait until each node (by id) counts `expected` SSE subscribers."""
    deadline = time.monotonic() + SPREAD_TIMEOUT
    while True:
        counted = {node.node_id: node.sse_subscribers() for node in nodes}
        if all(counted[node_id] >= count for node_id, count in expected.items()):
            return
        assert time.monotonic() < deadline, f"subscribers {counted}, expected {expected}"
        time.sleep(0.05)


def subscribe(node: Node, last_event_id: str | None = None) -> StreamReader:
    """A subscriber to the SSE workflow on `node`, resuming after `last_event_id` if given."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    return StreamReader(node.sse_url(SSE_WORKFLOW), headers)


def payload(event: Event) -> dict[str, Any]:
    return json.loads(event.data)  # type: ignore[no-any-return]


def assert_stream_events(events: list[Event]) -> None:
    """Events of the SSE workflow: its channel, and ids that only increase."""
    assert {event.type for event in events} <= {SSE_CHANNEL}, events
    ids = [int(event.last_event_id) for event in events]
    assert ids == sorted(set(ids)), f"ids do not increase: {ids}"


def stream_last_seq(nats_url: str, stream: str) -> int:
    """The sequence number of the last message stored in JetStream stream `stream`."""

    async def read() -> int:
        import nats

        client = await nats.connect(nats_url)
        try:
            return int((await client.jetstream().stream_info(stream)).state.last_seq)
        finally:
            await client.close()

    return asyncio.run(read())


def post_stream(nodes: Nodes, seqs: range) -> dict[int, str]:
    return post_round_robin(nodes.nodes, SSE_WORKFLOW, {seq: {"seq": seq} for seq in seqs})


def cluster_runtime(
    case: ClusterCase, make_runtime: Callable[..., Runtime], node_id: str
) -> Runtime:
    """A started runtime in this process, a node of the case's cluster with cluster_app's
    workflows (its `rt.run` runs here)."""
    rt = make_runtime(
        start=False,
        journal=case.journal,
        cluster=case.cluster,
        node_id=node_id,
        database_url=case.database_url,
        data_dir=case.work_dir / node_id,
    )
    return register(rt, node_id).start()


# -- 1. SSE ----------------------------------------------------------------------------


def test_sse_subscribers_on_every_node_see_every_nodes_events_alike(case: ClusterCase) -> None:
    with start_nodes(case) as nodes:
        readers = {node.node_id: subscribe(node) for node in nodes.nodes}
        wait_subscribed(nodes.nodes, {node.node_id: 1 for node in nodes.nodes})
        run_ids: dict[int, str] = {}
        # Rounds of 30 until runs on every node sent some (where a run goes is NATS's choice).
        for first in range(0, 150, 30):
            run_ids |= post_stream(nodes, range(first, first + 30))
            seen = {
                node_id: reader.wait_for(len(run_ids), SPREAD_TIMEOUT)
                for node_id, reader in readers.items()
            }
            if len({payload(event)["node"] for event in seen["node-1"]}) == 3:
                break
        received = {node_id: reader.close() for node_id, reader in readers.items()}
        last_stored = stream_last_seq(case.journal, f"{case.cluster}_SSE".upper())
        records = ran_records(nodes, run_ids.values())
        details = {seq: records[run_id] for seq, run_id in run_ids.items()}
        nodes.stop_alive()

    reference = received["node-1"]
    for node_id, events in received.items():
        assert events == reference, f"{node_id} saw another sequence than node-1"
    assert_stream_events(reference)
    assert sorted(payload(event)["seq"] for event in reference) == sorted(run_ids)
    by_node = {payload(event)["node"] for event in reference}
    assert by_node == {"node-1", "node-2", "node-3"}, by_node
    # The ids are the numbers of the cluster's SSE stream (only this workflow sent to it).
    assert int(reference[-1].last_event_id) == last_stored
    # Each SSE send's delivery detail names the id its event has on every stream.
    sse_ids = {payload(event)["seq"]: event.last_event_id for event in reference}
    for seq, record in details.items():
        (delivery,) = record["deliveries"]
        assert delivery["status"] == "delivered", record
        assert str(delivery["detail"]["event_id"]) == sse_ids[seq], (seq, delivery)
    print(f"\nsse: {len(reference)} events, the same on 3 nodes, from nodes {sorted(by_node)}")


def test_sse_workflows_share_one_numbering(case: ClusterCase) -> None:
    """One stream numbers every workflow's events: each workflow's ids have gaps, none is
    used twice (a workflow id with the characters NATS subjects reserve included)."""
    with start_nodes(case, count=2) as nodes:
        one, two = nodes.nodes
        plain = subscribe(one)
        special = StreamReader(two.sse_url(SSE_SUBJECT_CHARACTERS_WORKFLOW))
        wait_subscribed(nodes.nodes, {"node-1": 1, "node-2": 1})
        for seq in range(10):  # alternately: plain on even numbers, special on odd ones
            workflow_id = SSE_SUBJECT_CHARACTERS_WORKFLOW if seq % 2 else SSE_WORKFLOW
            post_round_robin([nodes.nodes[seq // 2 % 2]], workflow_id, {seq: {"seq": seq}})
        plain_events, special_events = plain.wait_for(5), special.wait_for(5)
        last_stored = stream_last_seq(case.journal, f"{case.cluster}_SSE".upper())
        final = [plain.close(), special.close()]
        nodes.stop_alive()

    assert final == [plain_events, special_events]
    assert_stream_events(plain_events)
    assert_stream_events(special_events)
    assert sorted(payload(event)["seq"] for event in plain_events) == [0, 2, 4, 6, 8]
    assert sorted(payload(event)["seq"] for event in special_events) == [1, 3, 5, 7, 9]
    ids = [int(event.last_event_id) for event in plain_events + special_events]
    assert sorted(ids) == list(range(1, last_stored + 1)) and last_stored == 10, ids


def test_sse_resume_on_another_node_and_history(case: ClusterCase) -> None:
    history = 5
    with start_nodes(case, sse_history=history) as nodes:
        one, two, three = nodes.nodes
        watcher = subscribe(three)  # sees everything, live
        first_reader = subscribe(one)
        wait_subscribed(nodes.nodes, {"node-1": 1, "node-3": 1})

        post_stream(nodes, range(0, 8))
        read_on_one = first_reader.wait_for(8)
        first_reader.close()
        post_stream(nodes, range(8, 12))  # while no one reads on node-1 or node-2
        watcher.wait_for(12)
        # Back on another node with the last id seen: the 4 missed, then live ones.
        resumed = subscribe(two, last_event_id=read_on_one[-1].last_event_id)
        resumed.wait_for(4)
        post_stream(nodes, range(12, 16))
        everything = watcher.wait_for(16)
        resumed_events = resumed.wait_for(8)
        # ?lastEventId= on a third node does the same.
        by_query = StreamReader(
            f"{three.sse_url(SSE_WORKFLOW)}?lastEventId={everything[11].last_event_id}"
        )
        by_query_events = by_query.wait_for(4)
        # A new subscriber: the last `history` events only.
        newcomer = subscribe(one)
        newcomer_events = newcomer.wait_for(history)
        streams = [watcher, resumed, by_query, newcomer]
        final = [reader.close() for reader in streams]  # nothing more came in the meantime
        nodes.stop_alive()

    assert len(everything) == 16, everything
    assert_stream_events(everything)
    assert sorted(payload(event)["seq"] for event in everything) == list(range(16))
    assert read_on_one == everything[:8]
    assert resumed_events == everything[8:16], "a gap or a repeat after moving to node-2"
    assert by_query_events == everything[12:16]
    assert newcomer_events == everything[-history:]
    assert final == [everything, everything[8:16], everything[12:16], everything[-history:]]


def test_sse_resume_on_a_node_that_is_behind_repeats_nothing(
    case: ClusterCase, make_runtime: Callable[..., Runtime]
) -> None:
    """A client resumes on a node that has not yet read up to its Last-Event-ID: the
    events up to that id, when they reach the node, are not sent to it again."""
    producer = cluster_runtime(case, make_runtime, "code-producer")  # runs SSE sends here
    proxy = PausableProxy(case.journal)
    try:
        with (
            start_nodes(case, count=1) as ahead,
            start_nodes(case, count=1, first=2, journal=proxy.url) as behind,
        ):
            (one,), (two,) = ahead.nodes, behind.nodes
            watcher = subscribe(one)
            wait_subscribed([one], {"node-1": 1})
            proxy.pause()  # node-2 reads nothing more from NATS for now
            for seq in range(10):
                producer.run(SSE_WORKFLOW, {"seq": seq})
            read_on_one = watcher.wait_for(10)
            resumed = subscribe(two, last_event_id=read_on_one[-1].last_event_id)
            wait_subscribed([two], {"node-2": 1})
            proxy.resume()  # node-2 now reads events 1-10, then the next ones
            for seq in range(10, 13):
                producer.run(SSE_WORKFLOW, {"seq": seq})
            everything = watcher.wait_for(13)
            resumed_events = resumed.wait_for(3)
            final = [watcher.close(), resumed.close()]
            ahead.stop_alive()
            behind.stop_alive()
    finally:
        proxy.close()

    assert_stream_events(everything)
    assert resumed_events == everything[10:13], "events up to Last-Event-ID sent again"
    assert final == [everything, everything[10:13]]


def test_sse_resume_after_lost_history_says_so(case: ClusterCase) -> None:
    history = 5
    with start_nodes(case, count=2, sse_history=history) as nodes:
        one, two = nodes.nodes
        watcher = subscribe(one)
        wait_subscribed(nodes.nodes, {"node-1": 1})
        post_stream(nodes, range(12))
        everything = watcher.wait_for(12)
        kept = everything[-history:]
        # From an id older than the history: told so, then the kept history.
        lost = subscribe(two, last_event_id=everything[0].last_event_id)
        lost_events = lost.wait_for(1 + history)
        # From the id just before the kept history: nothing was lost, no notice.
        edge = subscribe(one, last_event_id=everything[-history - 1].last_event_id)
        edge_events = edge.wait_for(history)
        final = [reader.close() for reader in (watcher, lost, edge)]
        # A node started now has the same history, and says the same.
        with start_nodes(case, count=1, first=3, sse_history=history) as late:
            (late_node,) = late.nodes
            late_lost = subscribe(late_node, last_event_id=everything[0].last_event_id)
            late_lost_events = late_lost.wait_for(1 + history)
            late_new = subscribe(late_node)
            late_new_events = late_new.wait_for(history)
            late_edge = subscribe(late_node, last_event_id=everything[-history - 1].last_event_id)
            late_edge_events = late_edge.wait_for(history)
            late_final = [late_lost.close(), late_new.close(), late_edge.close()]
            late.stop_alive()
        nodes.stop_alive()

    assert_stream_events(everything)
    notice, *replayed = lost_events
    assert notice.type == "history-lost", lost_events
    assert notice.last_event_id == "", "the notice must not carry an id"
    assert json.loads(notice.data) == {
        "last_event_id": everything[0].last_event_id,
        "oldest_event_id": int(kept[0].last_event_id),
    }
    assert replayed == kept
    assert edge_events == kept
    assert final == [everything, lost_events, kept]
    assert late_lost_events == lost_events, "node-3, started late, sees another history"
    assert late_new_events == late_edge_events == kept
    assert late_final == [lost_events, kept, kept]


# -- 2. emits --------------------------------------------------------------------------


def emits_on(node: Node, workflow_id: str = EMITTER) -> list[dict[str, Any]]:
    response = node.api.get(f"/workflows/{workflow_id}/emits")
    assert response.status_code == 200, f"{node.node_id}: {response.text}"
    return response.json()["emits"]  # type: ignore[no-any-return]


def test_listener_runs_of_emits_run_anywhere_and_emits_show_everywhere(
    case: ClusterCase,
) -> None:
    total = 36
    url = case.sink_url + case.path
    with start_nodes(case) as nodes:
        events = {seq: {"seq": seq, "url": url} for seq in range(total)}
        emitter_runs = post_round_robin(nodes.nodes, EMITTER, events)
        deadline = time.monotonic() + SPREAD_TIMEOUT
        while missing := http_arrivals(case.responder, case.path).missing(range(total)):
            assert time.monotonic() < deadline, f"listener runs missing: {missing}\n{nodes.logs()}"
            time.sleep(0.1)
        emits = {node.node_id: poll_emits(node, total) for node in nodes.nodes}
        listener_run_ids = {
            emit["raw_event"]["seq"]: emit["listener_runs"][0]["run_id"] for emit in emits["node-1"]
        }
        records = ran_records(nodes, listener_run_ids.values())
        listener_records = {seq: records[run_id] for seq, run_id in listener_run_ids.items()}
        nodes.stop_alive()

    arrivals = http_arrivals(case.responder, case.path)
    sent = [request.json() for request in case.responder.delivered_to(case.path)]
    sent_by = {body["seq"]: body["node"] for body in sent}  # the node each listener ran on
    ran = case.runs_per_node()
    assert sum(ran.values()) == total, f"a listener ran on two nodes: {ran}"
    assert len(ran) >= 2, f"every listener run on one node: {dict(ran)}"
    reference = sorted(emits["node-1"], key=lambda emit: emit["id"])
    for node_id, listed in emits.items():
        assert sorted(listed, key=lambda emit: emit["id"]) == reference, node_id
    assert {emit["run_id"] for emit in reference} == set(emitter_runs.values())
    listener_runs = {}
    for emit in reference:
        seq = emit["raw_event"]["seq"]
        assert emit["workflow_id"] == EMITTER and emit["status"] == "delivered", emit
        assert emit["run_id"] == emitter_runs[seq], emit
        (listener_run,) = emit["listener_runs"]
        assert listener_run["workflow_id"] == LISTENER, emit
        listener_runs[seq] = listener_run["run_id"]
    assert len(set(listener_runs.values())) == total
    # Listener runs wait in the cluster's queue: many run elsewhere than their emit was made.
    moved = sum(
        1
        for emit in reference
        if emit["raw_event"]["emitted_on"] != sent_by[emit["raw_event"]["seq"]]
    )
    assert moved > 0, "every listener ran on its emitter's node"
    for seq, run_id in listener_runs.items():
        # The listed run is the one that sent: one delivery id, derived from its run id.
        (delivery_id,) = arrivals.ids[seq]
        assert delivery_id[:24] == run_id[:24], (seq, run_id, delivery_id)
        record = listener_records[seq]
        assert record["workflow_id"] == LISTENER and record["status"] == "succeeded", record
        assert record["value"] == {"seq": seq, "node": sent_by[seq], "depth": 1}, record
    print(
        f"\nemits: {total} emitted round-robin, listener runs by node {dict(ran)}, "
        f"{moved} on another node than their emitter"
    )


def test_an_emit_chain_across_nodes_stops_at_the_depth_limit(case: ClusterCase) -> None:
    """Each listener run carries its depth through the cluster's queue, so a cycle stops at
    `OUTBOUND_EMIT_MAX_DEPTH` whichever nodes its runs go to."""
    max_depth = 5
    with start_nodes(case, count=2, emit_max_depth=max_depth) as nodes:
        post_round_robin(nodes.nodes, LOOP_WORKFLOW, {0: {"hop": 0}})
        emits = {
            node.node_id: poll_emits(node, max_depth + 1, LOOP_WORKFLOW) for node in nodes.nodes
        }
        last = max(emits["node-1"], key=lambda emit: emit["depth"])
        stopped_run = ran_records(nodes, [last["run_id"]])[last["run_id"]]
        nodes.stop_alive()

    chain = sorted(emits["node-1"], key=lambda emit: emit["depth"])
    assert sorted(emits["node-2"], key=lambda emit: emit["depth"]) == chain
    assert [emit["depth"] for emit in chain] == list(range(max_depth + 1))
    assert [emit["raw_event"]["hop"] for emit in chain] == list(range(1, max_depth + 2))
    assert [emit["status"] for emit in chain] == ["delivered"] * max_depth + ["failed"]
    assert chain[-1]["listener_runs"] == []
    (stopped,) = stopped_run["deliveries"]
    assert stopped["status"] == "failed" and "emit chain too deep" in stopped["error"], stopped
    ran_on = {emit["raw_event"]["emitted_on"] for emit in chain}
    print(f"\nemit chain: stopped at depth {max_depth}, its runs on {sorted(ran_on)}")


def poll_emits(node: Node, count: int, workflow_id: str = EMITTER) -> list[dict[str, Any]]:
    """The node's list of emits once it holds `count` (emits made elsewhere arrive later)."""
    deadline = time.monotonic() + SPREAD_TIMEOUT
    while len(listed := emits_on(node, workflow_id)) < count:
        assert time.monotonic() < deadline, f"{node.node_id} lists {len(listed)} of {count} emits"
        time.sleep(0.1)
    return listed


# -- 3. runs ---------------------------------------------------------------------------


def run_on(node: Node, run_id: str) -> httpx.Response:
    return node.api.get(f"/runs/{run_id}")


def ended(record: dict[str, Any]) -> bool:
    """Whether a run's record is final: the run ended and every delivery is final."""
    return record.get("status") in {"succeeded", "failed"} and all(
        delivery["status"] in {"delivered", "failed"} for delivery in record.get("deliveries", [])
    )


def ran_records(nodes: Nodes, run_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """`GET /runs/{id}` of each run, once it is final and the same on every node (polled;
    the GETs of a round go out together)."""
    pending = set(run_ids)
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + SPREAD_TIMEOUT
    with ThreadPoolExecutor(8) as pool:
        while pending:
            asked = [(run_id, node) for run_id in sorted(pending) for node in nodes.nodes]
            answers = list(pool.map(lambda pair: run_on(pair[1], pair[0]), asked))
            by_run: dict[str, list[httpx.Response]] = {}
            for (run_id, _node), answer in zip(asked, answers, strict=True):
                by_run.setdefault(run_id, []).append(answer)
            for run_id, run_answers in by_run.items():
                records = [answer.json() for answer in run_answers if answer.status_code == 200]
                complete = len(records) == len(nodes.nodes) and ended(records[0])
                if complete and all(record == records[0] for record in records):
                    found[run_id] = records[0]
                    pending.discard(run_id)
            if pending:
                example = by_run[min(pending)]
                assert time.monotonic() < deadline, (
                    f"{len(pending)} runs differ, e.g.\n"
                    + "\n".join(
                        f"{node.node_id}: {answer.status_code} {answer.text}"
                        for node, answer in zip(nodes.nodes, example, strict=True)
                    )
                )
                time.sleep(0.1)
    return found


def ended_runs(notices: list[Event]) -> set[str]:
    """The run ids the inspector's notices told ended."""
    return {
        notice["run_id"]
        for notice in map(payload, notices)
        if notice.get("status") in ("succeeded", "failed")
    }


def test_run_records_answer_on_every_node(
    case: ClusterCase, make_runtime: Callable[..., Runtime]
) -> None:
    total = 30
    with start_nodes(case) as nodes:
        # node-1's inspector page listens: it is told of every node's runs, not only its own.
        notices = StreamReader(f"{nodes.nodes[0].url}/inspector/events")
        wait_until(lambda: notices.status == 200, timeout=SPREAD_TIMEOUT)
        run_ids = post_round_robin(
            nodes.nodes, WORKFLOW, {seq: case.event(seq) for seq in range(total)}
        )
        failed_ids = post_round_robin(
            nodes.nodes, FAILING_WORKFLOW, {seq: {"seq": seq} for seq in range(3)}
        )
        case.wait_for_delivery(set(run_ids), SPREAD_TIMEOUT, nodes.logs)
        by_run_id = ran_records(nodes, [*run_ids.values(), *failed_ids.values()])
        wait_until(
            lambda: {*run_ids.values(), *failed_ids.values()} <= ended_runs(notices.events),
            timeout=SPREAD_TIMEOUT,
        )
        notices.close()
        records = {seq: by_run_id[run_id] for seq, run_id in run_ids.items()}
        failed = {seq: by_run_id[run_id] for seq, run_id in failed_ids.items()}
        unknown = new_id()
        unknown_answers = {node.node_id: run_on(node, unknown).status_code for node in nodes.nodes}
        unknown_error = run_on(nodes.nodes[0], unknown).json()["error"]
        # The inspector's list: every node lists every node's runs (the records are final).
        lists = {
            node.node_id: node.api.get("/runs", params={"limit": 500}).json()
            for node in nodes.nodes
        }
        # A runtime in this process, joined to the cluster, reads the deliveries too.
        rt = cluster_runtime(case, make_runtime, "code-reader")
        in_process = {seq: poll_deliveries(rt, run_id) for seq, run_id in run_ids.items()}
        nodes.stop_alive()

    ran = case.runs_per_node()
    assert len(ran) >= 2, f"every run on one node: {dict(ran)}"
    for seq, record in records.items():
        assert record["run_id"] == run_ids[seq] and record["workflow_id"] == WORKFLOW, record
        assert record["status"] == "succeeded" and record["delivered"] == 2, record
        # The run's event, as every node's inspector shows it.
        assert record["event"] == json.dumps(case.event(seq), separators=(",", ":")), record
        assert [d["destination"] for d in record["deliveries"]] == ["http", "sql"], record
        assert in_process[seq] == record["deliveries"], seq
    assert unknown_answers == {"node-1": 404, "node-2": 404, "node-3": 404}
    assert "still running on another node" in unknown_error, unknown_error
    everything = {*run_ids.values(), *failed_ids.values()}
    for node_id, listed in lists.items():
        assert listed["scope"] == "cluster", node_id
        summaries = {run["run_id"]: run for run in listed["runs"] if run["run_id"] in everything}
        assert set(summaries) == everything, node_id
        for seq, run_id in run_ids.items():
            counts = summaries[run_id]["destinations"]
            assert counts["http"]["delivered"] == counts["sql"]["delivered"] == 1, (seq, counts)
    for seq, record in failed.items():
        assert record["workflow_id"] == FAILING_WORKFLOW and record["status"] == "failed", record
        assert f"ValueError: event {seq} fails on node-" in record["traceback"], record
    print(f"\nruns: {total} runs by node {dict(ran)}, each record the same on 3 nodes")


def poll_deliveries(rt: Runtime, run_id: str) -> list[dict[str, Any]]:
    """`rt.deliveries(run_id)` as dicts, once the run's record reached this runtime."""
    deadline = time.monotonic() + SPREAD_TIMEOUT
    while True:
        try:
            return [record.as_dict() for record in rt.deliveries(run_id)]
        except KeyError:
            assert time.monotonic() < deadline, f"rt.deliveries({run_id!r}): still unknown"
            time.sleep(0.1)
