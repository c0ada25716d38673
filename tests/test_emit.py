"""The emit destination: emitted events start runs of the workflows that listen."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from outbound import Runtime, SendError, UnknownWorkflowError


class Seen:
    """What listener runs saw: (workflow id, event, depth), thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[tuple[str, Any, int]] = []

    def add(self, ctx: Any, event: Any) -> None:
        with self._lock:
            self.calls.append((ctx.workflow_id, event, ctx.depth))

    def of(self, workflow_id: str) -> list[tuple[Any, int]]:
        with self._lock:
            return [(event, depth) for name, event, depth in self.calls if name == workflow_id]


def emitter(event: Any, ctx: Any) -> None:
    ctx.send.emit(raw_event={"order": event["order"], "hops": [ctx.workflow_id]})


def test_fan_out_to_two_listeners(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime()
    seen = Seen()
    rt.register("p_a", emitter)
    rt.register("p_b", lambda event, ctx: seen.add(ctx, event))
    rt.register("p_c", lambda event, ctx: seen.add(ctx, event))
    rt.subscribe(listener="p_b", emitter="p_a")
    rt.subscribe(listener="p_c", emitter="p_a")

    result = rt.run("p_a", {"order": 7})
    assert rt.flush(timeout=10)

    expected = {"order": 7, "hops": ["p_a"]}
    assert seen.of("p_b") == [(expected, 1)]
    assert seen.of("p_c") == [(expected, 1)]
    [delivery] = rt.deliveries(result.run_id)
    assert delivery.destination == "emit"
    assert delivery.status == "delivered", delivery.error
    assert delivery.attempts == 1
    runs = delivery.detail["listener_runs"]
    assert [run["workflow_id"] for run in runs] == ["p_b", "p_c"]
    for run in runs:
        listener_result = rt.run_result(run["run_id"])
        assert listener_result.status == "succeeded"
        assert listener_result.workflow_id == run["workflow_id"]


def test_listeners_get_their_own_copy_of_the_event(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime()
    seen = Seen()
    rt.register("p_a", emitter)

    def mutating(event: Any, ctx: Any) -> None:
        event["hops"].append("mutated")
        seen.add(ctx, event)

    rt.register("p_b", mutating, listens_to=["p_a"])
    rt.register("p_c", lambda event, ctx: seen.add(ctx, event), listens_to=["p_a"])
    rt.run("p_a", {"order": 1})
    assert rt.flush(timeout=10)
    assert seen.of("p_c") == [({"order": 1, "hops": ["p_a"]}, 1)]
    assert rt.emits("p_a")[0]["raw_event"] == {"order": 1, "hops": ["p_a"]}


def test_chain_of_three(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime()
    seen = Seen()

    def relay(event: Any, ctx: Any) -> None:
        seen.add(ctx, event)
        ctx.send.emit(raw_event={**event, "hops": [*event["hops"], ctx.workflow_id]})

    rt.register("p_a", emitter)
    rt.register("p_b", relay, listens_to=["p_a"])
    rt.register("p_c", lambda event, ctx: seen.add(ctx, event), listens_to=["p_b"])

    rt.run("p_a", {"order": 3})
    assert rt.flush(timeout=10)

    assert seen.of("p_b") == [({"order": 3, "hops": ["p_a"]}, 1)]
    assert seen.of("p_c") == [({"order": 3, "hops": ["p_a", "p_b"]}, 2)]
    assert rt.stats()["runs"] == {"succeeded": 3}
    [from_b] = rt.emits("p_b")
    assert from_b["depth"] == 1
    assert [run["workflow_id"] for run in from_b["listener_runs"]] == ["p_c"]


def test_a_cycle_is_stopped_at_the_depth_limit(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(emit_max_depth=5)
    seen = Seen()

    def ping_pong(event: Any, ctx: Any) -> None:
        seen.add(ctx, event)
        ctx.send.emit(raw_event={"n": event["n"] + 1})

    rt.register("p_ping", ping_pong, listens_to=["p_pong"])
    rt.register("p_pong", ping_pong, listens_to=["p_ping"])

    rt.run("p_ping", {"n": 0})
    assert rt.flush(timeout=10)

    # Depths 0..5: the first run and five emitted ones; the sixth emit is stopped.
    assert sorted(depth for _, _, depth in seen.calls) == [0, 1, 2, 3, 4, 5]
    stats = rt.stats()
    assert stats["runs"] == {"succeeded": 6}
    assert stats["destinations"]["emit"]["delivered"] == 5
    assert stats["destinations"]["emit"]["failed"] == 1
    last = rt.emits("p_pong")[-1]  # runs at odd depths are p_pong's: depth 5 emitted last
    assert last["status"] == "failed" and last["depth"] == 5
    assert last["listener_runs"] == []
    [stopped] = rt.deliveries(last["run_id"])
    assert stopped.status == "failed"
    assert "emit chain too deep" in stopped.error
    assert "OUTBOUND_EMIT_MAX_DEPTH" in stopped.error and "5" in stopped.error
    assert stopped.detail["max_depth"] == 5

    # The runtime is still healthy and keeps working.
    assert rt.health()["status"] == "ok"
    rt.register("p_after", lambda event, ctx: "fine")
    assert rt.run("p_after", timeout=10).value == "fine"


def test_a_self_cycle_stops_at_the_default_limit_of_16(
    make_runtime: Callable[..., Runtime],
) -> None:
    rt = make_runtime()
    rt.register("p_loop", lambda event, ctx: ctx.send.emit(raw_event=event), listens_to=["p_loop"])
    rt.run("p_loop", {"x": 1})
    assert rt.flush(timeout=20)
    assert rt.stats()["runs"] == {"succeeded": 17}  # depth 0 and 16 emitted runs
    emits = rt.emits("p_loop")
    assert [entry["status"] for entry in emits] == ["delivered"] * 16 + ["failed"]
    assert rt.stats()["unfinished"] == 0


def test_emits_are_listed_with_the_runs_they_started(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime()

    def several(event: Any, ctx: Any) -> None:
        for n in range(3):
            ctx.send.emit(raw_event={"n": n, "batch": event})

    rt.register("p_a", several)
    rt.register("p_b", lambda event, ctx: None, listens_to=["p_a"])
    result = rt.run("p_a", "first")
    assert rt.flush(timeout=10)

    emits = rt.emits("p_a")
    assert [entry["raw_event"] for entry in emits] == [{"n": n, "batch": "first"} for n in range(3)]
    ids = [delivery.id for delivery in rt.deliveries(result.run_id)]
    for entry, delivery_id in zip(emits, ids, strict=True):
        assert entry["id"] == delivery_id
        assert entry["workflow_id"] == "p_a" and entry["run_id"] == result.run_id
        assert entry["status"] == "delivered" and entry["error"] is None
        assert entry["emitted_at"] > 0 and entry["depth"] == 0
        [run] = entry["listener_runs"]
        assert run["workflow_id"] == "p_b"
        assert rt.run_result(run["run_id"]).status == "succeeded"
    assert [entry["raw_event"]["n"] for entry in rt.emits("p_a", limit=2)] == [1, 2]
    assert rt.emits("p_b") == []
    assert rt.emits("p_unknown") == []


def test_an_emit_nobody_listens_to_is_kept(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime()
    rt.register("p_a", emitter)
    result = rt.run("p_a", {"order": 5})
    assert rt.flush(timeout=10)
    [delivery] = rt.deliveries(result.run_id)
    assert delivery.status == "delivered" and delivery.detail["listener_runs"] == []
    [entry] = rt.emits("p_a")
    assert entry["raw_event"] == {"order": 5, "hops": ["p_a"]}


def test_only_the_last_1000_emits_are_kept(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime()

    def many(event: Any, ctx: Any) -> None:
        for n in range(1005):
            ctx.send.emit(raw_event={"n": n})

    rt.register("p_a", many)
    rt.run("p_a")
    assert rt.flush(timeout=20)
    emits = rt.emits("p_a")
    assert len(emits) == 1000
    assert emits[0]["raw_event"] == {"n": 5} and emits[-1]["raw_event"] == {"n": 1004}


def test_listens_to_and_subscribe_forms(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime()
    seen = Seen()

    @rt.workflow("p_listener", listens_to=["p_a", "p_b"])
    def listener(event: Any, ctx: Any) -> None:
        seen.add(ctx, event)

    @rt.workflow("p_a")
    def a(event: Any, ctx: Any) -> None:
        ctx.send.emit(raw_event={"from": "a"})

    rt.register("p_b", lambda event, ctx: ctx.send.emit(raw_event={"from": "b"}))
    rt.register("p_c", lambda event, ctx: seen.add(ctx, event), listens_to=("p_a",))
    rt.subscribe(listener="p_c", emitter="p_a")  # subscribing twice changes nothing

    rt.run("p_a")
    rt.run("p_b")
    assert rt.flush(timeout=10)
    assert sorted(event["from"] for event, _ in seen.of("p_listener")) == ["a", "b"]
    assert seen.of("p_c") == [({"from": "a"}, 1)]

    with pytest.raises(UnknownWorkflowError, match="p_nobody"):
        rt.subscribe(listener="p_nobody", emitter="p_a")
    with pytest.raises(TypeError, match="listens_to"):
        rt.register("p_d", lambda event, ctx: None, listens_to="p_a")


def test_listener_runs_started_while_stopping_are_drained(
    make_runtime: Callable[..., Runtime],
) -> None:
    rt = make_runtime()
    seen = Seen()

    def slow_emitter(event: Any, ctx: Any) -> None:
        time.sleep(0.2)  # still running when stop() begins
        emitter(event, ctx)

    rt.register("p_a", slow_emitter)
    rt.register("p_b", lambda event, ctx: seen.add(ctx, event), listens_to=["p_a"])
    rt.submit("p_a", {"order": 9})
    report = rt.stop(drain=True, timeout=10)
    assert report.drained and report.dead_lettered == 0
    assert seen.of("p_b") == [({"order": 9, "hops": ["p_a"]}, 1)]


@pytest.mark.parametrize(
    ("raw_event", "expected"),
    [
        ([1, 2], "raw_event: must be a JSON object"),
        ({"when": object()}, "raw_event: must be JSON-serializable"),
    ],
)
def test_bad_raw_event_is_refused_at_the_call(
    make_runtime: Callable[..., Runtime], raw_event: Any, expected: str
) -> None:
    rt = make_runtime()
    caught: list[str] = []

    def workflow(event: Any, ctx: Any) -> None:
        try:
            ctx.send.emit(raw_event=raw_event)
        except SendError as error:
            caught.append(str(error))

    rt.register("p_a", workflow)
    assert rt.run("p_a", timeout=10).sends == 0
    assert caught and caught[0].startswith("ctx.send.emit(): ") and expected in caught[0]


def test_a_payload_not_made_by_send_emit_fails_cleanly(
    make_runtime: Callable[..., Runtime],
) -> None:
    rt = make_runtime()
    rt.register("p_a", lambda event, ctx: ctx.send.to("emit", {"not": "bytes"}))
    result = rt.run("p_a", timeout=10)
    assert rt.flush(timeout=10)
    [delivery] = rt.deliveries(result.run_id)
    assert delivery.status == "failed" and "ctx.send.emit()" in delivery.error
    assert rt.health()["status"] == "ok"
