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

Pure bookkeeping, no I/O and no clock: `workers.py` calls it on its event
loop's thread only. Where the other per-host policies go: whether a host may
start a request now (a circuit breaker's open state and its one probe, a rate
limit's tokens) is `Host.may_start`, with its state on `Host` and a wake-up
from `workers.py` when it changes (`_pump`); a gone endpoint (410) fails its
queued sends from `Host.queue` and refuses them in `add`. Retry policies stay
with the actor (`actor.py`), the address check with the connector
(`workers.new_session`). Must not import the runtime or another destination.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from outbound.destinations.budget import AdmissionUnits
from outbound.destinations.delivery import Send


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


@dataclass(slots=True)
class Host:
    """One host's waiting sends and its counts."""

    name: str
    queue: collections.deque[Send] = field(default_factory=collections.deque)
    in_flight: int = 0
    parked: int = 0  # queued sends that gave their admission unit back (the newest ones)

    @property
    def held(self) -> int:
        """Admission units this host's sends hold here (queued and unparked, or in flight)."""
        return len(self.queue) - self.parked + self.in_flight

    def may_start(self, limit: int) -> bool:
        """Whether one more request to this host may start now (a breaker would add here)."""
        return bool(self.queue) and self.in_flight < limit


class HostQueues:
    """Sends by host; `take` hands out the next one that may start, hosts in turn.

    `ready` holds, in turn order, the hosts that have queued sends and room
    under their own limit; a host leaves it when it empties or fills its limit
    and comes back at the end when it may start again, so a host with a long
    backlog gets one turn in each round like any other.
    """

    def __init__(
        self,
        concurrency: int,
        host_concurrency: int,
        admission: AdmissionUnits | None = None,
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

    def add(self, send: Send, url: str) -> None:
        name = host_of(url)
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = Host(name)
        was_ready = host.may_start(self.host_concurrency)
        if self.admission is not None and host.held >= self.share and self.parked < self.spill:
            # Past its share: wait without holding a unit (newest sends are parked).
            self.admission.settle(1)
            host.parked += 1
            self.parked += 1
        host.queue.append(send)
        if not was_ready and host.may_start(self.host_concurrency):
            self.ready.append(host)

    def take(self) -> tuple[Send, Host] | None:
        """The next send to put on the wire and its host, or None while none may start."""
        if self.in_flight >= self.concurrency or not self.ready:
            return None
        host = self.ready.popleft()
        send = host.queue.popleft()
        if host.parked > len(host.queue):
            # Only parked sends were left: this one takes its unit back (never waits).
            self._unpark(host, 1)
        host.in_flight += 1
        self.in_flight += 1
        if host.may_start(self.host_concurrency):
            self.ready.append(host)  # its next turn comes after every other ready host
        return send, host

    def done(self, host: Host) -> None:
        """A request to `host` finished (whatever its outcome)."""
        was_ready = host.may_start(self.host_concurrency)
        host.in_flight -= 1
        self.in_flight -= 1
        if host.parked and host.held < self.share:
            self._unpark(host, min(host.parked, self.share - host.held))
        if not was_ready and host.may_start(self.host_concurrency):
            self.ready.append(host)
        elif not host.queue and not host.in_flight:
            del self.hosts[host.name]  # idle: forget it (its counts are all zero)

    def _unpark(self, host: Host, count: int) -> None:
        assert self.admission is not None
        self.admission.take(count)
        host.parked -= count
        self.parked -= count

    def backlog(self) -> dict[str, dict[str, int]]:
        """Per host: sends queued, parked among them, and requests in flight."""
        return {
            name: {"queued": len(host.queue), "parked": host.parked, "in_flight": host.in_flight}
            for name, host in self.hosts.items()
        }
