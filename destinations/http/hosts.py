"""Per-host queues of the HTTP destination: which send goes on the wire next, and who waits.

Owns `HostQueues` (one FIFO queue per host, `OUTBOUND_HTTP_HOST_CONCURRENCY`
requests in flight per host under the global `OUTBOUND_HTTP_CONCURRENCY`,
hosts served round-robin), `Host` (one host's queue and counts) and `host_of`
(the key a URL is queued under: scheme, host and port). Also the host's share
of the backpressure budget: a host may hold at most `share` admission units in
these queues; past it, its sends wait *parked*, their units given back so one
slow host's backlog cannot fill `OUTBOUND_MAX_PENDING` and stall `submit` for
every other host, and they take a unit again before they go on the wire.
Parked sends of all hosts together are capped (`spill`), so memory stays
bounded (at most `max_pending + spill` sends in all).

Also the per-host policies that decide whether a host may start a request
now: each host's `HostGate` (its circuit breaker, `limits.Circuit`, and its
token bucket for `OUTBOUND_HTTP_RATE_LIMIT`, shared by its queues). A host that
must wait is *paused* (out of turn, in a heap by the time it may go again:
`next_wake` tells `workers.py` when to pump again; a probe's end releases the
host at once). An endpoint registered with its own rate limit
(`rt.http_endpoint(prefix, rate_limit=...)`) gets its own queue, so its tokens
never hold up the host's other sends. A gone endpoint (410) drops its queued
sends (`drop`); refusing new ones is `workers.py`'s.

Pure bookkeeping, no I/O: the clock is an argument (`now`), and `workers.py`
calls it on its event loop's thread only. Retry policies stay with the actor
(`actor.py`), the address check with the connector (`workers.new_session`).
Must not import the runtime or another destination.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from outbound.destinations.budget import AdmissionUnits
from outbound.destinations.delivery import Send
from outbound.destinations.http.endpoints import Endpoints
from outbound.destinations.http.limits import BreakerSettings, Circuit, RateLimit, TokenBucket


def host_of(url: str) -> str:
    """`scheme://host:port` of an absolute http(s) URL (validated at the send), lower-cased.

    Cheap (no URL parsing): it runs once per attempt. User info is dropped, so
    `http://a@h/` and `http://h/` share a queue; an omitted default port is not
    filled in (`http://h` and `http://h:80` are two queues of the same server:
    harmless, each still bounded).
    """
    scheme, _, rest = url.partition("://")
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    return f"{scheme}://{authority.rpartition('@')[2]}".lower()


class HostGate:
    """What one host's queues share: its circuit breaker and its rate limit's bucket."""

    __slots__ = ("circuit", "bucket", "queues")

    def __init__(
        self, host: str, rate_limit: RateLimit | None, breaker: BreakerSettings, now: float
    ) -> None:
        self.circuit = Circuit(host, breaker)
        self.bucket = TokenBucket(rate_limit, now) if rate_limit is not None else None
        self.queues = 0  # `Host` queues using it


@dataclass(slots=True, eq=False)  # compared by identity (`ready.remove`)
class Host:
    """One queue of waiting sends (a host's, or a rate-limited endpoint's) and its counts."""

    name: str
    gate: HostGate | None = None
    bucket: TokenBucket | None = None  # the endpoint's own rate limit
    queue: collections.deque[Send] = field(default_factory=collections.deque)
    in_flight: int = 0
    parked: int = 0  # queued sends that gave their admission unit back (the newest ones)
    paused: bool = False  # out of turn until its gate lets it start (`HostQueues.paused`)

    @property
    def held(self) -> int:
        """Admission units this host's sends hold here (queued and unparked, or in flight)."""
        return len(self.queue) - self.parked + self.in_flight

    def may_start(self, limit: int) -> bool:
        """Whether this host takes turns: sends queued, room under its limit, not paused."""
        return bool(self.queue) and self.in_flight < limit and not self.paused

    def wait(self, now: float) -> float:
        """Seconds until its circuit and rate limits let a request start (0: now)."""
        wait = 0.0
        gate = self.gate
        if gate is not None:
            wait = gate.circuit.wait(now)
            if gate.bucket is not None and wait == 0.0:
                wait = gate.bucket.wait(now)
        if self.bucket is not None and wait == 0.0:
            wait = self.bucket.wait(now)
        return wait

    def start(self, now: float) -> None:
        gate = self.gate
        if gate is not None:
            gate.circuit.started()
            if gate.bucket is not None:
                gate.bucket.take(now)
        if self.bucket is not None:
            self.bucket.take(now)


class HostQueues:
    """Sends by host; `take` hands out the next one that may start, hosts in turn.

    `ready` holds, in turn order, the hosts that have queued sends and room
    under their own limit; a host leaves it when it empties or fills its limit
    and comes back at the end when it may start again, so a host with a long
    backlog gets one turn in each round like any other. A host whose circuit
    is open or whose tokens ran out leaves it for `paused` until it may go.
    """

    def __init__(
        self,
        concurrency: int,
        host_concurrency: int,
        admission: AdmissionUnits | None = None,
        rate_limit: RateLimit | None = None,
        endpoints: Endpoints | None = None,
        breaker: BreakerSettings | None = None,
    ) -> None:
        self.concurrency = concurrency
        self.host_concurrency = min(host_concurrency, concurrency)
        self.admission = admission
        limit = admission.limit if admission is not None else 0
        #: Admission units one host may hold here before its sends are parked.
        self.share = max(self.host_concurrency, limit // 2)
        #: Parked sends of all hosts together, at most.
        self.spill = limit // 2
        self.parked = 0
        self.in_flight = 0
        self.hosts: dict[str, Host] = {}
        self.ready: collections.deque[Host] = collections.deque()
        #: OUTBOUND_HTTP_RATE_LIMIT: every host's bucket (None: no limit).
        self.rate_limit = rate_limit
        #: Settings registered per endpoint (their `rate_limit`).
        self.endpoints = endpoints
        self.breaker = breaker if breaker is not None else BreakerSettings()
        #: Circuit and bucket of each host with a queue or a circuit that is not clean.
        self.gates: dict[str, HostGate] = {}
        #: Buckets of endpoints with their own rate limit, by queue name: kept while the
        #: queue is idle, so it does not start again with a full burst (registered in
        #: code, so bounded).
        self.endpoint_buckets: dict[str, TokenBucket] = {}
        #: Hosts out of turn: (when they may go again, tie-break, host); inf: after a probe.
        self.paused: list[tuple[float, int, Host]] = []
        self._order = itertools.count()

    def _queue_of(self, url: str, now: float) -> Host:
        server = host_of(url)
        name, endpoint_limit = server, None
        settings = self.endpoints.lookup(url) if self.endpoints is not None else None
        if settings is not None and settings.rate_limit is not None:
            name, endpoint_limit = f"{server} {settings.url_prefix}", settings.rate_limit
        host = self.hosts.get(name)
        if host is None:
            gate = self.gates.get(server)
            if gate is None:
                gate = self.gates[server] = HostGate(server, self.rate_limit, self.breaker, now)
            gate.queues += 1
            bucket = None
            if endpoint_limit is not None:
                limit = RateLimit.parse(endpoint_limit)
                bucket = self.endpoint_buckets.get(name)
                if bucket is None or bucket.limit != limit:  # new, or registered anew
                    bucket = self.endpoint_buckets[name] = TokenBucket(limit, now)
            host = self.hosts[name] = Host(name, gate, bucket)
        return host

    def add(self, send: Send, url: str, now: float = 0.0) -> None:
        host = self._queue_of(url, now)
        was_ready = host.may_start(self.host_concurrency)
        if self.admission is not None and host.held >= self.share and self.parked < self.spill:
            # Past its share: wait without holding a unit (newest sends are parked).
            self.admission.settle(1)
            host.parked += 1
            self.parked += 1
        host.queue.append(send)
        if not was_ready and host.may_start(self.host_concurrency):
            self.ready.append(host)

    def take(self, now: float = 0.0) -> tuple[Send, Host] | None:
        """The next send to put on the wire and its host, or None while none may start."""
        if self.in_flight >= self.concurrency:
            return None
        self._release(now)
        while self.ready:
            host = self.ready.popleft()
            wait = host.wait(now)
            if wait > 0.0:  # its circuit is open or its tokens ran out: out of turn
                host.paused = True
                heapq.heappush(self.paused, (now + wait, next(self._order), host))
                continue
            send = host.queue.popleft()
            if host.parked > len(host.queue):
                # Only parked sends were left: this one takes its unit back (never waits).
                self._unpark(host, 1)
            host.start(now)
            host.in_flight += 1
            self.in_flight += 1
            if host.may_start(self.host_concurrency):
                self.ready.append(host)  # its next turn comes after every other ready host
            return send, host
        return None

    def next_wake(self) -> float | None:
        """When the first paused host may go again (None: none waits on the clock)."""
        if self.paused and self.paused[0][0] < math.inf:
            return self.paused[0][0]
        return None

    def _release(self, now: float, gate: HostGate | None = None) -> None:
        """Put paused hosts back in turn: those whose time came, or all of `gate`'s."""
        paused = self.paused
        if gate is not None:
            mine = [entry for entry in paused if entry[2].gate is gate]
            if not mine:
                return
            paused[:] = [entry for entry in paused if entry[2].gate is not gate]
            heapq.heapify(paused)
        else:
            mine = []
            while paused and paused[0][0] <= now:
                mine.append(heapq.heappop(paused))
        for _, _, host in mine:
            host.paused = False
            if host.may_start(self.host_concurrency):
                self.ready.append(host)
            elif not host.queue and not host.in_flight:
                self._forget(host)

    def done(
        self,
        host: Host,
        now: float = 0.0,
        answered: bool | None = None,
        error: str | None = None,
    ) -> None:
        """A request to `host` finished: `answered` True if the host answered (not 429 or
        5xx), False if it failed (connect error, timeout, 429, 5xx: `error`), None for
        no verdict (a bug)."""
        gate = host.gate
        if gate is not None and answered is not None:
            circuit = gate.circuit
            before = (circuit.is_open, circuit.probing)
            if answered:
                circuit.succeeded()
            else:
                circuit.failed(now, error)
            if (circuit.is_open, circuit.probing) != before:
                self._release(now, gate)  # closed, or the probe failed: go, or wait anew
        was_ready = host.may_start(self.host_concurrency)
        host.in_flight -= 1
        self.in_flight -= 1
        if host.parked and host.held < self.share:
            self._unpark(host, min(host.parked, self.share - host.held))
        if not was_ready and host.may_start(self.host_concurrency):
            self.ready.append(host)
        elif not host.queue and not host.in_flight and not host.paused:
            self._forget(host)  # idle: forget it (its counts are all zero)

    def drop(self, url: str) -> list[Send]:
        """Take every queued send to exactly `url` out (a gone endpoint's), unparked."""
        host = self.hosts.get(host_of(url))
        settings = self.endpoints.lookup(url) if self.endpoints is not None else None
        if settings is not None and settings.rate_limit is not None:
            host = self.hosts.get(f"{host_of(url)} {settings.url_prefix}")
        if host is None:
            return []
        dropped = [send for send in host.queue if send.payload.url == url]
        if not dropped:
            return []
        host.queue = collections.deque(send for send in host.queue if send.payload.url != url)
        if host.parked:
            # Each dropped send must hold its unit: the ledger gives one back as it settles.
            self._unpark(host, min(host.parked, len(dropped)))
        if not host.queue:
            if host in self.ready:
                self.ready.remove(host)
            if not host.in_flight and not host.paused:
                self._forget(host)
        return dropped

    def _forget(self, host: Host) -> None:
        if self.hosts.get(host.name) is not host:
            return
        del self.hosts[host.name]
        gate = host.gate
        if gate is not None:
            gate.queues -= 1
            if not gate.queues and gate.circuit.clean:
                self.gates.pop(gate.circuit.host, None)

    def _unpark(self, host: Host, count: int) -> None:
        assert self.admission is not None
        self.admission.take(count)
        host.parked -= count
        self.parked -= count

    def open_circuits(self, now: float, wall_now: float) -> dict[str, dict[str, Any]]:
        """Hosts whose circuit is open, and how it stands (times as `time.time()`)."""
        return {
            name: gate.circuit.state(now, wall_now)
            for name, gate in self.gates.items()
            if gate.circuit.is_open
        }

    def backlog(self) -> dict[str, dict[str, int]]:
        """Per host: sends queued, parked among them, and requests in flight."""
        return {
            name: {"queued": len(host.queue), "parked": host.parked, "in_flight": host.in_flight}
            for name, host in self.hosts.items()
        }
