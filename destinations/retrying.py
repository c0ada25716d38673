"""Retrying single sends: the decision every per-send destination shares (HTTP, email).

Owns `RetryingDestination`: after a failed attempt it either schedules the
next one with the shared `Backoff` (a timer message, so no thread sleeps and
the wait survives an actor restart in durable state) or fails the send for
good, saying how many attempts were made and which limit ended it (the
attempts, or the window `OUTBOUND_RETRY_FOR` from its acceptance); a
destination may give a send a policy of its own (`backoff_for`). A send
recovered from the journal with a next try still ahead (a restart during its
backoff) waits for it instead of being tried at once. Destinations say what is
retryable and how to put a send back in line (`retry`); batched destinations
retry whole batches in `destinations.batching` instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from outbound.destinations.backoff import Backoff
from outbound.destinations.base import Destination, DurableWork
from outbound.destinations.delivery import Failure, Send, reschedule


@dataclass(frozen=True, slots=True)
class RetryDue:
    """Timer message: the backoff of this send is over."""

    delivery_id: str


@dataclass
class RetryWork(DurableWork):
    """A retrying destination's durable work: sends waiting out a backoff, by delivery id."""

    waiting: dict[str, Send] = field(default_factory=dict)


class RetryingDestination(Destination):
    """A destination whose failed attempts are retried one send at a time."""

    Work: ClassVar[type[DurableWork]] = RetryWork
    counters: ClassVar[tuple[str, ...]] = ("retries", "retrying")
    work: RetryWork
    backoff: Backoff

    @property
    def waiting(self) -> dict[str, Send]:
        """Sends waiting out a backoff before their next attempt (durable)."""
        return self.work.waiting

    def backoff_for(self, send: Send) -> Backoff:
        """The backoff that decides this send's next attempt (HTTP: per send and endpoint)."""
        del send
        return self.backoff

    def attempt_failed(
        self,
        send: Send,
        error: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        **detail: Any,
    ) -> None:
        """Schedule the next attempt, or fail the send when it is final or out of attempts."""
        failure = self.retry_or_give_up(
            send, error, retryable=retryable, retry_after=retry_after, **detail
        )
        if failure is not None:
            self.settle_each([failure])

    def retry_or_give_up(
        self,
        send: Send,
        error: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        **detail: Any,
    ) -> Failure | None:
        """Schedule the next attempt, or return the failure to settle (many: `settle_each`)."""
        attempts = send.attempts
        if not retryable:
            return Failure(send, error, detail)
        backoff = self.backoff_for(send)
        gave_up = backoff.give_up_reason(attempts, send.accepted_at)
        if gave_up is not None:
            return Failure(send, f"{error} ({gave_up})", detail)
        delay = backoff.delay_for(attempts, retry_after)
        reschedule([send], error, next_try_at=time.time() + delay, **detail)
        self.waiting[send.id] = send
        self.services.timers.after(delay, self.stable_ref, RetryDue(send.id))
        return None

    def _accept(self, sends: list[Send]) -> None:
        """Take sends; those recovered in backoff (next try ahead) wait for their timer."""
        now = time.time()
        later = [s for s in sends if (s.outcome.next_try_at or 0.0) > now]
        if later:
            unfinished, waiting, timers = self.work.unfinished, self.waiting, self.services.timers
            for send in later:
                unfinished[send.id] = waiting[send.id] = send
                wait = (send.outcome.next_try_at or now) - now
                timers.after(wait, self.stable_ref, RetryDue(send.id))
            sends = [s for s in sends if s.id not in waiting]
        super()._accept(sends)

    def retry(self, send: Send) -> None:
        """Put a send whose backoff is over back in line for its next attempt."""
        raise NotImplementedError

    def handle(self, message: Any) -> Any:
        if isinstance(message, RetryDue):
            send = self.waiting.pop(message.delivery_id, None)
            if send is not None and not send.final:
                self.retry(send)
            return None
        return super().handle(message)
