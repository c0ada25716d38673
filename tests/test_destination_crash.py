"""A destination actor that crashes mid-stream: restarted, nothing queued lost, loops stopped."""

from __future__ import annotations

import threading
import time
from typing import Any

from destinations.base import Destination


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


def test_crash_mid_stream_loses_no_queued_message(make_runtime: Any) -> None:
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
    health = rt.health()
    assert health["status"] == "ok"
    assert health["destinations"]["fragile"]["incarnation"] == 2


def test_crash_loop_stops_at_the_intensity_limit(make_runtime: Any) -> None:
    store: list[Any] = []
    gate = threading.Event()
    gate.set()
    rt = make_runtime(start=False)
    rt.add_destination("fragile", lambda _c: Fragile.start(store, set(), gate))
    rt.start()
    rt.register("p", lambda event, ctx: ctx.send.to("fragile", event))
    for n in range(6):
        rt.run("p", f"crash-{n}")
    deadline = time.monotonic() + 10
    while rt.supervisor_error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "crashed more than 5 times in 10 s" in str(rt.supervisor_error)
    assert rt.health()["status"] == "degraded"
    late = rt.run("p", "late")
    (record,) = rt.deliveries(late.run_id)
    assert record.status == "failed" and "is down" in record.error
    # The send the dead actor still held is not lost: stop() dead-letters it.
    report = rt.stop(timeout=0.2)
    assert report.per_destination == {"fragile": 1}
    (line,) = (rt.config.data_dir / "dead-letter").glob("fragile-*.jsonl")
    assert '"payload": "crash-5"' in line.read_text()
