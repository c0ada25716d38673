"""The journal (README: Durability), in process, against a real nats-server.

What a user sees: a run's sends are in the journal when `run()` returns; they
leave it only when final; a stop that times out leaves them there (not
dead-lettered) and the next start delivers them with their delivery ids; an
event published is journaled before its run, and run again after a crash with
the same run id; bad settings fail at once, naming the variable. Crashes of
whole processes are in test_journal_crash.py.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from waiting import wait_until

from outbound import Config, Destination, Runtime
from outbound.destinations.delivery import new_send
from outbound.destinations.http.send import HttpRequest
from outbound.destinations.sql.send import SqlRow
from outbound.journal.codec import (
    JournaledEvent,
    JournalFormatError,
    NewerFormatError,
    decode_event,
    decode_sends,
    encode_event,
    encode_sends,
)


class Memory(Destination):
    """Delivers into `got` unless `hold` is set (then it keeps every send open)."""

    got: list[tuple[str, Any]] = []
    hold = threading.Event()

    def deliver(self, sends: list[Any]) -> None:
        if Memory.hold.is_set():
            return
        for send in sends:
            Memory.got.append((send.id, send.payload))
            self.delivered(send)


@pytest.fixture(autouse=True)
def fresh_memory() -> None:
    Memory.got = []
    Memory.hold.clear()


@pytest.fixture
def journaled(nats_server: Any, journal_cluster: str, data_dir: Path) -> Callable[..., Runtime]:
    """`journaled(**config)` -> a Runtime on the module's nats-server (not started)."""
    made: list[Runtime] = []

    def make(**overrides: Any) -> Runtime:
        overrides.setdefault("journal", nats_server.url)
        overrides.setdefault("cluster", journal_cluster)
        overrides.setdefault("data_dir", data_dir)
        overrides.setdefault("journal_ack_wait", 2.0)  # a stopped node's events go on soon
        runtime = Runtime(Config(**overrides))
        runtime.add_destination("memory", lambda config: Memory.start())

        @runtime.workflow("orders")
        def orders(event: Any, ctx: Any) -> None:
            ctx.send.to("memory", {"n": event["n"]})

        made.append(runtime)
        return runtime

    yield make
    Memory.hold.clear()
    for runtime in made:
        runtime.stop(timeout=5)


def sends_stream(cluster: str) -> str:
    return f"{cluster.upper()}_SENDS"


def test_sends_are_journaled_before_run_returns_and_leave_only_when_final(
    journaled: Callable[..., Runtime], nats_server: Any, journal_cluster: str
) -> None:
    Memory.hold.set()  # the destination keeps them open
    rt = journaled().start()
    for n in range(20):
        rt.run("orders", {"n": n})
    # Acknowledged = journaled: every run that returned has its send in the stream.
    assert nats_server.stream_messages(sends_stream(journal_cluster)) >= 1
    assert rt.stats()["destinations"]["memory"]["pending"] == 20
    report = rt.stop(timeout=0.5)
    assert report.left_in_journal == 20
    assert report.dead_lettered == 0
    assert nats_server.stream_messages(sends_stream(journal_cluster)) >= 1


def test_a_stop_that_times_out_leaves_sends_for_the_next_start_with_their_ids(
    journaled: Callable[..., Runtime], nats_server: Any, journal_cluster: str, data_dir: Path
) -> None:
    Memory.hold.set()
    first = journaled().start()
    ids = []
    for n in range(50):
        result = first.run("orders", {"n": n})
        ids.append(first.deliveries(result.run_id)[0].id)
    report = first.stop(timeout=0.2)
    assert report.left_in_journal == 50
    assert not (data_dir / "dead-letter").exists()  # kept in the journal, not dead-lettered

    Memory.hold.clear()
    second = journaled().start()
    assert second.flush(timeout=20)
    assert sorted(Memory.got) == sorted((i, {"n": n}) for n, i in enumerate(ids))
    assert second.stats()["destinations"]["memory"]["recovered"] == 50
    wait_until(lambda: nats_server.stream_messages(sends_stream(journal_cluster)) == 0)


def test_delivered_sends_are_acknowledged(
    journaled: Callable[..., Runtime], nats_server: Any, journal_cluster: str
) -> None:
    rt = journaled().start()
    futures = [rt.submit("orders", {"n": n}) for n in range(2000)]
    for future in futures:
        future.result(timeout=30)
    assert rt.flush(timeout=30)
    assert len(Memory.got) == 2000
    wait_until(lambda: nats_server.stream_messages(sends_stream(journal_cluster)) == 0)
    rt.stop()
    # A restart finds nothing to deliver again.
    Memory.got = []
    again = journaled().start()
    assert again.flush(timeout=10)
    assert Memory.got == []


def test_a_published_event_is_run_again_after_a_crash_with_its_run_id(
    journaled: Callable[..., Runtime], nats_server: Any, journal_cluster: str
) -> None:
    stuck = threading.Event()
    release = threading.Event()
    first = journaled(shutdown_timeout=0.2)

    @first.workflow("slow")
    def slow(event: Any, ctx: Any) -> None:
        ctx.send.to("memory", {"slow": event["n"]})
        stuck.set()
        release.wait(30)  # the process "dies" before this run ends

    first.start()
    run_id = first.publish("slow", {"n": 7})
    assert stuck.wait(10)
    assert nats_server.stream_messages(f"{journal_cluster.upper()}_EVENTS") == 1
    first.stop(timeout=0.2)  # the run is still going: its event stays journaled

    second = journaled()

    @second.workflow("slow")
    def fast(event: Any, ctx: Any) -> None:
        ctx.send.to("memory", {"slow": event["n"]})

    second.start()
    wait_until(lambda: second.run_result(run_id) is not None)
    assert second.run_result(run_id).status == "succeeded"
    assert second.flush(timeout=10)
    (delivery,) = second.deliveries(run_id)
    assert (delivery.id, delivery.status) == (f"{run_id[:24]}00000000", "delivered")
    release.set()
    wait_until(lambda: nats_server.stream_messages(f"{journal_cluster.upper()}_EVENTS") == 0)


def test_post_answers_202_once_the_event_is_journaled_and_503_while_the_journal_is_down(
    tmp_path: Path, journal_cluster: str, data_dir: Path, make_api: Callable[..., Any]
) -> None:
    from nats_support import NatsServer

    server = NatsServer(tmp_path / "nats-down").start()
    rt = Runtime(Config(journal=server.url, cluster=journal_cluster, data_dir=data_dir))
    rt.add_destination("memory", lambda config: Memory.start())
    rt.register("orders", lambda event, ctx: ctx.send.to("memory", event))
    try:
        rt.start()
        api = make_api(rt)
        answer = httpx.post(f"{api.url}/workflows/orders/events", json={"n": 1}, timeout=10)
        assert answer.status_code == 202
        wait_until(lambda: len(Memory.got) == 1, timeout=10)
        server.kill()
        answer = httpx.post(f"{api.url}/workflows/orders/events", json={"n": 2}, timeout=30)
        assert answer.status_code == 503
        assert "journal" in answer.json()["error"]
        assert answer.headers["Retry-After"]
        server.start()  # the runtime reconnects by itself
        wait_until(
            lambda: (
                httpx.post(
                    f"{api.url}/workflows/orders/events", json={"n": 3}, timeout=30
                ).status_code
                == 202
            ),
            timeout=30,
        )
        # On nats:// the node pulls posted events from the cluster's queue: wait for them.
        delivered = lambda: [payload for _, payload in Memory.got]  # noqa: E731
        wait_until(lambda: {"n": 1} in delivered() and {"n": 3} in delivered(), timeout=30)
    finally:
        rt.stop(timeout=5)
        server.stop()


def test_a_server_whose_max_payload_cannot_hold_a_send_is_refused_at_start(
    tmp_path: Path, journal_cluster: str, data_dir: Path
) -> None:
    from nats_support import NatsServer

    server = NatsServer(tmp_path / "small", max_payload="1MB").start()
    try:
        rt = Runtime(Config(journal=server.url, cluster=journal_cluster, data_dir=data_dir))
        with pytest.raises(RuntimeError, match="max_payload"):
            rt.start()
        assert not rt.running
    finally:
        server.stop()


def test_large_sends_are_split_into_entries_that_fit(
    journaled: Callable[..., Runtime], nats_server: Any, journal_cluster: str
) -> None:
    rt = journaled()

    @rt.workflow("big")
    def big(event: Any, ctx: Any) -> None:
        for n in range(12):
            ctx.send.to("memory", "x" * 1_000_000 + str(n))

    rt.start()
    Memory.hold.set()
    rt.run("big")
    # 12 MB of sends: more than one 8 MB message.
    assert nats_server.stream_messages(sends_stream(journal_cluster)) >= 2
    Memory.hold.clear()
    rt.stop(timeout=0.2)
    again = journaled().start()
    assert again.flush(timeout=20)
    assert sorted(payload[-2:] for _, payload in Memory.got) == sorted(
        ("x" + str(n))[-2:] for n in range(12)
    )


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("OUTBOUND_JOURNAL", "postgres://x", "OUTBOUND_JOURNAL"),
        ("OUTBOUND_CLUSTER", "a.b", "OUTBOUND_CLUSTER"),
        ("OUTBOUND_JOURNAL_SYNC", "sometimes", "OUTBOUND_JOURNAL_SYNC"),
        ("OUTBOUND_JOURNAL_REPLICAS", "7", "OUTBOUND_JOURNAL_REPLICAS.*1 to 5"),
        ("OUTBOUND_JOURNAL_REPLICAS", "3", "OUTBOUND_JOURNAL_REPLICAS=3 needs a NATS cluster"),
    ],
)
def test_bad_journal_settings_fail_naming_the_variable(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Config.from_env({variable: value})


# -- the codec ---------------------------------------------------------------------------


@dataclasses.dataclass
class Custom:
    name: str
    tags: list[str]


def test_entries_keep_every_field_of_built_in_and_custom_payloads() -> None:
    sends = [
        new_send(
            "http",
            "d1",
            "r1",
            "w",
            1.5,
            HttpRequest("POST", "http://127.0.0.1/x", {"a": "b"}, None, b"{}", ("u", "p"), 2.0),
            2,
            0,
        ),
        new_send("sql", "d2", "r1", "w", 1.5, SqlRow("t", ("a", "b"), (1, "x")), 10, 1),
        new_send("custom", "d3", "r2", "w", 2.5, Custom("n", ["t"]), 0, 0),
    ]
    sends[0].attempts = 3
    back = decode_sends(encode_sends(sends))
    assert [(s.destination, s.id, s.run_id, s.payload, s.size, s.depth) for s in back] == [
        (s.destination, s.id, s.run_id, s.payload, s.size, s.depth) for s in sends
    ]
    assert back[0].attempts == 3 and back[1].status == "pending"


def test_fields_a_later_version_adds_at_the_end_are_read_past() -> None:
    """A rolling upgrade: a newer node's entries, with fields this version does not know
    after the ones it does (in a send's row, its payload and an event), still read."""
    request = HttpRequest("POST", "http://127.0.0.1:9/hook", {}, b"{}", 5.0)
    row = ("http", "d1", "r1", "w", 1.5, 10, 0, 2, "http", dataclasses.astuple(request))
    newer_row = (*row[:9], (*row[9], "a later field"), "another later field")
    sends = decode_sends(b"OBJ1" + pickle.dumps([newer_row], protocol=5))
    assert [(s.id, s.payload, s.attempts) for s in sends] == [("d1", request, 2)]
    event = JournaledEvent("r1", "w", {"n": 1}, 1, "00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    fields = pickle.loads(encode_event(event)[4:])
    newer_event = b"OBE1" + pickle.dumps((*fields, "a later field"), protocol=5)
    assert decode_event(newer_event) == event


def test_a_later_format_version_is_told_apart_from_a_damaged_message() -> None:
    with pytest.raises(NewerFormatError, match="format version 2 .*left for a node"):
        decode_sends(b"OBJ2" + pickle.dumps([], protocol=5))
    with pytest.raises(NewerFormatError):
        decode_event(b"OBE2" + pickle.dumps(("r", "w", None), protocol=5))
    with pytest.raises(JournalFormatError, match="damaged"):
        decode_event(b"OBE1" + pickle.dumps(("r",), protocol=5))
    shapeless = [
        b"OBJ1" + pickle.dumps([("http", "d1")], protocol=5),  # too few fields
        b"OBJ1" + pickle.dumps(42, protocol=5),  # not rows
        b"OBJ1" + pickle.dumps([("http", "d", "r", "w", 0.0, 0, 0, 0, "nope", ())]),  # tag
    ]
    for damaged in (b"OBJ0", b"XXXX", b"OBJx", b"OBJ1 not pickle", *shapeless):
        with pytest.raises(JournalFormatError) as raised:
            decode_sends(damaged)
        assert not isinstance(raised.value, NewerFormatError), damaged


def test_a_forged_entry_cannot_run_code() -> None:
    import os

    forged = b"OBJ1" + pickle.dumps([("memory", "d", "r", "w", 0.0, 0, 0, 0, None, os.getpid)])
    with pytest.raises(JournalFormatError, match="refused"):
        decode_sends(forged)


def test_a_custom_send_too_large_for_any_journal_message_fails_dead_lettered(
    journaled: Callable[..., Runtime], data_dir: Path
) -> None:
    rt = journaled()

    @rt.workflow("huge")
    def huge(event: Any, ctx: Any) -> None:
        ctx.send.to("memory", "x" * 9_000_000)  # custom payloads have no size rule
        ctx.send.to("memory", "small")

    rt.start()
    result = rt.run("huge")
    assert rt.flush(timeout=10)
    too_large, small = rt.deliveries(result.run_id)
    assert too_large.status == "failed" and "max_payload" in (too_large.error or "")
    assert too_large.detail["dead_letter"]
    assert small.status == "delivered"


def test_an_event_that_cannot_be_journaled_is_refused_at_the_call(
    journaled: Callable[..., Runtime],
) -> None:
    rt = journaled().start()
    with pytest.raises(TypeError, match="event: cannot be journaled"):
        rt.publish("orders", {"n": lambda: 1})
    assert rt.stats()["admission"]["in_flight"] == 0  # nothing started, no room kept


def test_recovered_sends_for_a_destination_not_added_stay_in_the_journal(
    journaled: Callable[..., Runtime], nats_server: Any, journal_cluster: str
) -> None:
    Memory.hold.set()
    first = journaled().start()
    first.run("orders", {"n": 1})
    assert first.stop(timeout=0.2).left_in_journal == 1
    Memory.hold.clear()
    bare = Runtime(Config(journal=nats_server.url, cluster=journal_cluster))
    try:
        bare.start()  # no "memory" destination: nothing to deliver it to
        assert bare.flush(timeout=5)
    finally:
        bare.stop(timeout=1)
    assert nats_server.stream_messages(sends_stream(journal_cluster)) == 1
    later = journaled().start()  # a start that has it delivers it
    assert later.flush(timeout=10)
    assert [payload for _, payload in Memory.got] == [{"n": 1}]


def test_a_node_gone_has_its_sends_taken_over_by_another_node(
    journaled: Callable[..., Runtime], nats_server: Any, journal_cluster: str
) -> None:
    Memory.hold.set()
    node_a = journaled(node_id="node-a").start()
    for n in range(20):
        node_a.run("orders", {"n": n})  # run here; its sends journaled under node-a
    assert node_a.stop(timeout=0.2).left_in_journal == 20  # node-a leaves the cluster
    Memory.hold.clear()
    node_b = journaled(node_id="node b.*>").start()  # any id: made a safe subject token
    wait_until(lambda: len(Memory.got) == 20, timeout=20)
    assert sorted(payload["n"] for _, payload in Memory.got) == list(range(20))
    assert node_b.stats()["journal"]["cluster"]["sends_taken_over"] == 20
    wait_until(lambda: nats_server.stream_messages(sends_stream(journal_cluster)) == 0)


def test_published_events_are_run_by_the_nodes_of_the_cluster(
    journaled: Callable[..., Runtime],
) -> None:
    nodes = [journaled(node_id=f"node-{n}").start() for n in range(2)]
    run_ids = [nodes[n % 2].publish("orders", {"n": n}) for n in range(200)]
    wait_until(lambda: len(Memory.got) == 200, timeout=30)
    assert sorted(payload["n"] for _, payload in Memory.got) == list(range(200))
    pulled = [node.stats()["journal"]["cluster"]["events_pulled"] for node in nodes]
    assert sum(pulled) == 200
    # A delivery id is the run id and the send's ordinal, wherever the run ran.
    assert sorted(delivery_id for delivery_id, _ in Memory.got) == sorted(
        f"{run_id[:24]}00000000" for run_id in run_ids
    )


def test_a_run_longer_than_the_ack_wait_is_not_run_twice(
    journaled: Callable[..., Runtime],
) -> None:
    node = journaled(node_id="slow-node", journal_ack_wait=1.0)
    runs = []

    @node.workflow("slow")
    def slow(event: Any, ctx: Any) -> None:
        runs.append(event["n"])
        time.sleep(2.5)  # longer than the ack wait: the event must not go to another run
        ctx.send.to("memory", event)

    node.start()
    other = journaled(node_id="other-node", journal_ack_wait=1.0)
    other.register("slow", slow)
    other.start()
    node.publish("slow", {"n": 1})
    wait_until(lambda: len(Memory.got) == 1, timeout=20)
    time.sleep(1.5)  # a redelivery would have started a second run by now
    assert runs == [1]
