"""The HTTP destination: one request per send, with retries, on the trio loop.

Owns `HttpRequest` (a validated send) and `HttpDestination` (the actor). The
actor keeps the queue and decides; the trio loop only performs requests: at
most `http_concurrency` are in flight (httpx slows badly with many more
connections), each bounded by a trio deadline for the *whole* request
(httpx's own timeouts are per phase, so a server trickling its answer would
never time out). Connect errors, timeouts, 408, 429 and 5xx are retried with
the shared backoff policy, honouring `Retry-After`; other 4xx are final. Every
attempt of one send carries the same `Idempotency-Key`.
"""

from __future__ import annotations

import collections
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from actors import LoopResult
from destinations.backoff import Backoff, parse_retry_after
from destinations.base import Destination, Services
from destinations.delivery import Outgoing

RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
RESPONSE_EXCERPT = 512  # bytes of the response body kept in the delivery record


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A validated `ctx.send.http(...)` call, ready to send."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] | None = None
    body: bytes | None = None
    auth: tuple[str, str] | None = None
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one try of a request came to."""

    status_code: int | None
    latency: float
    error: str | None = None
    retry_after: float | None = None
    response_excerpt: str | None = None

    @property
    def retryable(self) -> bool:
        if self.status_code is None:
            return True  # connect error, timeout, connection lost
        return self.status_code in RETRYABLE_STATUS

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and self.status_code < 400


@dataclass(frozen=True, slots=True)
class _Retry:
    delivery_id: str


class HttpDestination(Destination):
    """Delivers `HttpRequest` sends with bounded concurrency and retries."""

    name = "http"

    def __init__(self, services: Services) -> None:
        super().__init__(services=services)
        config = services.config
        self.trio = services.trio
        self.timers = services.timers
        self.concurrency = config.http_concurrency
        self.backoff = Backoff(config.retry_base, config.retry_cap, config.http_max_attempts)

    # Durable state: survives a crash of this actor.
    @property
    def queue(self) -> collections.deque[Outgoing]:
        return self.durable.setdefault("queue", collections.deque())

    @property
    def in_flight(self) -> set[str]:
        return self.durable.setdefault("in_flight", set())

    @property
    def waiting(self) -> dict[str, Any]:
        return self.durable.setdefault("waiting", {})

    def recover(self) -> None:
        self._pump()

    def deliver(self, sends: list[Outgoing]) -> None:
        self.queue.extend(sends)
        self._pump()

    def _pump(self) -> None:
        queue, in_flight = self.queue, self.in_flight
        while queue and len(in_flight) < self.concurrency:
            send = queue.popleft()
            if send.delivery.final:
                continue
            in_flight.add(send.id)
            send.delivery.attempts += 1
            self.trio.spawn(self._request, send, reply_to=self.stable_ref, tag=send)

    async def _client(self) -> httpx.AsyncClient:
        client = self.durable.get("client")
        if client is None:
            limits = httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            )
            # Our trio deadline bounds the whole request; httpx's per-phase
            # timeouts are disabled so they cannot cut it short.
            client = httpx.AsyncClient(limits=limits, timeout=None, follow_redirects=False)
            self.durable["client"] = client
        return client

    async def _request(self, send: Outgoing) -> Attempt:
        request: HttpRequest = send.payload
        headers = {"Idempotency-Key": send.id, **request.headers}
        client = await self._client()
        started = time.perf_counter()
        try:
            with trio.fail_after(request.timeout):
                response = await client.request(
                    request.method,
                    request.url,
                    content=request.body,
                    headers=headers,
                    params=request.params,
                    auth=request.auth,
                )
        except trio.TooSlowError:
            return Attempt(
                None,
                time.perf_counter() - started,
                f"timed out: no complete response within {request.timeout:g} s",
            )
        except httpx.TransportError as error:
            return Attempt(None, time.perf_counter() - started, f"{type(error).__name__}: {error}")
        return Attempt(
            response.status_code,
            time.perf_counter() - started,
            None if response.status_code < 400 else f"HTTP {response.status_code}",
            parse_retry_after(response.headers.get("retry-after")),
            response.content[:RESPONSE_EXCERPT].decode("utf-8", "replace"),
        )

    def on_loop_result(self, result: LoopResult) -> None:
        send: Outgoing = result.tag
        self.in_flight.discard(send.id)
        if result.error is not None:  # a bug or cancellation, not an HTTP outcome
            self.failed(send, result.error)
        else:
            self._settle(send, result.value)
        self._pump()

    def _settle(self, send: Outgoing, attempt: Attempt) -> None:
        detail = {
            "status_code": attempt.status_code,
            "latency_ms": round(attempt.latency * 1000, 3),
            "url": send.payload.url,
        }
        if attempt.response_excerpt is not None:
            detail["response"] = attempt.response_excerpt
        if attempt.succeeded:
            self.delivered(send, **detail)
            return
        assert attempt.error is not None
        attempts = send.delivery.attempts
        if attempt.retryable and self.backoff.should_retry(attempts):
            send.delivery.retrying(attempt.error, **detail)
            delay = self.backoff.delay_for(attempts, attempt.retry_after)
            self.waiting[send.id] = send
            self.timers.after(delay, self.stable_ref, _Retry(send.id))
            return
        if attempt.retryable:
            error = f"{attempt.error} (gave up after {attempts} attempts)"
        else:
            error = attempt.error
        self.failed(send, error, **detail)

    def handle(self, message: Any) -> Any:
        if isinstance(message, _Retry):
            send = self.waiting.pop(message.delivery_id, None)
            if send is not None:
                self.queue.appendleft(send)
                self._pump()
            return None
        return super().handle(message)

    def on_stop(self) -> None:
        client = self.durable.pop("client", None)
        if client is not None and self.trio.running:
            with contextlib.suppress(Exception):  # the loop is going away anyway
                self.trio.call(client.aclose, timeout=5)
