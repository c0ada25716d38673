"""The state machine of a runtime: new, starting, running, stopping, stopped.

Owns `Lifecycle`: which transitions are allowed (`start` of a running runtime
is a no-op, of one starting or stopping an error; a second `stop` waits for
the first and gets its report), the lock that guards them, and
`drain_on_signal` (what a stop signal does to a runtime). The work of a start
or a stop is the caller's, passed in as a function; this module must not
import the runtime facade, the machinery or the destinations.

The lock is re-entrant because a stop signal's handler runs on the main
thread between two bytecodes, possibly while that thread holds the lock for a
transition: the handler's `stop()` then takes it again instead of waiting for
itself forever.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from outbound.shutdown import ShutdownReport
from outbound.signals import SignalHandlers

logger = logging.getLogger(__name__)


@dataclass
class Stopping:
    """A `stop()` in progress: later callers wait for it and get its report."""

    done: threading.Event = field(default_factory=threading.Event)
    report: ShutdownReport = field(default_factory=lambda: ShutdownReport(drained=False))


class Lifecycle:
    """The state of one runtime and its transitions; `state` is one of the five names."""

    def __init__(self) -> None:
        self.state = "new"
        self.lock = threading.RLock()  # re-entrant: see the module's docstring
        self._stopping: Stopping | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def start(self, start_machinery: Callable[[], None]) -> None:
        """Run `start_machinery` and become running, unless running already."""
        with self.lock:
            if self.state == "running":
                return
            if self.state not in ("new", "stopped"):
                raise RuntimeError(f"the runtime is {self.state}; wait for that to finish")
            self.state = "starting"
        start_machinery()
        self.state = "running"

    def stop(
        self, stop_machinery: Callable[[], ShutdownReport], after: Callable[[], None]
    ) -> ShutdownReport:
        """Run `stop_machinery` once (then `after`, even if it raised) and become stopped.

        A runtime never started, or stopped already, has nothing to stop. A
        `stop` while another runs waits for that one and returns its report.
        """
        with self.lock:
            if self.state in ("new", "stopped"):
                self.state = "stopped"
                return ShutdownReport(drained=True)
            stopping = self._stopping
            if self.state == "stopping" and stopping is not None:
                first = False
            else:
                first, self.state = True, "stopping"
                stopping = self._stopping = Stopping()
        if not first:
            stopping.done.wait()
            return stopping.report
        try:
            stopping.report = stop_machinery()
        finally:
            self.state = "stopped"
            self._stopping = None
            after()
            stopping.done.set()
        return stopping.report

    def check_may_run(self, while_stopping: bool) -> None:
        """Raise unless a run may start now (runs started by an emit also while stopping)."""
        state = self.state
        if state != "running" and not (while_stopping and state == "stopping"):
            raise RuntimeError(
                f"the runtime is {state}: call rt.start() or use `with rt:` before running"
            )


def drain_on_signal(
    signum: int,
    frame: FrameType | None,
    lifecycle: Lifecycle,
    stop: Callable[[], ShutdownReport],
    handlers: SignalHandlers | None,
) -> None:
    """A stop signal: drain a running runtime with `stop()`, then chain to the previous handler.

    A second signal while draining finds the runtime stopping and chains at
    once, skipping the wait.
    """
    if lifecycle.running:
        logger.warning("received %s: draining the runtime", signal.Signals(signum).name)
        report = stop()
        logger.warning(
            "stopped: %s",
            "every delivery is final"
            if report.drained
            else f"{report.dead_lettered} undelivered sends in {report.dead_letter_dir}",
        )
    if handlers is not None:
        handlers.chain(signum, frame)
