"""Timers for actors: "tell me this message after N seconds" and periodic ticks.

Owns `Timers`, one thread holding a heap of due times. pykka has no timers, and
a sleeping actor would hold its thread (or a pool worker), so actors ask the
timer service instead and get an ordinary message when the time comes. A timer
whose recipient has stopped is dropped silently.

Knows nothing of workflows or destinations.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Recipient(Protocol):
    def tell(self, message: Any) -> None: ...


class TimerHandle:
    """Returned by `Timers.after` / `Timers.every`; `cancel()` is idempotent."""

    __slots__ = ("cancelled", "interval")

    def __init__(self, interval: float | None) -> None:
        self.cancelled = False
        self.interval = interval

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """A single thread that tells actors their messages when they fall due."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, name: str = "outbound-timers"):
        self._clock = clock
        self._heap: list[tuple[float, int, TimerHandle, Recipient, Any]] = []
        self._sequence = itertools.count()
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def after(self, delay: float, recipient: Recipient, message: Any) -> TimerHandle:
        """Tell `recipient` `message` once, `delay` seconds from now."""
        return self._schedule(max(0.0, delay), None, recipient, message)

    def every(self, interval: float, recipient: Recipient, message: Any) -> TimerHandle:
        """Tell `recipient` `message` every `interval` seconds until cancelled."""
        if interval <= 0:
            raise ValueError(f"timer interval must be positive, got {interval!r}")
        return self._schedule(interval, interval, recipient, message)

    def _schedule(
        self, delay: float, interval: float | None, recipient: Recipient, message: Any
    ) -> TimerHandle:
        handle = TimerHandle(interval)
        with self._wakeup:
            if self._closed:
                raise RuntimeError("timers are shut down")
            entry = (self._clock() + delay, next(self._sequence), handle, recipient, message)
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._wakeup.notify()
        return handle

    def pending(self) -> int:
        with self._wakeup:
            return sum(1 for entry in self._heap if not entry[2].cancelled)

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._closed:
                    if not self._heap:
                        self._wakeup.wait()
                        continue
                    due = self._heap[0][0] - self._clock()
                    if due <= 0:
                        break
                    self._wakeup.wait(due)
                if self._closed:
                    return
                when, _, handle, recipient, message = heapq.heappop(self._heap)
                if handle.interval is not None and not handle.cancelled:
                    # Reschedule from the due time, not from now, so ticks do not drift.
                    entry = (
                        when + handle.interval,
                        next(self._sequence),
                        handle,
                        recipient,
                        message,
                    )
                    heapq.heappush(self._heap, entry)
            if handle.cancelled:
                continue
            try:
                recipient.tell(message)
            except Exception:  # the recipient stopped: its timers die with it
                handle.cancel()
                logger.debug("timer recipient %r is gone; timer cancelled", recipient)

    def shutdown(self, timeout: float | None = 5.0) -> None:
        with self._wakeup:
            self._closed = True
            self._heap.clear()
            self._wakeup.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
