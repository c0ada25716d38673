"""The HTTP destination's request workers: they perform the requests, on an asyncio loop.

Owns `RequestWorkers` (takes sends from the actor, queues them per host in
`hosts.HostQueues`, starts a request whenever the global and the host's
limits allow, and reports each finished `Attempt` back) and the hot path of one
attempt, in a few named functions:

- `headers.attempt_headers(send, keys)`: the headers of one attempt
  (`Idempotency-Key`, `User-Agent`, `traceparent`, the send's own, the
  Standard Webhooks signature made for this attempt).
- `wire_url(request)`: the URL with its params as httpx would send it.
- `perform(session, send, keys)`: one request with aiohttp, bounded as a whole
  by the send's timeout, read into an `Attempt` (a span per attempt with an
  OpenTelemetry SDK: `tracing.traced_attempt`).

The engine is aiohttp (`python -m benchmarks http` measured raw httpx at 0.15
and an httpx transport over aiohttp at ~0.37 of raw aiohttp here; README
"HTTP"). httpx stays the interface: URL and header rules at the send
(`send.py`), `httpx.BasicAuth` for `auth`, httpx's URL encoding of params and
non-ASCII URLs, and httpx's error names in records (`ConnectError: ...`). A
request with a Latin-1 header value (which aiohttp would send as UTF-8) goes
through an httpx client on the same loop instead, as it always did.

Connect errors, timeouts, 408, 429 and 5xx are retried by the actor with the
shared backoff policy, honouring `Retry-After`; other 4xx are final. Each
finished attempt also tells its host's circuit breaker whether the host
answered (`hosts.HostQueues.done`); a 410 Gone marks its URL gone
(`endpoint_state.EndpointState`): the sends queued for it, and those that come
later, fail at once (`refused`) until `rt.enable_endpoint(url)`.
Redirects are not followed (a 3xx is a delivered answer), as httpx's default.
With OUTBOUND_HTTP_BLOCK_PRIVATE=1 both clients connect only to addresses
`network.NetworkPolicy` allows (aiohttp: the session's resolver and socket
factory; httpx: `network.pinned_url`); a refused send fails for good.
Must not import the runtime or another destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import pykka
from yarl import URL

from outbound.actors import AsyncioLoop
from outbound.destinations.backoff import parse_retry_after
from outbound.destinations.budget import AdmissionUnits
from outbound.destinations.delivery import Send, describe_error
from outbound.destinations.http.endpoint_state import EndpointState
from outbound.destinations.http.endpoints import Endpoints
from outbound.destinations.http.headers import attempt_headers
from outbound.destinations.http.hosts import Host, HostQueues
from outbound.destinations.http.limits import BreakerSettings, RateLimit
from outbound.destinations.http.network import (
    GuardedResolver,
    NetworkPolicy,
    RefusedAddress,
    guarded_socket_factory,
    pinned_url,
    refusal_in,
)
from outbound.destinations.http.send import HttpRequest
from outbound.destinations.http.signing import SigningKeys
from outbound.destinations.http.tracing import traced_attempt

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
#: Answers that count against a host's circuit breaker (with connect errors and timeouts).
HOST_FAILING_STATUS = frozenset({429}) | frozenset(range(500, 600))
GONE = 410
RESPONSE_EXCERPT = 512  # bytes of the response body kept in the delivery record
# Seconds finished attempts are gathered before the actor hears of them. Each
# report wakes the actor's thread, which then takes the interpreter lock from
# the loop's thread at its next system call; at 2 ms this cost 15-25 % of HTTP
# throughput, at 20 ms it is in the noise (measured). Records lag by as much.
REPORT_EVERY = 0.02
# Idle keep-alive connections are closed after this many seconds.
KEEPALIVE_SECONDS = 15.0
# Seconds `close` waits for the clients to close (only when no request is in flight).
CLOSE_WAIT = 2.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one try of a request came to."""

    status_code: int | None
    latency: float
    error: str | None = None
    retry_after: float | None = None
    response_excerpt: str | None = None
    final: bool = False  # no retry can change it (a gone endpoint, a refused address)

    @property
    def retryable(self) -> bool:
        if self.final:
            return False
        if self.status_code is None:
            return True  # connect error, timeout, connection lost
        return self.status_code in RETRYABLE_STATUS

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and self.status_code < 400

    @property
    def host_answered(self) -> bool:
        """Whether this counts for the host's circuit (False: connect error, timeout, 429, 5xx)."""
        return self.status_code is not None and self.status_code not in HOST_FAILING_STATUS


def refused(error: str) -> Attempt:
    """The outcome of a send that is not attempted (its endpoint is gone)."""
    return Attempt(None, 0.0, error, final=True)


@dataclass(frozen=True, slots=True)
class Attempted:
    """Attempts finished by the request workers, each with its outcome or a bug's exception."""

    results: list[tuple[Send, Attempt | Exception]]


class RequestWorkers:
    """The loop side: per-host queues, at most `concurrency` requests in flight.

    The actor stays out of the path between one request and the next: a
    request that finishes starts the next one at once (`_pump`) and its attempt
    is reported to the actor in a batch (`REPORT_EVERY`), so a busy actor
    thread never idles a connection. One aiohttp session (one keep-alive pool,
    at most `host_concurrency` connections per host) serves all requests. Each
    actor incarnation makes its own and closes it when it stops or crashes
    (`close`): sends already handed over are still attempted and reported.
    Everything but `submit` and `close` runs on the loop's thread only.
    """

    def __init__(
        self,
        loop: AsyncioLoop,
        concurrency: int,
        reply_to: Any,
        signing_keys: SigningKeys | None = None,
        host_concurrency: int | None = None,
        admission: AdmissionUnits | None = None,
        network: NetworkPolicy | None = None,
        rate_limit: RateLimit | None = None,
        endpoints: Endpoints | None = None,
        endpoint_state: EndpointState | None = None,
        breaker: BreakerSettings | None = None,
    ) -> None:
        self.loop = loop
        self.network = network  # OUTBOUND_HTTP_BLOCK_PRIVATE: None connects anywhere
        self.reply_to = reply_to
        # No bound of their own (a full queue would have to stall the actor or the
        # loop): only admitted sends reach them, and the runtime admits at most
        # `OUTBOUND_MAX_PENDING` runs and sends in flight (past a host's share,
        # parked sends are capped by `HostQueues.spill`).
        self.queues = HostQueues(
            concurrency, host_concurrency or concurrency, admission, rate_limit, endpoints, breaker
        )
        #: Gone endpoints (marked here, on a 410) and open circuits (published here).
        self.endpoint_state = endpoint_state if endpoint_state is not None else EndpointState()
        self._wake: asyncio.TimerHandle | None = None  # a paused host's time comes
        self._wake_at = 0.0
        self._published: dict[str, Any] | None = None  # the open circuits shown, if ours
        self.signing_keys = signing_keys  # OUTBOUND_HTTP_SIGNING_SECRETS, for sign=True
        self._finished: list[tuple[Send, Attempt | Exception]] = []
        self._report_due: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._httpx: httpx.AsyncClient | None = None
        self._closing = False
        self._closed = False  # the clients are closed: nothing more starts

    def submit(self, sends: list[Send]) -> None:
        self._call_soon(self._enqueue, sends)

    def close(self) -> None:
        """Take no more sends; the queued ones are still attempted, reported, then the clients
        close. With nothing in flight they are closed before this returns (the runtime may
        stop the loop right after)."""
        with contextlib.suppress(RuntimeError, TimeoutError):  # the loop is stopped or stuck
            self.loop.call(self._close, timeout=CLOSE_WAIT)

    def _call_soon(self, fn: Any, *args: Any) -> None:
        loop = self.loop.loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the asyncio loop is not running")
        loop.call_soon_threadsafe(fn, *args)

    def _enqueue(self, sends: list[Send]) -> None:
        queues, state, now = self.queues, self.endpoint_state, time.monotonic()
        for send in sends:
            gone = state.gone(send.payload.url)
            if gone is not None:
                self._finish_attempt(send, refused(gone))
            else:
                queues.add(send, send.payload.url, now)
        self._pump()

    def _pump(self) -> None:
        """Start requests while the global and per-host limits allow (hosts in turn)."""
        if self._closed:
            return
        if self._session is None:
            self._session = new_session(
                self.queues.concurrency, self.queues.host_concurrency, self.network
            )
        now = time.monotonic()
        take = functools.partial(self.queues.take, now)
        while (next_up := take()) is not None:
            send, host = next_up
            task = asyncio.get_running_loop().create_task(self._attempt(send, host))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._wake_for_paused(now)

    def _wake_for_paused(self, now: float) -> None:
        """Pump again when the first paused host may go (its cool-down or tokens)."""
        wake_at = self.queues.next_wake()
        if wake_at is None or (self._wake is not None and self._wake_at <= wake_at):
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = wake_at
        self._wake = asyncio.get_running_loop().call_later(max(0.0, wake_at - now), self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._pump()

    async def _attempt(self, send: Send, host: Host) -> None:
        outcome: Attempt | Exception | None = None
        try:
            if has_latin1_header(send.payload):
                outcome = await self._perform_with_httpx(send)
            else:
                assert self._session is not None
                outcome = await perform(self._session, send, self.signing_keys)
        except Exception as error:  # a bug, not an HTTP outcome: fail this send only
            outcome = error
        except asyncio.CancelledError:
            # The loop is stopping (the runtime stops without waiting for this
            # request): close the clients while it still runs.
            session, self._session = self._session, None
            client, self._httpx = self._httpx, None
            await _close_clients(session, client)
            raise
        finally:
            self._host_done(host, outcome)
        if isinstance(outcome, Attempt) and outcome.status_code == GONE:
            outcome = self._gone(send.payload.url, outcome)
        self._finish_attempt(send, outcome)
        self._pump()
        if self._closing and not self.queues.in_flight:
            await self._finish()

    def _finish_attempt(self, send: Send, outcome: Attempt | Exception) -> None:
        self._finished.append((send, outcome))
        if self._report_due is None:
            # Gather what finishes meanwhile into one message to the actor.
            self._report_due = asyncio.get_running_loop().call_later(REPORT_EVERY, self._report)

    def _host_done(self, host: Host, outcome: Attempt | Exception | None) -> None:
        """Count the request out of its host, telling its circuit whether the host answered."""
        queues = self.queues
        if not isinstance(outcome, Attempt):  # a bug or a cancel: no verdict on the host
            queues.done(host)
            return
        now = time.monotonic()
        queues.done(host, now, outcome.host_answered, outcome.error)
        gate = host.gate
        if self.endpoint_state.open_circuits or (gate is not None and gate.circuit.is_open):
            self._publish_circuits(now)

    def _publish_circuits(self, now: float) -> None:
        """Show the open circuits in health (and log those that opened or closed)."""
        circuits = self.queues.open_circuits(now, time.time())
        before = self.endpoint_state.open_circuits
        if circuits.keys() != before.keys():
            opened, closed = circuits.keys() - before.keys(), before.keys() - circuits.keys()
            for name in sorted(opened):
                logger.warning("HTTP circuit of %s opened: %s", name, circuits[name]["last_error"])
            for name in sorted(closed):
                logger.info("HTTP circuit of %s closed: the host answers again", name)
        self.endpoint_state.open_circuits = self._published = circuits

    def _gone(self, url: str, answer: Attempt) -> Attempt:
        """`url` answered 410: mark it gone and fail its queued sends at once."""
        error = self.endpoint_state.mark_gone(url)
        logger.warning("HTTP endpoint marked gone (410): %s", url)
        for dropped in self.queues.drop(url):
            self._finish_attempt(dropped, refused(error))
        return dataclasses.replace(answer, error=f"HTTP 410 ({error})")

    async def _perform_with_httpx(self, send: Send) -> Attempt:
        if self._httpx is None:
            self._httpx = httpx.AsyncClient(timeout=None, verify=verified_tls_context())
        return await perform_with_httpx(self._httpx, send, self.signing_keys, self.network)

    def _report(self) -> None:
        self._report_due = None
        finished, self._finished = self._finished, []
        self._tell(finished)

    async def _close(self) -> None:
        self._closing = True
        if not self.queues.in_flight:
            await self._finish()

    async def _finish(self) -> None:
        """Closed and drained: report what is left, then close the clients."""
        self._closed = True
        if self._wake is not None:
            self._wake.cancel()
        if self._published is not None and self.endpoint_state.open_circuits is self._published:
            self.endpoint_state.open_circuits = {}  # they go with it: new workers start closed
        if self._report_due is not None:
            self._report_due.cancel()
        self._report()
        session, self._session = self._session, None
        client, self._httpx = self._httpx, None
        await _close_clients(session, client)

    def _tell(self, finished: list[tuple[Send, Attempt | Exception]]) -> None:
        if not finished:
            return
        try:
            self.reply_to.tell(Attempted(finished))
        except pykka.ActorDeadError:  # stopped (shutdown): its sends were already settled
            logger.debug("%d attempts finished after the HTTP actor stopped", len(finished))


async def _close_clients(session: aiohttp.ClientSession | None, client: Any) -> None:
    if session is not None:
        await session.close()
    if client is not None:
        await client.aclose()


@functools.cache
def verified_tls_context() -> ssl.SSLContext:
    """One TLS context (certifi's CA bundle, verification on) for every client.

    Making a context loads the CA bundle (16 httpx clients took a second,
    against 0.05 s sharing one). Contexts are safe to share between
    connections and threads.
    """
    return httpx.create_ssl_context()


def new_session(
    concurrency: int, host_concurrency: int, network: NetworkPolicy | None = None
) -> aiohttp.ClientSession:
    """The aiohttp session of one `RequestWorkers`: a keep-alive pool, TLS verified.

    Its own timeouts are off (`perform` bounds each whole request); no cookies
    are kept between deliveries; no `Content-Type` is added to a body that has
    none (httpx adds none either); answers are decompressed as httpx does.
    With a `network` policy, names resolve only to allowed addresses and no
    socket connects to another one (IP-literal URLs skip the resolver).
    """
    guarded: dict[str, Any] = {}
    if network is not None:
        guarded = {
            "resolver": GuardedResolver(network),
            "socket_factory": guarded_socket_factory(network),
        }
    connector = aiohttp.TCPConnector(
        limit=concurrency,
        limit_per_host=host_concurrency,
        ssl=verified_tls_context(),
        keepalive_timeout=KEEPALIVE_SECONDS,
        **guarded,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("Content-Type",),
        auto_decompress=True,
    )


def has_latin1_header(request: HttpRequest) -> bool:
    """Whether a header value is Latin-1 bytes (`send.py`), which only httpx sends as such."""
    return any(isinstance(value, bytes) for value in request.headers.values())


def wire_url(request: HttpRequest) -> URL:
    """The URL as sent, `params` merged into its query, encoded by httpx's rules."""
    if request.params:
        merged = httpx.URL(request.url).copy_merge_params(request.params)
        return URL(str(merged), encoded=True)
    return _encoded_url(request.url)


# A URL httpx would send unchanged: ASCII, lower-case scheme, only characters
# that need no percent-encoding, `%` only as `%XX`, and no dot segments.
_SENT_AS_IS = re.compile(r"https?://(?:[A-Za-z0-9\-._~:/?@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")


def _encoded_url(url: str) -> URL:
    # httpx's parsing costs ~100 µs a URL (a third of a request), so it is done only
    # for URLs it would change, and once per such URL.
    if _SENT_AS_IS.fullmatch(url) and "/." not in url:
        return URL(url, encoded=True)
    return _encoded_by_httpx(url)


@functools.lru_cache(maxsize=1024)
def _encoded_by_httpx(url: str) -> URL:
    return URL(str(httpx.URL(url)), encoded=True)


@functools.lru_cache(maxsize=256)
def basic_authorization(username: str, password: str) -> str:
    """The `Authorization` value `httpx.BasicAuth` sends for these credentials."""
    flow = httpx.BasicAuth(username, password).sync_auth_flow(httpx.Request("GET", "http://x/"))
    return next(flow).headers["Authorization"]


def _with_auth(headers: dict[str, Any], auth: tuple[str, str]) -> dict[str, Any]:
    # As httpx: the credentials replace an `Authorization` header given with them.
    headers = {name: value for name, value in headers.items() if name.lower() != "authorization"}
    headers["Authorization"] = basic_authorization(*auth)
    return headers


@traced_attempt  # a span per attempt when an OpenTelemetry SDK is configured
async def perform(
    session: aiohttp.ClientSession, send: Send, signing_keys: SigningKeys | None = None
) -> Attempt:
    """One attempt of one send with aiohttp, bounded as a whole by the send's timeout."""
    request: HttpRequest = send.payload
    headers = attempt_headers(send, signing_keys)  # ids, User-Agent, traceparent, signature
    if request.auth is not None:
        headers = _with_auth(headers, request.auth)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(request.timeout):
            async with session.request(
                request.method,
                wire_url(request),
                data=request.body,
                headers=headers,
                allow_redirects=False,
            ) as response:
                body = await response.read()
    except TimeoutError:
        return _timed_out(request, started)
    except (aiohttp.ClientError, OSError) as error:
        refused = refusal_in(error)
        if refused is not None:
            return Attempt(None, time.perf_counter() - started, str(refused), final=True)
        return Attempt(None, time.perf_counter() - started, describe_transport_error(error))
    status = response.status
    return Attempt(
        status,
        time.perf_counter() - started,
        None if status < 400 else f"HTTP {status}",
        parse_retry_after(response.headers.get("Retry-After")),
        body[:RESPONSE_EXCERPT].decode("utf-8", "replace"),
    )


@traced_attempt
async def perform_with_httpx(
    client: httpx.AsyncClient,
    send: Send,
    signing_keys: SigningKeys | None = None,
    network: NetworkPolicy | None = None,
) -> Attempt:
    """One attempt with httpx: for Latin-1 header values, which httpx sends as Latin-1.

    With a `network` policy the host is resolved and checked here and the
    request goes to the checked address (`network.pinned_url`): httpx never
    resolves the name itself, so it cannot reach an address that was not checked.
    """
    request: HttpRequest = send.payload
    started = time.perf_counter()
    url: str | httpx.URL = request.url
    headers = attempt_headers(send, signing_keys)
    extensions: dict[str, Any] = {}
    try:
        async with asyncio.timeout(request.timeout):
            if network is not None:
                pinned = await pinned_url(network, request.url)
                url = pinned.url
                if not any(name.lower() == "host" for name in headers):  # a Host of yours stays
                    headers = {**headers, "Host": pinned.host_header}
                extensions["sni_hostname"] = pinned.sni_hostname
            response = await client.request(
                request.method,
                url,
                content=request.body,
                headers=headers,
                params=request.params,
                auth=request.auth,
                extensions=extensions or None,
            )
    except TimeoutError:
        return _timed_out(request, started)
    except RefusedAddress as refused:
        return Attempt(None, time.perf_counter() - started, str(refused), final=True)
    except httpx.TransportError as error:
        return Attempt(None, time.perf_counter() - started, describe_error(error))
    return Attempt(
        response.status_code,
        time.perf_counter() - started,
        None if response.status_code < 400 else f"HTTP {response.status_code}",
        parse_retry_after(response.headers.get("retry-after")),
        response.content[:RESPONSE_EXCERPT].decode("utf-8", "replace"),
    )


def _timed_out(request: HttpRequest, started: float) -> Attempt:
    return Attempt(
        None,
        time.perf_counter() - started,
        f"timed out: no complete response within {request.timeout:g} s",
    )


# aiohttp's errors by the name httpx gives the same failure: records read as they always did.
_HTTPX_NAMES: tuple[tuple[type[BaseException], str], ...] = (
    (aiohttp.ClientConnectorError, "ConnectError"),
    (aiohttp.ServerDisconnectedError, "RemoteProtocolError"),
    (aiohttp.ClientPayloadError, "RemoteProtocolError"),
    (aiohttp.ClientResponseError, "RemoteProtocolError"),
    (aiohttp.InvalidURL, "InvalidURL"),
    (aiohttp.ClientOSError, "NetworkError"),
    (OSError, "NetworkError"),
    (aiohttp.ClientError, "TransportError"),
)


def describe_transport_error(error: BaseException) -> str:
    """`"ConnectError: ..."` for an aiohttp error, named as httpx names the same failure."""
    for kind, name in _HTTPX_NAMES:
        if isinstance(error, kind):
            text = str(error)
            return f"{name}: {text}" if text else name
    return describe_error(error)
