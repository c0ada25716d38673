"""Helpers shared by benchmark scenarios: timing, a sink in its own process, memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from outbound.destinations.base import Destination


class Counting(Destination):
    """An in-memory destination that only counts: the cheapest possible delivery."""

    def deliver(self, sends: list[Any]) -> None:
        for send in sends:
            self.delivered(send)


#: The embedded h11 sink (records requests, scripted answers): `python -m outbound.embedded sink`.
EMBEDDED_SINK = ("outbound.embedded", "sink")


@contextmanager
def sink_process(delay: float = 0.0, command: tuple[str, ...] = EMBEDDED_SINK) -> Iterator[str]:
    """An HTTP sink on 127.0.0.1 in a child process (its CPU is not ours); yields its URL.

    `command`: the module (and arguments) run with `python -m`; it prints its
    port on its first line and takes `--delay`.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", *command, "--delay", str(delay)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


class Stopwatch:
    """Wall-clock `seconds` and this process's CPU seconds (`cpu_seconds`, all threads)."""

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu_seconds = time.process_time() - self.cpu_started


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)
