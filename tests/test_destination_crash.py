"""A destination actor that crashes: restarted without losing work, and never harming others.

A crash mid-stream loses no queued message; one poisonous send fails alone, not
the innocent sends of its hand-off; a destination that crash-loops is given up
on alone (its sends dead-lettered at once) while the others keep delivering;
and `stop()` dead-letters every destination even when one of them misbehaves.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

import outbound.shutdown as shutdown_module
from outbound import Config, Runtime
from outbound.destinations.base import Destination
from outbound.embedded import HttpSink, SinkResponse


class Fragile(Destination):
    """Stores payloads; crashes on "crash" payloads (once per payload value)."""

    def __init__(self, store: list[Any], crashed: set[Any], gate: threading.Event) -> None:
        super().__init__()
        self.store = store
        self.crashed = crashed
        self.gate = gate

    def deliver(self, sends: list[Any]) -> None:
        self.gate.wait(10)  # hold the first message so later ones queue up behind it
        for send in sends:
            if str(send.payload).startswith("crash") and send.payload not in self.crashed:
                self.crashed.add(send.payload)
                raise RuntimeError(f"injected {send.payload}")
            self.store.append(send.payload)
            self.delivered(send)


class Poisoned(Destination):
    """Stores payloads; crashes every time it meets a "poison" payload."""

    def __init__(self, store: list[Any]) -> None:
        super().__init__()
        self.store = store

    @staticmethod
    def dead_letter_fields(send: Any) -> dict[str, Any]:
        return {"payload": send.payload, "form": "poisoned's own"}

    def deliver(self, sends: list[Any]) -> None:
        for send in sends:
            if send.payload == "poison":
                raise RuntimeError("poisoned by its payload")
            self.store.append(send.payload)
            self.delivered(send)


class AlwaysRaises(Destination):
    def deliver(self, sends: list[Any]) -> None:
        raise RuntimeError("this destination is broken")


class Holder(Destination):
    """Takes sends and keeps them unfinished (a service that never answers)."""

    def deliver(self, sends: list[Any]) -> None:
        pass


class BrokenDeadLetter(Holder):
    """Holds sends, and its own dead-lettering raises."""

    def dead_letter(self, data_dir: Path, reason: str) -> int:
        raise OSError("this destination cannot write its dead letters")


class Stuck(Destination):
    """Blocks in `deliver` until the gate opens (a hung client library)."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def deliver(self, sends: list[Any]) -> None:
        self.gate.wait(30)


def dead_letters(data_dir: Path, destination: str) -> list[dict[str, Any]]:
    lines = []
    for path in sorted((data_dir / "dead-letter").glob(f"{destination}-*.jsonl")):
        lines += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return lines


def test_crash_mid_stream_loses_no_queued_message(make_runtime: Any, data_dir: Path) -> None:
    store: list[Any] = []
    gate = threading.Event()
    rt = make_runtime(start=False)
    rt.add_destination("fragile", lambda _c: Fragile.start(store, set(), gate))
    rt.start()
    rt.register("p", lambda event, ctx: ctx.send.to("fragile", event))
    results = [rt.run("p", n) for n in range(30)]
    crash = rt.run("p", "crash-1")
    results += [rt.run("p", n) for n in range(30, 60)]
    gate.set()  # 61 messages are queued now; the crash happens in the middle
    assert rt.flush(timeout=20)
    assert store == list(range(60))
    for result in results:
        assert [d.status for d in rt.deliveries(result.run_id)] == ["delivered"]
    (crashed,) = rt.deliveries(crash.run_id)
    assert crashed.status == "failed" and "injected crash-1" in crashed.error
    assert "'fragile' crashed delivering it" in crashed.error  # the name it was added under
    health = rt.health()
    assert health["status"] == "ok"
    assert health["destinations"]["fragile"]["incarnation"] == 2
    # Failed for good, so dead-lettered at once (before any stop).
    (line,) = dead_letters(data_dir, "fragile")
    assert line["payload"] == "crash-1" and line["delivery_id"] == crashed.id
    assert crashed.detail["dead_letter"].endswith(".jsonl")


def test_a_poisonous_send_fails_alone_not_the_innocent_sends_of_its_hand_off(
    make_runtime: Any, data_dir: Path
) -> None:
    store: list[Any] = []
    rt = make_runtime(start=False)
    rt.add_destination("poisoned", lambda _c: Poisoned.start(store))
    rt.start()

    @rt.workflow("p")
    def send_all(event: list[str], ctx: Any) -> None:
        for payload in event:
            ctx.send.to("poisoned", payload)

    # One run: its three sends reach the destination in one hand-off.
    result = rt.run("p", ["first", "poison", "last"])
    assert rt.flush(timeout=20)
    records = rt.deliveries(result.run_id)
    assert [r.status for r in records] == ["delivered", "failed", "delivered"]
    assert "poisoned by its payload" in records[1].error
    assert sorted(store) == ["first", "last"]
    (line,) = dead_letters(data_dir, "poisoned")
    assert line["payload"] == "poison" and line["form"] == "poisoned's own"
    assert rt.health()["destinations"]["poisoned"]["status"] == "running"


def test_a_crash_looping_destination_stops_only_itself(
    make_runtime: Any, make_sink: Callable[..., HttpSink], data_dir: Path
) -> None:
    sink = make_sink()
    rt = make_runtime(start=False)
    rt.add_destination("broken", lambda _c: AlwaysRaises.start())
    rt.start()
    rt.register("to_broken", lambda event, ctx: ctx.send.to("broken", event))
    rt.register("to_http", lambda event, ctx: ctx.send.http(sink.url + "/hook", data=event))

    broken_runs = [rt.run("to_broken", {"n": n}).run_id for n in range(6)]
    wait_until(lambda: rt.health()["destinations"]["broken"]["status"] == "failed")
    health = rt.health()
    assert health["status"] == "degraded"
    assert "crashed more than 5 times in 10 s" in health["destinations"]["broken"]["error"]
    assert health["destinations"]["http"]["status"] == "running"
    assert health["destinations"]["http"]["alive"] is True

    # The others keep delivering; a send to the broken one fails at hand-off, clearly.
    delivered = [rt.run("to_http", {"n": n}).run_id for n in range(5)]
    late = rt.run("to_broken", {"n": "late"}).run_id
    assert rt.flush(timeout=20)
    assert sorted(json.loads(r.body)["n"] for r in sink.requests) == list(range(5))
    for run_id in delivered:
        assert [d.status for d in rt.deliveries(run_id)] == ["delivered"]
    (refused,) = rt.deliveries(late)
    assert refused.status == "failed"
    assert "destination 'broken' is down" in refused.error and "crashed more" in refused.error

    # Every send to it is failed and already dead-lettered; stop() has nothing left to write.
    records = [d for run_id in [*broken_runs, late] for d in rt.deliveries(run_id)]
    assert all(d.status == "failed" and "dead_letter" in d.detail for d in records)
    lines = dead_letters(data_dir, "broken")
    assert sorted(line["delivery_id"] for line in lines) == sorted(d.id for d in records)
    report = rt.stop(timeout=5)
    assert report.drained and report.per_destination == {}
    assert len(dead_letters(data_dir, "broken")) == len(records)  # none written twice


def test_stop_dead_letters_every_destination_when_one_fails_to(
    make_runtime: Any, make_sink: Callable[..., HttpSink], data_dir: Path
) -> None:
    sink = make_sink(lambda _request: SinkResponse(503))  # HTTP keeps retrying
    rt = make_runtime(start=False, http_max_attempts=1000)
    rt.add_destination("broken_dl", lambda _c: BrokenDeadLetter.start())
    rt.add_destination("holder", lambda _c: Holder.start())
    rt.start()

    @rt.workflow("p")
    def send_all(event: Any, ctx: Any) -> None:
        ctx.send.to("broken_dl", event)
        ctx.send.to("holder", event)
        ctx.send.http(sink.url + "/hook", data=event)

    runs = [rt.run("p", {"n": n}).run_id for n in range(3)]
    report = rt.stop(timeout=0.5)
    assert not report.drained
    assert report.per_destination == {"broken_dl": 3, "holder": 3, "http": 3}
    assert "cannot write its dead letters" in report.errors["broken_dl"]
    for destination in ("broken_dl", "holder", "http"):
        assert len(dead_letters(data_dir, destination)) == 3
    assert {d.status for run_id in runs for d in rt.deliveries(run_id)} == {"failed"}


def test_stop_dead_letters_what_a_stuck_destination_left(
    make_runtime: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutdown_module, "DEAD_LETTER_TIMEOUT", 0.5)
    gate = threading.Event()
    rt = make_runtime(start=False)
    rt.add_destination("stuck", lambda _c: Stuck.start(gate))
    rt.add_destination("holder", lambda _c: Holder.start())
    rt.start()
    rt.register("p", lambda event, ctx: [ctx.send.to("stuck", event), ctx.send.to("holder", event)])
    runs = [rt.run("p", n).run_id for n in range(3)]
    try:
        report = rt.stop(timeout=0.2)
    finally:
        gate.set()  # let its thread end
    # The one being delivered and those queued behind it are all dead-lettered.
    assert report.per_destination == {"stuck": 3, "holder": 3}
    assert "did not answer" in report.errors["stuck"]
    assert sorted(line["payload"] for line in dead_letters(data_dir, "stuck")) == [0, 1, 2]
    assert {d.status for run_id in runs for d in rt.deliveries(run_id)} == {"failed"}


def test_stop_called_from_several_threads_at_once_never_raises(
    make_sink: Callable[..., HttpSink], data_dir: Path
) -> None:
    sink = make_sink(lambda _request: SinkResponse(200, delay=0.05))
    rt = Runtime(Config(data_dir=data_dir)).start()
    rt.register("p", lambda event, ctx: ctx.send.http(sink.url + "/hook", data=event))
    for n in range(40):
        rt.submit("p", {"n": n})
    barrier = threading.Barrier(4)
    reports: list[Any] = []

    def stop() -> None:
        barrier.wait()
        reports.append(rt.stop(timeout=10))

    threads = [threading.Thread(target=stop) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(reports) == 4 and all(report.drained for report in reports)
    assert not rt.running
    assert len(sink.requests) == 40


class Keeper(Destination):
    """Holds every send; crashes on "crash". Each incarnation records its durable state."""

    def __init__(self, starts: list[tuple[list[str], str, list[Any]]]) -> None:
        super().__init__()
        self.starts = starts

    def recover(self) -> None:
        held = sorted(send.payload for send in self.unfinished.values())
        self.starts.append((sorted(self.durable), type(self.work).__name__, held))

    def deliver(self, sends: list[Any]) -> None:
        if any(send.payload == "crash" for send in sends):
            raise RuntimeError("injected")


def test_a_restarted_destination_gets_its_work_back_as_one_typed_object(
    make_runtime: Any, data_dir: Path
) -> None:
    """What survives a restart is the work (sends), kept as a `DurableWork`, not loose keys."""
    starts: list[tuple[list[str], str, list[Any]]] = []
    rt = make_runtime(start=False)
    rt.add_destination("keeper", lambda _c: Keeper.start(starts))
    rt.start()
    rt.register("p", lambda event, ctx: ctx.send.to("keeper", event))
    rt.run("p", "a")
    rt.run("p", "b")
    crash = rt.run("p", "crash")
    wait_until(lambda: len(starts) == 2)
    assert starts == [(["work"], "DurableWork", []), (["work"], "DurableWork", ["a", "b"])]
    wait_until(lambda: rt.deliveries(crash.run_id)[0].status == "failed")
    rt.stop(drain=False, timeout=10)
    assert sorted(line["payload"] for line in dead_letters(data_dir, "keeper")) == [
        "a", "b", "crash",
    ]  # fmt: skip
