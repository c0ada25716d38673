"""The actor kernel: pooled actors, supervision, loop threads and timers."""

from __future__ import annotations

import importlib.metadata
import re
import threading
import time
from pathlib import Path
from typing import Any

import pykka
import pytest
import trio

from outbound.actors import (
    ActorPool,
    AsyncioLoop,
    ChildSpec,
    LoopResult,
    PooledActor,
    Restart,
    Supervised,
    Supervisor,
    SupervisorGaveUp,
    Timers,
    TrioLoop,
)


@pytest.fixture
def pool():
    pool = ActorPool(4, name="test-pool")
    yield pool
    pool.shutdown()


def make_pooled(pool: ActorPool):
    class Recorder(PooledActor):
        def __init__(self) -> None:
            super().__init__()
            self.pool = pool
            self.log: list[Any] = []

        def on_start(self) -> None:
            self.log.append("started")

        def on_receive(self, message: Any) -> Any:
            if message == "boom":
                raise RuntimeError("boom")
            self.log.append(message)
            return len(self.log)

        def read(self) -> list[Any]:
            return list(self.log)

    return Recorder


def test_pooled_actor_keeps_pykka_api_and_order(pool: ActorPool) -> None:
    ref = make_pooled(pool).start()
    for number in range(500):
        ref.tell(number)
    assert ref.ask("last") == 502  # "started" + 500 numbers + "last"
    log = ref.proxy().read().get()
    assert log[0] == "started"
    assert log[1:501] == list(range(500))
    ref.stop()
    assert not ref.is_alive()
    with pytest.raises(pykka.ActorDeadError):
        ref.tell("late")


def test_pooled_ask_returns_exceptions_to_the_caller(pool: ActorPool) -> None:
    ref = make_pooled(pool).start()
    with pytest.raises(RuntimeError, match="boom"):
        ref.ask("boom")
    assert ref.ask("still alive") == 2
    ref.stop()


def test_pooled_on_stop_and_on_failure_hooks_run(pool: ActorPool) -> None:
    events: list[str] = []

    class Hooks(PooledActor):
        def __init__(self) -> None:
            super().__init__()
            self.pool = pool

        def on_receive(self, message: Any) -> None:
            raise ValueError(message)

        def on_stop(self) -> None:
            events.append("stop")

        def on_failure(self, exc_type: Any, exc: Any, tb: Any) -> None:
            events.append(f"failure:{exc}")

    ref = Hooks.start()
    ref.tell("bad")
    deadline = time.monotonic() + 5
    while ref.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events == ["failure:bad"]
    second = Hooks.start()
    second.stop()
    assert events[-1] == "stop"


def test_ten_thousand_pooled_actors_share_a_few_threads(pool: ActorPool) -> None:
    done = threading.Event()
    count = [0]
    lock = threading.Lock()
    threads_seen: set[str] = set()

    class Once(PooledActor):
        def __init__(self) -> None:
            super().__init__()
            self.pool = pool

        def on_start(self) -> None:
            threads_seen.add(threading.current_thread().name)
            with lock:
                count[0] += 1
                if count[0] == 10_000:
                    done.set()
            self.stop()

    refs = [Once.start() for _ in range(10_000)]
    assert done.wait(60)
    assert len(threads_seen) <= pool.size
    assert all(name.startswith("test-pool") for name in threads_seen)
    deadline = time.monotonic() + 10
    while any(ref.is_alive() for ref in refs) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(ref.is_alive() for ref in refs)


class Ledgerish(Supervised, pykka.ThreadingActor):
    """Records numbers in durable state; crashes on "boom"."""

    use_daemon_thread = True

    def on_receive(self, message: Any) -> Any:
        if message == "boom":
            raise RuntimeError("boom")
        if message == "seen":
            return list(self.durable.get("seen", []))
        self.durable.setdefault("seen", []).append(message)
        return None


@pytest.fixture
def supervisor():
    refs = []

    def make(**kwargs: Any) -> pykka.ActorRef[Supervisor]:
        ref = Supervisor.start(**kwargs)
        refs.append(ref)
        return ref

    yield make
    for ref in refs:
        if ref.is_alive():
            ref.stop()


def test_crashed_child_is_restarted_without_losing_messages(supervisor: Any) -> None:
    sup = supervisor().proxy()
    child = sup.start_child(ChildSpec("ledger", Ledgerish.start)).get()
    for number in range(100):
        child.tell(number)
        if number % 25 == 10:
            child.tell("boom")
    assert child.ask("seen", timeout=10) == list(range(100))
    status = sup.children().get()["ledger"]
    assert status["alive"] and status["incarnation"] == 5


def test_restart_intensity_gives_up_on_the_crash_looping_child_only(supervisor: Any) -> None:
    reported: list[SupervisorGaveUp] = []
    sup_ref = supervisor(max_restarts=5, period=10.0, on_give_up=reported.append)
    sup = sup_ref.proxy()
    looping = sup.start_child(ChildSpec("looping", Ledgerish.start)).get()
    steady = sup.start_child(ChildSpec("steady", Ledgerish.start)).get()
    for number in range(6):
        looping.tell("boom")
        steady.tell(number)
    deadline = time.monotonic() + 10
    while not reported and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [error.child for error in reported] == ["looping"]
    assert "crashed more than 5 times in 10 s" in str(reported[0])
    with pytest.raises(pykka.ActorDeadError):
        looping.tell(1)
    # The supervisor and the other child go on; their restart counts are their own.
    assert sup_ref.is_alive()
    steady.tell("boom")
    assert steady.ask("seen", timeout=10) == list(range(6))
    children = sup.children().get()
    assert children["looping"]["status"] == "failed" and not children["looping"]["alive"]
    assert "crashed more than 5 times" in children["looping"]["error"]
    assert children["steady"]["status"] == "running" and children["steady"]["incarnation"] == 2


def test_a_child_whose_restart_fails_is_given_up_on(supervisor: Any) -> None:
    reported: list[SupervisorGaveUp] = []
    starts = [0]

    def start_once() -> Any:
        starts[0] += 1
        if starts[0] > 1:
            raise OSError("the service it needs is gone")
        return Ledgerish.start()

    sup_ref = supervisor(on_give_up=reported.append)
    child = sup_ref.proxy().start_child(ChildSpec("once", start_once)).get()
    child.tell("boom")
    deadline = time.monotonic() + 10
    while not reported and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "could not be restarted" in str(reported[0]) and "service it needs" in str(reported[0])
    assert sup_ref.is_alive()
    assert sup_ref.proxy().children().get()["once"]["status"] == "failed"


def test_restart_intensity_window_forgets_old_crashes(supervisor: Any) -> None:
    now = [0.0]
    sup_ref = supervisor(max_restarts=2, period=10.0, clock=lambda: now[0])
    child = sup_ref.proxy().start_child(ChildSpec("ledger", Ledgerish.start)).get()
    for _ in range(6):
        child.tell("boom")
        child.ask("seen", timeout=5)  # wait for the restart
        now[0] += 6.0  # at most two crashes fall within any 10 s window
    assert sup_ref.is_alive()
    assert sup_ref.proxy().children().get()["ledger"]["incarnation"] == 7


def test_temporary_child_is_not_restarted(supervisor: Any) -> None:
    sup = supervisor().proxy()
    child = sup.start_child(ChildSpec("temp", Ledgerish.start, Restart.TEMPORARY)).get()
    child.tell("boom")
    deadline = time.monotonic() + 5
    while "temp" in sup.children().get() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "temp" not in sup.children().get()
    with pytest.raises(pykka.ActorDeadError):
        child.tell(1)


def test_factory_must_start_a_supervised_actor(supervisor: Any) -> None:
    class Plain(pykka.ThreadingActor):
        use_daemon_thread = True

    sup = supervisor().proxy()
    with pytest.raises(TypeError, match="actors.Supervised"):
        sup.start_child(ChildSpec("plain", Plain.start)).get()


class Collector(pykka.ThreadingActor):
    use_daemon_thread = True

    def __init__(self) -> None:
        super().__init__()
        self.got: list[Any] = []
        self.arrived = threading.Event()

    def on_receive(self, message: Any) -> None:
        self.got.append(message)
        self.arrived.set()

    def results(self) -> list[Any]:
        return list(self.got)


def wait_for_messages(ref: pykka.ActorRef[Any], count: int, timeout: float = 5) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = ref.proxy().results().get()
        if len(got) >= count:
            return got
        time.sleep(0.01)
    raise AssertionError(f"expected {count} messages, got {ref.proxy().results().get()}")


def test_trio_loop_results_come_back_as_messages() -> None:
    loop = TrioLoop().start()
    ref = Collector.start()
    try:

        async def double(value: int) -> int:
            await trio.sleep(0.01)
            return value * 2

        async def fail() -> None:
            raise ValueError("nope")

        loop.spawn(double, 21, reply_to=ref, tag="a")
        loop.spawn(fail, reply_to=ref, tag="b")
        got = {message.tag: message for message in wait_for_messages(ref, 2)}
        assert got["a"] == LoopResult("a", value=42)
        assert isinstance(got["b"].error, ValueError)
        assert loop.call(double, 5) == 10
    finally:
        ref.stop()
        loop.stop()


def test_asyncio_loop_results_come_back_as_messages() -> None:
    import asyncio

    loop = AsyncioLoop().start()
    ref = Collector.start()
    try:

        async def triple(value: int) -> int:
            await asyncio.sleep(0.01)
            return value * 3

        loop.spawn(triple, 3, reply_to=ref, tag="x")
        assert wait_for_messages(ref, 1)[0] == LoopResult("x", value=9)
        with pytest.raises(ZeroDivisionError):
            loop.call(lambda: asyncio.sleep(0, 1 / 0))
    finally:
        ref.stop()
        loop.stop()


def test_timers_deliver_once_and_periodically_until_cancelled() -> None:
    timers = Timers()
    ref = Collector.start()
    try:
        started = time.monotonic()
        timers.after(0.1, ref, "once")
        tick = timers.every(0.05, ref, "tick")
        got = wait_for_messages(ref, 4)
        assert "once" in got and got.count("tick") >= 2
        assert time.monotonic() - started >= 0.1
        tick.cancel()
        time.sleep(0.1)
        settled = len(ref.proxy().results().get())
        time.sleep(0.2)
        assert len(ref.proxy().results().get()) == settled
    finally:
        ref.stop()
        timers.shutdown()


def test_timer_to_a_stopped_actor_is_dropped() -> None:
    timers = Timers()
    ref = Collector.start()
    ref.stop()
    handle = timers.every(0.01, ref, "tick")
    time.sleep(0.1)
    assert handle.cancelled
    assert timers.pending() == 0
    timers.shutdown()


# Names of pykka's private API: `Actor` methods and attributes the kernel overrides or sets,
# and the private modules.
PYKKA_INTERNALS = re.compile(
    r"pykka\._|from pykka import .*\bmessages\b|pykka\.messages|_envelope|Envelope\("
    r"|def _handle_failure|def _actor_loop_teardown|def _actor_loop_setup|def _handle_receive"
    r"|def _create_actor_inbox|def _start_actor_loop|\.actor_inbox = "
)


def test_pykka_internals_are_used_in_one_module_of_the_kernel_only() -> None:
    """Upgrading pykka means checking one file, which names the version it follows."""
    import outbound.actors
    import outbound.destinations

    kernel = Path(outbound.actors.__file__).parent
    core = Path(outbound.destinations.__file__).parent
    modules = [*kernel.glob("*.py")]
    modules += [core / f"{name}.py" for name in ("base", "batching", "retrying", "delivery")]
    using = sorted(path.name for path in modules if PYKKA_INTERNALS.search(path.read_text()))
    assert using == ["pykka_internals.py"]
    version = importlib.metadata.version("pykka")
    assert f"pykka {version}" in (kernel / "pykka_internals.py").read_text()
