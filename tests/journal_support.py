"""Helpers for the journal crash tests (tests/test_journal_crash.py): processes and arrivals.

Owns `Child` (a `tests/journal_child.py` process: started with the servers'
environment, watched through its log file, killed with a real SIGKILL or
stopped with SIGTERM), `nats_servers_using` (which nats-server processes still use a directory, read
from /proc), `SwitchableResponder` (the HTTP sink's answers: 503 for a path
while it is "down", and a record of the requests answered 200), `RunStream`
(runs submitted from a thread at a steady pace, in this process), and the
readers of what each service received (`Arrivals`), each through the test's
own client, never through the code under test. Knows nothing of the journal's
internals: only the public contract (README, issue 14).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sql_support import Db

from outbound.embedded import ReceivedRequest, SinkResponse, SmtpServer

CHILD_PROGRAM = Path(__file__).with_name("journal_child.py")
STATUS = "@status "  # how the child marks its protocol lines in its log


# -- the child program ------------------------------------------------------------------


@dataclass(frozen=True)
class ChildPlan:
    """What one run of `journal_child.py` does (its command line)."""

    ack_file: Path
    first: int  # sequence numbers first .. first + count - 1
    count: int
    kinds: tuple[str, ...]  # destinations each run sends to: http, s3, sql, email
    names: TestNames
    then: str = "hold"  # "hold": wait to be killed; "finish": flush, stop, report, exit 0
    signals: bool = False  # rt.install_signal_handlers()
    publish: bool = False  # rt.publish() each event instead of rt.submit()
    run_delay: float = 0.0  # seconds each run sleeps before it sends
    pace: float = 0.0  # seconds between two submits

    def arguments(self) -> list[str]:
        arguments = [
            f"--ack-file={self.ack_file}",
            f"--first={self.first}",
            f"--count={self.count}",
            f"--kinds={','.join(self.kinds)}",
            f"--http-url={self.names.http_url}",
            f"--bucket={self.names.bucket}",
            f"--prefix={self.names.prefix}",
            f"--table={self.names.table}",
            f"--subject={self.names.subject}",
            f"--then={self.then}",
        ]
        if self.signals:
            arguments.append("--signals")
        if self.publish:
            arguments.append("--publish")
        return [*arguments, f"--run-delay={self.run_delay}", f"--pace={self.pace}"]


class Child:
    """A running `journal_child.py`; its output (stdout and stderr) goes to `log_path`."""

    def __init__(self, plan: ChildPlan, env: Mapping[str, str], log_path: Path) -> None:
        self.plan = plan
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(CHILD_PROGRAM), *plan.arguments()],
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest is not also the child's signal
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def statuses(self) -> list[str]:
        return [line[len(STATUS) :] for line in self.log().splitlines() if line.startswith(STATUS)]

    def wait_for_status(self, word: str, timeout: float = 30.0) -> str:
        """Wait until the child reports `word` (a line `@status word ...`); return that line."""
        deadline = time.monotonic() + timeout
        while True:
            for status in self.statuses():
                if status.split(" ", 1)[0] == word:
                    return status
            exited = self.process.poll()
            assert exited is None, f"the child exited ({exited}) before {word!r}:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {word!r} from the child:\n{self.log()}"
            time.sleep(0.01)

    def kill_9(self, with_servers_using: Path | None = None) -> None:
        """SIGKILL: no handler, no atexit, no flush; what a kill -9 or an OOM kill does.

        `with_servers_using`: also SIGKILL, in the same instant, the nats-servers
        that use that directory (a container's OOM kill takes every process).
        """
        servers = nats_servers_using(with_servers_using) if with_servers_using else []
        for pid in [self.process.pid, *servers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the child did not exit in {timeout} s:\n{self.log()}") from None

    def finish_report(self, timeout: float = 60.0) -> dict[str, Any]:
        """For `then="finish"`: wait for its exit (0) and return what it reported."""
        code = self.wait(timeout)
        assert code == 0, f"the child exited with {code}:\n{self.log()}"
        line = self.wait_for_status("finished", timeout=0)
        return dict(json.loads(line.split(" ", 1)[1]))

    def close(self) -> None:
        """Kill the child if it still runs (a failing test must not leave it behind)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def read_acknowledged(path: Path) -> set[int]:
    """The sequence numbers the children recorded as acknowledged (settled runs).

    A kill may cut the last line short: only whole lines count.
    """
    if not path.exists():
        return set()
    text = path.read_text()
    lines = text.split("\n")[:-1]  # the part after the last newline is unfinished
    return {int(line) for line in lines if line}


# -- services, and the names one test uses on them -----------------------------------------


@dataclass(frozen=True)
class TestNames:
    """Where one test's sends go, distinct from every other test's on the shared servers."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    http_url: str
    http_path: str
    bucket: str
    prefix: str
    table: str
    subject: str  # emails are "<subject> <seq>"


class SwitchableResponder:
    """The HTTP sink's answers: 503 on paths that are down, else 200, recording the 200s."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.down: set[str] = set()
        self.answered_ok: list[ReceivedRequest] = []

    def __call__(self, request: ReceivedRequest) -> SinkResponse:
        with self._lock:
            if request.path in self.down:
                return SinkResponse(status=503, body=b"down for the test")
            self.answered_ok.append(request)
        return SinkResponse()

    def delivered_to(self, path: str) -> list[ReceivedRequest]:
        with self._lock:
            return [request for request in self.answered_ok if request.path == path]


@dataclass
class Services:
    """The real servers the tests share: an HTTP sink, moto's S3, SMTP and Postgres."""

    http_url: str
    responder: SwitchableResponder
    s3_config: dict[str, Any]
    smtp: SmtpServer
    database_url: str

    def config(self) -> dict[str, Any]:
        """`Config(...)` keyword arguments for an in-process runtime."""
        return {
            **self.s3_config,
            **self.smtp.config(),
            "database_url": self.database_url,
            "s3_create_buckets": True,
        }

    def env(self, journal: str, data_dir: Path, **settings: Any) -> dict[str, str]:
        """The environment of a child: every `OUTBOUND_*` setting it needs, nothing inherited."""
        return child_env(self.config(), journal, data_dir, **settings)


def child_env(
    config: Mapping[str, Any], journal: str, data_dir: Path, **settings: Any
) -> dict[str, str]:
    """A child's environment: `config` and `settings` as `OUTBOUND_*` variables, no other."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OUTBOUND_")}
    values = {
        **config,
        "journal": journal,
        "data_dir": data_dir,
        "batch_max_age": 0.3,  # batches are still open at most kill points
        "retry_base": 0.01,
        "retry_cap": 0.2,
        **settings,
    }
    for name, value in values.items():
        env[f"OUTBOUND_{name.upper()}"] = str(int(value) if isinstance(value, bool) else value)
    return env


# -- what each service received ---------------------------------------------------------


@dataclass
class Arrivals:
    """What one service received: how often each sequence number, and under which ids."""

    destination: str
    copies: Counter[int] = field(default_factory=Counter)
    ids: dict[int, set[str]] = field(default_factory=dict)

    def add(self, seq: int, delivery_id: str | None = None) -> None:
        self.copies[seq] += 1
        if delivery_id is not None:
            self.ids.setdefault(seq, set()).add(delivery_id)

    def missing(self, acknowledged: Iterable[int]) -> list[int]:
        return sorted(seq for seq in acknowledged if not self.copies[seq])

    @property
    def duplicates(self) -> int:
        """Copies beyond the first, over all sequence numbers."""
        return sum(count - 1 for count in self.copies.values() if count > 1)

    def with_differing_ids(self) -> dict[int, set[str]]:
        """Sequence numbers that arrived more than once under different delivery ids."""
        return {seq: ids for seq, ids in self.ids.items() if len(ids) > 1}

    def summary(self, acknowledged: set[int]) -> str:
        return (
            f"{self.destination}: {len(self.copies)} numbers delivered "
            f"({sum(self.copies.values())} copies, {self.duplicates} duplicates), "
            f"{len(self.missing(acknowledged))} of {len(acknowledged)} acknowledged missing"
        )


def http_arrivals(responder: SwitchableResponder, path: str) -> Arrivals:
    """Requests answered 200 on `path`, by the `seq` of their JSON body and Idempotency-Key."""
    arrivals = Arrivals("http")
    for request in responder.delivered_to(path):
        arrivals.add(int(request.json()["seq"]), request.headers.get("idempotency-key", ""))
    return arrivals


def sql_arrivals(db: Db, table: str) -> Arrivals:
    """Rows of `table`, by their `seq` column and `_event_id`."""
    arrivals = Arrivals("sql")
    exists = db.value("SELECT to_regclass($1) IS NOT NULL", f'"{table}"')
    if exists:
        for row in db.fetch(f'SELECT seq, _event_id FROM "{table}"'):
            arrivals.add(int(row["seq"]), str(row["_event_id"]))
    return arrivals


def s3_arrivals(s3_client: Any, bucket: str, prefix: str) -> Arrivals:
    """Every JSON line of every object under `prefix` (gunzipped: the objects are .gz)."""
    arrivals = Arrivals("s3")
    buckets = {entry["Name"] for entry in s3_client.list_buckets().get("Buckets", [])}
    if bucket not in buckets:
        return arrivals
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for entry in page.get("Contents", []):
            body = s3_client.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
            if entry["Key"].endswith(".gz"):
                body = gzip.decompress(body)
            for line in body.splitlines():
                if line.strip():
                    arrivals.add(int(json.loads(line)["seq"]))
    return arrivals


def email_arrivals(smtp: SmtpServer, subject: str) -> Arrivals:
    """Messages whose subject is `<subject> <seq>`, by seq and Message-ID."""
    arrivals = Arrivals("email")
    for message in list(smtp.messages):
        words = message.subject.split(" ")
        if len(words) == 2 and words[0] == subject:
            arrivals.add(int(words[1]), str(message.message["Message-ID"]))
    return arrivals


# -- a stream of runs in this process ---------------------------------------------------


class RunStream:
    """Submits `total` runs of `workflow_id` (`{"seq": N}`) from a thread, one every `pace` s.

    `futures` holds them in submit order. `join()` waits for the thread (a
    submit may wait for room: backpressure); the test must call it.
    """

    def __init__(self, rt: Any, workflow_id: str, total: int, pace: float = 0.002) -> None:
        self.rt = rt
        self.workflow_id = workflow_id
        self.total = total
        self.pace = pace
        self.futures: list[Any] = []
        self._thread = threading.Thread(target=self._submit_all, name="test-run-stream")

    def _submit_all(self) -> None:
        for seq in range(self.total):
            self.futures.append(self.rt.submit(self.workflow_id, {"seq": seq}))
            time.sleep(self.pace)  # still coming when a server dies

    def start(self) -> RunStream:
        self._thread.start()
        return self

    @property
    def settled(self) -> int:
        return sum(future.done() for future in list(self.futures))

    @property
    def submitting(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = 60.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"submit() still blocked after {timeout} s"

    def acknowledged(self, timeout: float = 60.0) -> set[int]:
        """Wait for every run; the numbers of those that succeeded (all, unless a bug)."""
        results = [future.result(timeout=timeout) for future in self.futures]
        failed = [result for result in results if result.status != "succeeded"]
        assert not failed, f"{len(failed)} runs did not succeed, first: {failed[:2]}"
        return set(range(len(results)))


# -- nats-server processes ----------------------------------------------------------------


def nats_servers_using(directory: Path) -> list[int]:
    """Pids of live nats-server processes that name `directory` or hold files under it.

    Read from /proc: the command line, the working directory and every open
    file descriptor. Zombies (dead, not yet reaped) have none of these.
    """
    needle = str(directory.resolve())
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "nats-server":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            places = [cmdline, os.readlink(entry / "cwd")]
            fds = entry / "fd"
            for fd in fds.iterdir():
                try:
                    places.append(os.readlink(fd))
                except OSError:
                    continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if any(needle in place for place in places):
            found.append(int(entry.name))
    return found


def kill_nats_servers_using(directory: Path) -> list[int]:
    """Clean-up after a failed test: SIGKILL what `nats_servers_using` finds; return them."""
    pids = nats_servers_using(directory)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids
