"""The HTTP destination actor: one request per send, with retries.

Owns `HttpDestination`, which hands sends to its `RequestWorkers`
(`workers.py`: per-host queues, `hosts.py`, and the requests, on the
runtime's asyncio loop for destination clients) and decides what each
finished `Attempt` comes to: delivered, retried with the shared backoff policy
(honouring `Retry-After`), or failed. The policy of a send is the global one
with its endpoint's `RetryPolicy` (`endpoints.py`, looked up when an attempt
fails, so a registration applies to sends already waiting) and then its own
(`HttpRequest.retry`) laid over it. A send to an endpoint marked gone (it
answered 410, `endpoint_state.py`) fails at once, without an attempt: at
`deliver`, or while it waits out a backoff when the 410 comes.
Every attempt of one send carries the same `Idempotency-Key`. Must not import
the runtime or another destination.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pykka

from outbound.destinations.backoff import Backoff, RetryPolicy
from outbound.destinations.base import Services
from outbound.destinations.delivery import Delivered, Failure, Send
from outbound.destinations.http.endpoint_state import EndpointState
from outbound.destinations.http.endpoints import Endpoints
from outbound.destinations.http.limits import BreakerSettings
from outbound.destinations.http.settings import HttpSettings, http_network_policy
from outbound.destinations.http.workers import GONE, Attempt, Attempted, RequestWorkers
from outbound.destinations.retrying import RetryingDestination
from outbound.destinations.settings import max_attempts


class HttpDestination(RetryingDestination):
    """Delivers `HttpRequest` sends with bounded concurrency and retries."""

    name = "http"

    def __init__(
        self,
        services: Services,
        endpoints: Endpoints | None = None,
        endpoint_state: EndpointState | None = None,
    ) -> None:
        super().__init__(services=services)
        #: Settings per endpoint, registered on the runtime (which outlives this actor).
        self.endpoints = endpoints if endpoints is not None else Endpoints()
        #: Gone endpoints and open circuits, shared with the runtime (which outlives this actor).
        self.endpoint_state = endpoint_state if endpoint_state is not None else EndpointState()
        config = services.config
        self.backoff = Backoff(
            config.retry_base,
            config.retry_cap,
            max_attempts(config, config.http_max_attempts),
            retry_for=config.retry_for,
        )
        self.concurrency = config.http_concurrency
        self.host_concurrency = config.http_host_concurrency
        # A resource, not work: made at the first send by each incarnation, and
        # closed when it stops or crashes (`workers`).
        self._workers: RequestWorkers | None = None

    @property
    def workers(self) -> RequestWorkers:
        workers = self._workers
        if workers is None:
            config = self.services.config
            workers = RequestWorkers(
                self.services.asyncio,
                self.concurrency,
                self.stable_ref,
                self.services.config.http_signing_secrets,
                host_concurrency=self.host_concurrency,
                admission=self.services.admission,
                network=http_network_policy(self.services.config),
                rate_limit=config.http_rate_limit,
                endpoints=self.endpoints,
                endpoint_state=self.endpoint_state,
                breaker=BreakerSettings(
                    config.http_circuit_failures, config.http_circuit_cool_down
                ),
            )
            self._workers = workers
        return workers

    def _close_workers(self) -> None:
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.close()

    def on_stop(self) -> None:
        self._close_workers()

    def on_crash(self, error: BaseException | None) -> None:
        # Requests already handed to the workers are still made and reported to
        # the next incarnation (`stable_ref`); then the workers close their session.
        self._close_workers()
        super().on_crash(error)

    def deliver(self, sends: list[Send]) -> None:
        gone = self.endpoint_state.gone
        refused = [send for send in sends if gone(send.payload.url) is not None]
        if refused:  # their endpoint answered 410: fail at once, no attempt
            sends = [send for send in sends if gone(send.payload.url) is None]
            self.settle_each([self._gone_failure(send) for send in refused])
        for send in sends:
            send.attempts += 1
        if sends:
            self.workers.submit(sends)

    def _gone_failure(self, send: Send) -> Failure:
        error = self.endpoint_state.gone(send.payload.url) or "endpoint gone"
        return Failure(send, error, {"url": send.payload.url})

    def _fail_waiting_for(self, urls: set[str]) -> list[Failure]:
        """Sends waiting out a backoff to endpoints that just answered 410 fail now."""
        waiting = [send for send in self.waiting.values() if send.payload.url in urls]
        for send in waiting:
            del self.waiting[send.id]
        return [self._gone_failure(send) for send in waiting if not send.final]

    @staticmethod
    def _detail(send: Send, attempt: Attempt) -> dict[str, Any]:
        detail = {
            "status_code": attempt.status_code,
            "latency_ms": round(attempt.latency * 1000, 3),
            "url": send.payload.url,
        }
        if attempt.response_excerpt is not None:
            detail["response"] = attempt.response_excerpt
        return detail

    def _settle_failure(self, send: Send, attempt: Attempt) -> Failure | None:
        detail = self._detail(send, attempt)
        assert attempt.error is not None
        return self.retry_or_give_up(
            send,
            attempt.error,
            retryable=attempt.retryable,
            retry_after=attempt.retry_after,
            **detail,
        )

    def retry(self, send: Send) -> None:
        self.deliver([send])

    def backoff_for(self, send: Send) -> Backoff:
        """The global backoff, with the send's endpoint policy and then its own laid over it."""
        own: RetryPolicy | None = send.payload.retry
        endpoint = self.endpoints.lookup(send.payload.url)
        shared = endpoint.retry if endpoint is not None else None
        if own is None and shared is None:
            return self.backoff
        policy = own.over(shared) if own is not None else shared
        assert policy is not None
        if (own is None or own.retry_for is None) and endpoint is not None:
            source = f"retry_for of rt.http_endpoint({endpoint.url_prefix!r})"
        else:
            source = "RetryPolicy.retry_for"
        return policy.applied_to(self.backoff, source)

    def handle(self, message: Any) -> Any:
        if isinstance(message, Attempted):
            delivered, failures = [], []
            gone: set[str] = set()
            for send, outcome in message.results:
                if send.final:  # dead-lettered while on the wire: its payload is gone
                    continue
                if isinstance(outcome, Exception):
                    failures.append(Failure(send, outcome))
                elif outcome.status_code == GONE:
                    gone.add(send.payload.url)
                    failures.append(
                        Failure(send, outcome.error or "HTTP 410", self._detail(send, outcome))
                    )
                elif outcome.succeeded:
                    delivered.append(Delivered(send, self._detail(send, outcome)))
                else:
                    failure = self._settle_failure(send, outcome)
                    if failure is not None:
                        failures.append(failure)
            if gone and self.waiting:
                failures.extend(self._fail_waiting_for(gone))
            # One ledger update and one dead-letter write for the lot.
            self.settle_each([*delivered, *failures])
            return None
        return super().handle(message)


def starter(
    config: HttpSettings,
    *,
    http_endpoints: Endpoints | None = None,
    http_endpoint_state: EndpointState | None = None,
    **parts: Any,
) -> Callable[[Services], pykka.ActorRef[Any]]:
    """What starts the HTTP actor, with the runtime's endpoint settings and state (they
    outlive it)."""
    return functools.partial(
        HttpDestination.start, endpoints=http_endpoints, endpoint_state=http_endpoint_state
    )
