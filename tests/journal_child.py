"""A program that embeds a Runtime, for the journal crash tests (tests/test_journal_crash.py).

Its configuration comes from `OUTBOUND_*` variables (`Config.from_env()`: the
journal, the data directory, the servers); its command line says which runs
to make. Each run of the `crash` workflow sends `{"seq": N}` once to each
destination named by `--kinds` (email: subject `<subject> N`). After a run's
future settles as succeeded, N is appended to `--ack-file`: the program's own
record of what the runtime acknowledged, written with one `write` per line so
a SIGKILL cannot lose a line the kernel already has (and fsync'd every few
lines). Protocol lines on stdout start with `@status `:
`started` (after `rt.start()`), `submitted N`, `settled N` (with
`--publish`, the runs are `rt.publish`ed instead, each acknowledged when
`publish` returns, then `published N`), and with
`--then=finish`, `finished {json}` (after flush and stop) before it exits 0.
With `--then=hold` it waits after the last run until a signal ends it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import threading
import time
from typing import Any

from outbound import Config, Runtime

FSYNC_EVERY = 16  # lines; a SIGKILL loses nothing written, only a machine crash would


class AckFile:
    """Appends acknowledged sequence numbers, one line per `write` (thread-safe)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.lock = threading.Lock()
        self.unsynced = 0

    def record(self, seq: int) -> None:
        with self.lock:
            os.write(self.fd, b"%d\n" % seq)
            self.unsynced += 1
            if self.unsynced >= FSYNC_EVERY:
                os.fsync(self.fd)
                self.unsynced = 0


def status(text: str) -> None:
    print(f"@status {text}", flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ack-file", required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--kinds", default="http,s3,sql,email")
    parser.add_argument("--http-url", default="")
    parser.add_argument("--bucket", default="")
    parser.add_argument("--prefix", default="")
    parser.add_argument("--table", default="")
    parser.add_argument("--subject", default="seq")
    parser.add_argument("--then", choices=("hold", "finish"), default="hold")
    parser.add_argument("--signals", action="store_true", help="rt.install_signal_handlers()")
    parser.add_argument("--publish", action="store_true", help="rt.publish() instead of submit()")
    parser.add_argument("--run-delay", type=float, default=0.0, help="seconds each run takes")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between two submits")
    parser.add_argument("--flush-timeout", type=float, default=45.0)
    parser.add_argument("--stop-timeout", type=float, default=10.0)
    return parser.parse_args(argv)


def make_runtime(arguments: argparse.Namespace) -> Runtime:
    rt = Runtime(Config.from_env())
    kinds = set(arguments.kinds.split(","))

    @rt.workflow("crash")
    def crash(event: dict[str, Any], ctx: Any) -> None:
        if arguments.run_delay:
            time.sleep(arguments.run_delay)  # runs still to come when the process is killed
        payload = {"seq": event["seq"]}
        if "http" in kinds:
            ctx.send.http(url=arguments.http_url, method="POST", data=payload)
        if "s3" in kinds:
            ctx.send.s3(bucket=arguments.bucket, prefix=arguments.prefix, payload=payload)
        if "sql" in kinds:
            ctx.send.sql(table=arguments.table, payload=payload)
        if "email" in kinds:
            seq = event["seq"]
            ctx.send.email(subject=f"{arguments.subject} {seq}", text=f"number {seq}")

    return rt


def submit_all(rt: Runtime, numbers: range, acks: AckFile, pace: float) -> None:
    """Submit a run per number; record each as its future settles; wait for them all."""

    def settled(seq: int, future: concurrent.futures.Future[Any]) -> None:
        error = future.exception()
        if error is None and future.result().status == "succeeded":
            acks.record(seq)
        else:
            print(f"run {seq} did not succeed: {error or future.result()}", file=sys.stderr)

    futures = []
    for seq in numbers:
        future = rt.submit("crash", {"seq": seq})
        future.add_done_callback(lambda done, seq=seq: settled(seq, done))
        futures.append(future)
        if pace:
            time.sleep(pace)  # a stream of runs that a kill interrupts midway
    status(f"submitted {len(futures)}")
    concurrent.futures.wait(futures)
    status(f"settled {len(futures)}")


def publish_all(rt: Runtime, numbers: range, acks: AckFile) -> None:
    """Publish an event per number; each is acknowledged (journaled) when publish returns."""
    for seq in numbers:
        rt.publish("crash", {"seq": seq})
        acks.record(seq)
    status(f"published {len(numbers)}")


def main(argv: list[str]) -> int:
    arguments = parse(argv)
    acks = AckFile(arguments.ack_file)
    rt = make_runtime(arguments)
    if arguments.signals:
        rt.install_signal_handlers()
    rt.start()
    status("started")

    numbers = range(arguments.first, arguments.first + arguments.count)
    if arguments.publish:
        publish_all(rt, numbers, acks)
    else:
        submit_all(rt, numbers, acks, arguments.pace)
    if arguments.then == "hold":
        while True:  # a signal ends it: SIGKILL, or SIGTERM through the runtime's handler
            time.sleep(1)
    flushed = rt.flush(timeout=arguments.flush_timeout)
    report = rt.stop(timeout=arguments.stop_timeout)
    finished = {
        "flushed": flushed,
        "drained": report.drained,
        "dead_lettered": report.dead_lettered,
        "left_in_journal": getattr(report, "left_in_journal", None),
        "errors": report.errors,
    }
    status(f"finished {json.dumps(finished)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
