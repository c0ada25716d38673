"""Sends, their outcomes, the one settle path and the ledger: counting, waiting, history."""

from __future__ import annotations

import ast
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import outbound.destinations
from outbound.actors.ids import new_id
from outbound.destinations.delivery import (
    Delivered,
    Delivery,
    Failure,
    Ledger,
    Send,
    new_send,
    reschedule,
    settle,
    settle_each,
)


@dataclass(frozen=True)
class Result:
    """What the ledger reads of a run's result."""

    run_id: str
    status: str = "succeeded"


def sends(count: int, destination: str = "sql", run_id: str = "r") -> list[Send]:
    return [
        new_send(destination, new_id(), run_id, "p", time.time(), {"n": n}, 10, 0)
        for n in range(count)
    ]


def finished_run(ledger: Ledger, outbox: list[Send], run_id: str = "r") -> None:
    ledger.run_started()
    ledger.run_finished(Result(run_id), outbox)
    ledger.handed_off(1)


def test_a_batch_finishes_only_its_open_records_and_counts_them_once() -> None:
    ledger = Ledger()
    outbox = sends(5)
    finished_run(ledger, outbox)
    settle([outbox[0]], "failed", error="refused alone")
    reschedule([outbox[1]], "timeout")
    settle(outbox, "delivered", detail={"table": "t"})
    assert [send.status for send in outbox] == ["failed", *["delivered"] * 4]
    assert outbox[0].detail == {}  # a final record is left as it was
    assert outbox[1].detail == {"table": "t"} and outbox[1].error is None
    assert ledger.stats()["destinations"]["sql"] == {
        "accepted": 5, "delivered": 4, "failed": 1, "retries": 1, "pending": 0,
        "retrying": 0,  # in backoff now: the rescheduled one is delivered
    }  # fmt: skip
    assert ledger.unfinished == 0 and ledger.wait_idle(0)


def test_records_of_two_ledgers_finished_together_are_counted_by_each() -> None:
    first, second = Ledger(), Ledger()
    one, two = sends(2, run_id="a"), sends(3, run_id="b")
    finished_run(first, one, "a")
    finished_run(second, two, "b")
    settle_each([Delivered(send, {"n": i}) for i, send in enumerate(one + two)])
    assert first.stats()["destinations"]["sql"]["delivered"] == 2
    assert second.stats()["destinations"]["sql"]["delivered"] == 3
    assert [d.detail for d in second.deliveries("b")] == [{"n": 2}, {"n": 3}, {"n": 4}]


def test_a_final_record_lets_go_of_its_ledger() -> None:
    ledger = Ledger()
    outbox = sends(2)
    finished_run(ledger, outbox)
    assert all(send.outcome.ledger is ledger for send in outbox)
    settle([outbox[0]], "delivered")
    settle([outbox[1]], "failed", error="gone")
    assert [send.outcome.ledger for send in outbox] == [None, None]
    assert [d.status for d in ledger.deliveries("r")] == ["delivered", "failed"]


def test_history_keeps_the_last_runs() -> None:
    ledger = Ledger(run_history=3)
    for n in range(5):
        finished_run(ledger, sends(1, run_id=f"run-{n}"), f"run-{n}")
    assert [len(ledger.deliveries(f"run-{n}")) for n in (2, 3, 4)] == [1, 1, 1]
    for gone in ("run-0", "run-1"):
        with pytest.raises(KeyError, match="the last 3 runs"):
            ledger.deliveries(gone)


def test_history_drops_the_oldest_runs_when_they_hold_too_many_records() -> None:
    ledger = Ledger(run_history=100, delivery_history=10)
    for n, count in enumerate([4, 4, 4, 25, 1]):
        finished_run(ledger, sends(count, run_id=f"run-{n}"), f"run-{n}")
    # run-3 alone holds more than the bound: the newest run is always kept
    assert len(ledger.deliveries("run-4")) == 1
    for gone in ("run-0", "run-1", "run-2", "run-3"):
        with pytest.raises(KeyError, match="delivery_history"):
            ledger.deliveries(gone)
    assert ledger.stats()["destinations"]["sql"]["accepted"] == 38  # counters keep everything


def test_counts_stay_exact_and_waiters_wake_with_many_threads() -> None:
    """Runs start, finish and deliver on several threads at once, as in a runtime."""
    ledger = Ledger()
    threads, runs_each, sends_each = 6, 300, 3
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(ledger.wait_idle(30)))

    def work(worker: int) -> None:
        for n in range(runs_each):
            run_id = f"{worker}-{n}"
            outbox = sends(sends_each, run_id=run_id)
            ledger.run_started()
            ledger.run_finished(Result(run_id), outbox)
            ledger.handed_off(1)
            if n % 2:
                settle(outbox, "delivered")
            else:
                for send in outbox:
                    settle([send], "delivered")

    ledger.run_started()  # holds the waiter until every worker has finished
    waiter.start()
    workers = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(30)
    assert waiter.is_alive()  # one run is still in flight
    ledger.run_finished(Result("holder"))
    waiter.join(10)
    assert woke == [True]
    total = threads * runs_each * sends_each
    assert ledger.stats()["destinations"]["sql"] == {
        "accepted": total, "delivered": total, "failed": 0, "pending": 0,
    }  # fmt: skip
    assert ledger.stats()["runs"] == {"succeeded": threads * runs_each + 1}
    assert ledger.runs_in_flight == 0 and ledger.unfinished == 0


def test_a_final_send_lets_go_of_its_payload_and_snapshots_are_plain_records() -> None:
    ledger = Ledger()
    outbox = sends(3)
    finished_run(ledger, outbox)
    settle([outbox[0]], "delivered", detail={"table": "t"})
    settle([outbox[1]], "delivered")
    assert [send.payload for send in outbox] == [None, None, {"n": 2}]  # the last is pending
    snapshots = ledger.deliveries("r")
    assert [type(snapshot) for snapshot in snapshots] == [Delivery] * 3
    assert [(d.status, d.detail) for d in snapshots] == [
        ("delivered", {"table": "t"}), ("delivered", {}), ("pending", {}),
    ]  # fmt: skip
    snapshots[0].detail["changed"] = True  # a copy: the record is not touched
    assert outbox[0].detail == {"table": "t"}


def test_a_send_is_what_was_asked_and_cannot_be_changed() -> None:
    (send,) = sends(1)
    for name, value in [("id", "other"), ("payload", {}), ("destination", "http"), ("size", 1)]:
        with pytest.raises(AttributeError):
            setattr(send, name, value)
    send.attempts += 1  # what happened is its outcome's, which destinations may count on
    assert (send.outcome.attempts, send.status, send.final) == (1, "pending", False)


def test_every_way_of_settling_goes_through_one_path_and_settles_a_send_once() -> None:
    """One send, a batch, each with its own outcome: each send is counted final exactly once."""
    ledger = Ledger()
    seen: list[str] = []
    ledger.add_listener(lambda send: seen.append(send.id))
    outbox = sends(6)
    finished_run(ledger, outbox)
    settle([outbox[0]], "delivered")
    settle(outbox[:3], "failed", error=ValueError("bad"))  # the first is final already
    settle_each([Delivered(outbox[3]), Failure(outbox[4], "no"), Failure(outbox[0], "late")])
    reschedule([outbox[5], outbox[1]], "timeout")  # only the open one is retried
    assert [send.status for send in outbox] == [
        "delivered", "failed", "failed", "delivered", "failed", "retrying",
    ]  # fmt: skip
    assert outbox[1].error == "ValueError: bad" and outbox[4].error == "no"
    assert sorted(seen) == sorted(send.id for send in outbox[:5])
    assert ledger.stats()["destinations"]["sql"] == {
        "accepted": 6, "delivered": 2, "failed": 3, "retries": 1, "pending": 1,
        "retrying": 1,  # in backoff now
    }  # fmt: skip


CORE = ["backoff", "base", "batching", "budget", "bulk", "deadletter", "delivery", "json_encoding"]
CORE += ["retrying", "journaling"]


def core_imports() -> dict[str, set[str]]:
    """The destinations modules each core module imports (type-checking imports too)."""
    root = Path(outbound.destinations.__file__).parent
    graph: dict[str, set[str]] = {}
    for name in CORE:
        tree = ast.parse((root / f"{name}.py").read_text())
        found: set[str] = set()
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            for module in modules:
                if module.startswith("outbound.destinations."):
                    found.add(module.split(".")[2])
        graph[name] = found
    return graph


def test_the_delivery_core_imports_no_destination_and_has_no_import_circle() -> None:
    graph = core_imports()
    assert {name: deps - set(CORE) for name, deps in graph.items()} == {n: set() for n in CORE}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join((*path, name))}"
        if name not in done:
            for dependency in graph[name]:
                visit(dependency, (*path, name))
            done.add(name)

    for name in CORE:
        visit(name, ())
