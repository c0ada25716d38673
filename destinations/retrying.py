"""Retrying single sends: the decision every per-send destination shares (HTTP, email).

Owns `RetryingDestination`: after a failed attempt it either schedules the
next one with the shared `Backoff` (a timer message, so no thread sleeps and
the wait survives an actor restart in durable state) or fails the send for
good, saying how many attempts were made. Destinations say what is retryable
and how to put a send back in line (`retry`); batched destinations retry whole
batches in `destinations.batching` instead.
"""

from __future__ import annotations

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
    work: RetryWork
    backoff: Backoff

    @property
    def waiting(self) -> dict[str, Send]:
        """Sends waiting out a backoff before their next attempt (durable)."""
        return self.work.waiting

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
        if retryable and self.backoff.should_retry(attempts):
            reschedule([send], error, **detail)
            self.waiting[send.id] = send
            delay = self.backoff.delay_for(attempts, retry_after)
            self.services.timers.after(delay, self.stable_ref, RetryDue(send.id))
            return None
        if retryable:
            error = f"{error} (gave up after {attempts} attempts)"
        return Failure(send, error, detail)

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
