"""Delivery records and the ledger: counting, waiting, history, from many threads at once."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from outbound.actors.ids import new_id
from outbound.destinations.delivery import (
    Delivery,
    Ledger,
    Outgoing,
    delivered_each,
    finish_all,
    new_send,
)


@dataclass(frozen=True)
class Result:
    """What the ledger reads of a run's result."""

    run_id: str
    status: str = "succeeded"


def sends(count: int, destination: str = "sql", run_id: str = "r") -> list[Outgoing]:
    return [
        new_send(destination, new_id(), run_id, "p", time.time(), {"n": n}, 10, 0)
        for n in range(count)
    ]


def finished_run(ledger: Ledger, outbox: list[Outgoing], run_id: str = "r") -> None:
    ledger.run_started()
    ledger.run_finished(Result(run_id), outbox)
    ledger.handed_off(1)


def test_a_batch_finishes_only_its_open_records_and_counts_them_once() -> None:
    ledger = Ledger()
    outbox = sends(5)
    finished_run(ledger, outbox)
    outbox[0].failed("refused alone")
    outbox[1].retrying("timeout")
    finish_all(outbox, "delivered", {"table": "t"})
    assert [send.status for send in outbox] == ["failed", *["delivered"] * 4]
    assert outbox[0].detail == {}  # a final record is left as it was
    assert outbox[1].detail == {"table": "t"} and outbox[1].error is None
    assert ledger.stats()["destinations"]["sql"] == {
        "accepted": 5, "delivered": 4, "failed": 1, "retries": 1, "pending": 0,
    }  # fmt: skip
    assert ledger.unfinished == 0 and ledger.wait_idle(0)


def test_records_of_two_ledgers_finished_together_are_counted_by_each() -> None:
    first, second = Ledger(), Ledger()
    one, two = sends(2, run_id="a"), sends(3, run_id="b")
    finished_run(first, one, "a")
    finished_run(second, two, "b")
    delivered_each([(send, {"n": i}) for i, send in enumerate(one + two)])
    assert first.stats()["destinations"]["sql"]["delivered"] == 2
    assert second.stats()["destinations"]["sql"]["delivered"] == 3
    assert [d.detail for d in second.deliveries("b")] == [{"n": 2}, {"n": 3}, {"n": 4}]


def test_a_final_record_lets_go_of_its_ledger() -> None:
    ledger = Ledger()
    outbox = sends(2)
    finished_run(ledger, outbox)
    assert all(send._ledger is ledger for send in outbox)
    outbox[0].delivered()
    finish_all([outbox[1]], "failed", {}, "gone")
    assert [send._ledger for send in outbox] == [None, None]
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
                finish_all(outbox, "delivered", {})
            else:
                for send in outbox:
                    send.delivered()

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
    outbox[0].delivered(table="t")
    finish_all([outbox[1]], "delivered", {})
    assert [send.payload for send in outbox] == [None, None, {"n": 2}]  # the last is pending
    snapshots = ledger.deliveries("r")
    assert [type(snapshot) for snapshot in snapshots] == [Delivery] * 3
    assert [(d.status, d.detail) for d in snapshots] == [
        ("delivered", {"table": "t"}), ("delivered", {}), ("pending", {}),
    ]  # fmt: skip
    snapshots[0].detail["changed"] = True  # a copy: the record is not touched
    assert outbox[0].detail == {"table": "t"}
