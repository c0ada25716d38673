"""The HTTP destination's workers: they perform the requests, on the trio loop.

Owns `RequestWorkers` and `perform` (the actor, `actor.py`, decides: retry,
give up, record; the workers perform, and report each `Attempt`): at
most `http_concurrency` are in flight, one per worker, each worker with its
own small httpx connection pool (a shared pool's bookkeeping grows with its
size and cost half of every request's CPU), each bounded by a trio deadline for the *whole* request
(httpx's own timeouts are per phase, so a server trickling its answer would
never time out). Connect errors, timeouts, 408, 429 and 5xx are retried with
the shared backoff policy, honouring `Retry-After`; other 4xx are final. Every
attempt of one send carries the same `Idempotency-Key`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import ssl
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pykka
import trio

from outbound.actors import TrioLoop
from outbound.destinations.backoff import parse_retry_after
from outbound.destinations.delivery import Send, describe_error
from outbound.destinations.http.headers import attempt_headers
from outbound.destinations.http.send import HttpRequest
from outbound.destinations.http.signing import SigningKeys
from outbound.destinations.http.tracing import traced_attempt

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
RESPONSE_EXCERPT = 512  # bytes of the response body kept in the delivery record
# Seconds finished attempts are gathered before the actor hears of them. Each
# report wakes the actor's thread, which then takes the interpreter lock from
# the trio thread at its next system call; at 2 ms this cost 15-25 % of HTTP
# throughput, at 20 ms it is in the noise (measured). Records lag by as much.
REPORT_EVERY = 0.02
# Connections each request worker keeps open: one is in use at a time, the
# others stay alive for other hosts, so alternating between a few endpoints
# does not reconnect (and redo TLS) on every request.
CONNECTIONS_PER_WORKER = 4


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
class Attempted:
    """Attempts finished by the request workers, each with its outcome or a bug's exception."""

    results: list[tuple[Send, Attempt | Exception]]


class RequestWorkers:
    """The trio side: `concurrency` worker tasks taking requests from one channel.

    The actor stays out of the path between one request and the next: a worker
    that finishes reports the attempt to the actor (a message) and immediately
    takes the next request, so a busy actor thread never idles a connection.
    Each actor incarnation makes its own and closes it when it stops or crashes
    (`close`): sends already handed over are still attempted and reported.
    """

    def __init__(
        self,
        loop: TrioLoop,
        concurrency: int,
        reply_to: Any,
        signing_keys: SigningKeys | None = None,
    ) -> None:
        self.loop = loop
        self.concurrency = concurrency
        self.reply_to = reply_to
        self.signing_keys = signing_keys  # OUTBOUND_HTTP_SIGNING_SECRETS, for sign=True
        self._finished: list[tuple[Send, Attempt | Exception]] = []
        self._report_due: trio.Event | None = None
        # Made here, not in _serve: submit() may run before the serving task starts.
        # No bound of its own (a full channel would have to stall the actor or the
        # loop): only admitted sends reach it, and the runtime admits at most
        # `OUTBOUND_MAX_PENDING` runs and sends in flight, so that bounds this queue,
        # the retries waiting in `waiting` and their timers, and `_finished`.
        self._send_channel, self._receive_channel = trio.open_memory_channel[Send](math.inf)
        loop.spawn(self._serve)

    def submit(self, sends: list[Send]) -> None:
        self.loop.call_soon(self._enqueue, sends)

    def close(self) -> None:
        """Take no more sends; the workers attempt those queued, report them, and close."""
        with contextlib.suppress(RuntimeError):  # the loop is already stopped: nothing runs
            self.loop.call_soon(self._send_channel.close)

    def _enqueue(self, sends: list[Send]) -> None:
        for send in sends:
            self._send_channel.send_nowait(send)

    async def _serve(self) -> None:
        self._report_due = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report)
            async with trio.open_nursery() as workers:
                for _ in range(self.concurrency):
                    workers.start_soon(self._work, self._receive_channel)
            # Closed and drained (`close`): stop reporting, then report what is left.
            nursery.cancel_scope.cancel()
        self._tell(self._finished)
        self._finished = []

    async def _work(self, channel: trio.MemoryReceiveChannel[Send]) -> None:
        # One client (one connection pool) per worker, not one shared by all:
        # httpcore's pool rescans every connection for every waiting request,
        # which made a shared pool of 16 cost half of each request's CPU; a
        # worker sends one request at a time, so its own pool stays trivial.
        # Our trio deadline bounds the whole request; httpx's per-phase
        # timeouts are disabled so they cannot cut it short.
        limits = httpx.Limits(
            max_connections=CONNECTIONS_PER_WORKER,
            max_keepalive_connections=CONNECTIONS_PER_WORKER,
        )
        async with httpx.AsyncClient(
            limits=limits, timeout=None, verify=verified_tls_context()
        ) as client:
            async for send in channel:
                try:
                    outcome: Attempt | Exception = await perform(client, send, self.signing_keys)
                except Exception as error:  # a bug, not an HTTP outcome: fail this send only
                    outcome = error
                self._finished.append((send, outcome))
                assert self._report_due is not None
                self._report_due.set()

    async def _report(self) -> None:
        """Tell the actor about finished attempts, many per message when they come together."""
        while True:
            assert self._report_due is not None
            await self._report_due.wait()
            self._report_due = trio.Event()
            await trio.sleep(REPORT_EVERY)  # gather what finishes meanwhile into one message
            finished, self._finished = self._finished, []
            self._tell(finished)

    def _tell(self, finished: list[tuple[Send, Attempt | Exception]]) -> None:
        if not finished:
            return
        try:
            self.reply_to.tell(Attempted(finished))
        except pykka.ActorDeadError:  # stopped (shutdown): its sends were already settled
            logger.debug("%d attempts finished after the HTTP actor stopped", len(finished))


@functools.cache
def verified_tls_context() -> ssl.SSLContext:
    """One TLS context (certifi's CA bundle, verification on) for every worker's client.

    httpx makes a context per client by default, loading the CA bundle each
    time: 16 workers took a second (measured: 1.0 s against 0.05 s for 16
    clients sharing one), paid before a started runtime's first HTTP delivery.
    Contexts are safe to share between connections and threads.
    """
    return httpx.create_ssl_context()


@traced_attempt  # a span per attempt when an OpenTelemetry SDK is configured
async def perform(
    client: httpx.AsyncClient, send: Send, signing_keys: SigningKeys | None = None
) -> Attempt:
    """One attempt of one send, bounded as a whole by the send's timeout."""
    request: HttpRequest = send.payload
    headers = attempt_headers(send, signing_keys)  # ids, User-Agent, traceparent, signature
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
        return Attempt(None, time.perf_counter() - started, describe_error(error))
    return Attempt(
        response.status_code,
        time.perf_counter() - started,
        None if response.status_code < 400 else f"HTTP {response.status_code}",
        parse_retry_after(response.headers.get("retry-after")),
        response.content[:RESPONSE_EXCERPT].decode("utf-8", "replace"),
    )
