"""A send that fails for good is dead-lettered when it fails: payload, ids, error, owner-only.

Against a real HTTP server on 127.0.0.1: a final 4xx and a send out of attempts
are in `<data_dir>/dead-letter/` before `stop()`, the file is 0600 and its
directory 0700 whatever the umask, and the WARNING that says so holds no secret.
The settle path itself (`destinations.delivery`) is tested with a real writer.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from outbound import Runtime
from outbound.actors.ids import new_id
from outbound.destinations.deadletter import DeadLetterWriter
from outbound.destinations.delivery import Failure, Ledger, Send, new_send, settle, settle_each
from outbound.embedded import HttpSink, SinkResponse

PASSWORD = "hunter2-never-logged"
API_KEY = "key-never-logged"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Files and directories would be world-readable and writable under this umask."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_a_final_4xx_is_dead_lettered_at_once_owner_only_and_logged_without_secrets(
    make_runtime: Callable[..., Runtime],
    make_sink: Callable[..., HttpSink],
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
    open_umask: None,
) -> None:
    sink = make_sink(lambda _request: SinkResponse(422, body=b"unprocessable"))
    rt = make_runtime()

    @rt.workflow("p")
    def hook(event: Any, ctx: Any) -> None:
        ctx.send.http(
            sink.url + "/hook",
            data=event,
            auth=("user", PASSWORD),
            headers={"X-Api-Key": API_KEY},
        )

    with caplog.at_level(logging.WARNING):
        result = rt.run("p", {"order": 7})
        assert rt.flush(timeout=10)
    (record,) = rt.deliveries(result.run_id)
    assert record.status == "failed" and record.error == "HTTP 422"

    # Written while the runtime runs, named on the record.
    assert rt.running
    path = Path(record.detail["dead_letter"])
    assert path.parent == data_dir / "dead-letter" and path.name.startswith("http-")
    (line,) = lines_of(path)
    assert line["delivery_id"] == record.id and line["run_id"] == result.run_id
    assert line["error"] == "HTTP 422" and line["attempts"] == 1
    assert json.loads(line["payload"]["body"]) == {"order": 7}
    assert line["payload"]["url"] == sink.url + "/hook"
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700 and mode(data_dir) == 0o700

    warnings = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(warnings) == 1 and record.id in warnings[0] and "HTTP 422" in warnings[0]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "dead-lettered" in r.msg)
    basic = base64.b64encode(f"user:{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, API_KEY, basic):
        assert secret not in caplog.text

    report = rt.stop(timeout=5)
    assert report.drained and report.dead_lettered == 0
    assert len(lines_of(path)) == 1  # stop() did not write it again


def test_a_send_out_of_attempts_is_dead_lettered_at_once(
    make_runtime: Callable[..., Runtime], make_sink: Callable[..., HttpSink], data_dir: Path
) -> None:
    sink = make_sink(lambda _request: SinkResponse(503))
    rt = make_runtime(http_max_attempts=3)
    rt.register("p", lambda event, ctx: ctx.send.http(sink.url + "/busy", data=event))
    result = rt.run("p", {"n": 1})
    assert rt.flush(timeout=20)
    (record,) = rt.deliveries(result.run_id)
    assert record.status == "failed" and record.attempts == 3
    assert record.error == "HTTP 503 (gave up after 3 attempts)"
    (line,) = lines_of(Path(record.detail["dead_letter"]))
    assert line["delivery_id"] == record.id and line["attempts"] == 3
    assert line["error"] == record.error and json.loads(line["payload"]["body"]) == {"n": 1}
    assert len(sink.requests) == 3


def test_an_existing_dead_letter_directory_and_file_are_tightened(
    make_runtime: Callable[..., Runtime], make_sink: Callable[..., HttpSink], data_dir: Path
) -> None:
    directory = data_dir / "dead-letter"
    directory.mkdir(parents=True)
    directory.chmod(0o755)
    sink = make_sink(lambda _request: SinkResponse(404))
    rt = make_runtime()
    rt.register("p", lambda event, ctx: ctx.send.http(sink.url + "/gone", data=event))
    first = rt.run("p", {"n": 1})
    assert rt.flush(timeout=10)
    path = Path(rt.deliveries(first.run_id)[0].detail["dead_letter"])
    path.chmod(0o644)
    second = rt.run("p", {"n": 2})
    assert rt.flush(timeout=10)
    assert rt.deliveries(second.run_id)[0].detail["dead_letter"] == str(path)  # one file
    assert [json.loads(line["payload"]["body"])["n"] for line in lines_of(path)] == [1, 2]
    assert mode(directory) == 0o700 and mode(path) == 0o600


# -- the settle path, with a real writer --------------------------------------------------


def sends(count: int, destination: str = "custom") -> list[Send]:
    return [
        new_send(destination, new_id(), "r", "p", time.time(), {"n": n}, 10, 0)
        for n in range(count)
    ]


class Result:
    run_id = "r"
    status = "succeeded"


def registered(ledger: Ledger, outbox: list[Send]) -> list[Send]:
    ledger.run_started()
    ledger.run_finished(Result(), outbox)
    ledger.handed_off(1)
    return outbox


def test_ten_thousand_failures_settled_together_are_one_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(dead_letters=DeadLetterWriter(tmp_path))
    outbox = registered(ledger, sends(10_000))
    with caplog.at_level(logging.WARNING):
        settle_each(
            [Failure(send, f"refused row {n}", {"table": "t"}) for n, send in enumerate(outbox)]
        )
    (warning,) = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert "10000 failed 'custom' send(s)" in warning.getMessage()
    (path,) = (tmp_path / "dead-letter").iterdir()
    lines = lines_of(path)
    assert [line["payload"]["n"] for line in lines] == list(range(10_000))
    assert lines[9_999]["error"] == "refused row 9999"
    assert all(send.payload is None and send.detail["dead_letter"] == str(path) for send in outbox)
    assert ledger.stats()["destinations"]["custom"]["failed"] == 10_000 and ledger.wait_idle(0)


def test_only_failures_are_written_and_never_twice(tmp_path: Path) -> None:
    ledger = Ledger(dead_letters=DeadLetterWriter(tmp_path))
    outbox = registered(ledger, sends(4))
    settle(outbox[:1], "delivered")
    assert not (tmp_path / "dead-letter").exists()  # delivered sends cost no write
    settle([outbox[1]], "failed", error="one record")  # a single failure is written at once too
    elsewhere = str(tmp_path / "s3-object.gz")
    settle(outbox[2:3], "failed", error="written natively", detail={"dead_letter": elsewhere})
    settle(outbox[:3], "failed", error="late")  # all final already: nothing more
    (path,) = (tmp_path / "dead-letter").iterdir()
    assert [line["delivery_id"] for line in lines_of(path)] == [outbox[1].id]
    assert outbox[2].detail["dead_letter"] == elsewhere
    assert outbox[3].status == "pending"
    assert ledger.stats()["destinations"]["custom"]["failed"] == 2


def test_a_failure_that_cannot_be_written_still_settles(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data dir should be")
    ledger = Ledger(dead_letters=DeadLetterWriter(blocker))
    (send,) = registered(ledger, sends(1))
    settle([send], "failed", error="refused")
    assert send.status == "failed" and "dead_letter_error" in send.detail
    assert ledger.stats()["destinations"]["custom"]["failed"] == 1 and ledger.wait_idle(0)
