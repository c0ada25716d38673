"""Shutdown: drain what is in flight, then dead-letter what is left (or, with a
journal, leave it there for the next start), and report it.

Owns what `Runtime.stop()` does once it has begun (`stop_runtime`): drain runs
and deliveries until the deadline; with a journal, leave what is still open in
it (the next start delivers it: nothing is dead-lettered); without one, have
every destination dead-letter what it still holds (one that fails, raises or does not answer within
`DEAD_LETTER_TIMEOUT` is abandoned and what it left is written from here),
stop the machinery, and return a `ShutdownReport` (never raises). Also owns
`dead_letter_left_by`, which settles what a destination actor that is gone
still held (used too when the supervisor gives up on one). Takes what it needs
as arguments; must not import the runtime facade.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pykka

from outbound.actors import Supervisor
from outbound.backpressure import Backpressure
from outbound.deadlines import time_left
from outbound.destinations.base import DeadLetter, Deliver, unfinished_in
from outbound.destinations.batching import release_held
from outbound.destinations.delivery import (
    Failure,
    Ledger,
    describe_error,
    leave_in_journal,
    settle_each,
)
from outbound.handoff import flush_destinations
from outbound.journal.journal import Journal

logger = logging.getLogger(__name__)

#: Seconds `stop()` waits for one destination to dead-letter what it holds; one
#: that does not answer by then is stuck, and what it left is written instead.
DEAD_LETTER_TIMEOUT = 30.0  # S3 may be encoding and writing hundreds of MiB of objects


@dataclass(frozen=True)
class ShutdownReport:
    """What `Runtime.stop()` did: whether everything was delivered, and what was not."""

    drained: bool
    dead_lettered: int = 0
    dead_letter_dir: Path | None = None
    runs_abandoned: int = 0
    per_destination: dict[str, int] = field(default_factory=dict)
    #: Sends still open, left in the journal: the next start delivers them.
    left_in_journal: int = 0
    #: What went wrong while stopping, by destination (or step): logged, never raised.
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Shutdown:
    """What one stop works with: the runtime's ledger, bounds and destination actors."""

    ledger: Ledger
    backpressure: Backpressure
    destinations: Mapping[str, pykka.ActorRef[Any]]
    failed_destinations: MutableMapping[str, BaseException]
    supervisor: pykka.ActorRef[Supervisor] | None
    data_dir: Path
    default_timeout: float  # OUTBOUND_SHUTDOWN_TIMEOUT
    journal: Journal | None = None

    def drain_and_dead_letter(
        self, drain: bool, timeout: float | None, errors: dict[str, str]
    ) -> ShutdownReport:
        self.backpressure.admission.close()  # submitters waiting for room give up: no new runs
        timeout = self.default_timeout if timeout is None else timeout
        deadline = time.monotonic() + (timeout if drain else 0)
        ledger, drained = self.ledger, False
        try:
            runs_done = ledger.wait_runs(time_left(deadline))
            flush_destinations(ledger, self.backpressure, self.destinations, deadline)
            drained = runs_done and ledger.wait_idle(time_left(deadline))
        except Exception as error:
            logger.exception("draining failed; dead-lettering what is left")
            errors["drain"] = describe_error(error)
        if not drained:
            # Hand-offs waiting on backpressure go through now, so that their
            # sends reach the destinations before these dead-letter what they hold.
            self.backpressure.budget.close()
            ledger.wait_hand_offs(5.0)
        left = 0
        if drained:
            per_destination = {}
        elif self.journal is not None:
            per_destination = {}
            reason = "left in the journal at stop: the next start delivers it"
            left = leave_in_journal(self.journal.open_sends(), reason)
            logger.warning("stopped with %d undelivered sends left in the journal", left)
        else:
            per_destination = self.dead_letter_all("not delivered before shutdown", errors)
        report = ShutdownReport(
            drained=drained,
            dead_lettered=sum(per_destination.values()),
            dead_letter_dir=(self.data_dir / "dead-letter") if per_destination else None,
            runs_abandoned=ledger.runs_in_flight,
            per_destination=per_destination,
            left_in_journal=left,
            errors=errors,
        )
        if report.dead_lettered:
            logger.warning(
                "stopped with %d undelivered sends written to %s: %s",
                report.dead_lettered,
                report.dead_letter_dir,
                per_destination,
            )
        return report

    def dead_letter_all(self, reason: str, errors: dict[str, str]) -> dict[str, int]:
        """Have every destination dead-letter what it holds; one that fails does not stop the rest.

        A destination whose `DeadLetter` raises or does not answer within
        `DEAD_LETTER_TIMEOUT` is abandoned, and what it left (its unfinished
        sends, the hand-offs in its inbox) is dead-lettered from here.
        """
        counts: dict[str, int] = {}
        for name, ref in list(self.destinations.items()):
            try:
                count = ref.ask(DeadLetter(self.data_dir, reason), timeout=DEAD_LETTER_TIMEOUT)
            except pykka.ActorDeadError:
                count = self._dead_letter_quietly(name, ref, reason, errors)
            except Exception as error:
                problem = (
                    f"did not answer within {DEAD_LETTER_TIMEOUT:g} s"
                    if isinstance(error, pykka.Timeout)
                    else f"dead-lettering raised {describe_error(error)}"
                )
                logger.error("destination %r %s; writing what it left", name, problem)
                errors[name] = problem
                self._abandon(name, RuntimeError(f"destination {name!r} {problem} at shutdown"))
                count = self._dead_letter_quietly(name, ref, reason, errors)
            if count:
                counts[name] = count
        return counts

    def _abandon(self, name: str, error: BaseException) -> None:
        """Route no more messages to a destination that is stuck or broken (see `leftovers`)."""
        self.failed_destinations[name] = error
        try:
            assert self.supervisor is not None
            self.supervisor.proxy().abandon_child(name, error).get(timeout=5)
        except Exception:
            logger.exception("could not take destination %r out of service", name)

    def _dead_letter_quietly(self, name: str, ref: Any, reason: str, errors: dict[str, str]) -> int:
        try:
            return dead_letter_left_by(
                name, ref, reason, self.backpressure, self.failed_destinations.get(name)
            )
        except Exception as error:
            logger.exception("dead-lettering what destination %r left failed", name)
            errors[name] = describe_error(error)
            return 0


def dead_letter_left_by(
    name: str,
    ref: Any,
    reason: str,
    backpressure: Backpressure,
    cause: BaseException | None,
) -> int:
    """A destination that is gone (given up on) or abandoned still held sends: settle them.

    They fail and are dead-lettered in one write; what its batches held in the
    memory budget is given back. `cause` is why it stopped, if known.
    """
    if not hasattr(ref, "leftovers"):
        return 0
    durable, messages = ref.leftovers()
    # A copy in one step: an abandoned actor's thread may still wake and change it.
    unfinished = dict(unfinished_in(durable))
    sends = {send.id: send for send in unfinished.values()}
    queued = 0
    for message in messages:
        if isinstance(message, Deliver):
            sends.update((send.id, send) for send in message.sends)
            queued += sum(send.size for send in message.sends)
    if name in backpressure.batched:
        backpressure.budget.release(queued)
        release_held(durable, backpressure.budget)
    pending = [send for send in sends.values() if not send.final]
    why = f"{reason}; the destination actor had stopped: {cause}" if cause else reason
    settle_each([Failure(send, f"{why}; dead-lettered") for send in pending])
    return len(pending)


def stop_runtime(
    shutdown: Shutdown,
    drain: bool,
    timeout: float | None,
    stop_machinery: Callable[[], None],
) -> ShutdownReport:
    """The body of `Runtime.stop()`: drain and dead-letter, then stop the machinery.

    Never raises: a bug of ours still shuts down and still reports; what goes
    wrong is logged and listed in the report's `errors`.
    """
    errors: dict[str, str] = {}
    try:
        report = shutdown.drain_and_dead_letter(drain, timeout, errors)
    except Exception as error:
        logger.exception("stopping the runtime failed")
        errors["stop"] = describe_error(error)
        report = ShutdownReport(drained=False, errors=errors)
    finally:
        try:
            stop_machinery()
        except Exception as error:
            logger.exception("shutting down the runtime's threads failed")
            errors["shutdown"] = describe_error(error)
    return report
