"""Which addresses the HTTP destination may connect to (`OUTBOUND_HTTP_BLOCK_PRIVATE`).

Webhook URLs often come from event data, so a runtime that calls them can be
pointed at its own network: loopback services, a database on a private
address, the cloud metadata service at 169.254.169.254. With blocking on,
every address a connection is about to be made to is checked, after the host
name was resolved, so a name that resolves (or is re-bound) to 127.0.0.1 is
refused as 127.0.0.1 itself is.

Owns the address rules (`address_refusal`), the allow-list
(`OUTBOUND_HTTP_ALLOW_ADDRESSES`, `parse_allowed`), `NetworkPolicy`, and the
three places it is enforced:

- `GuardedResolver`: wraps aiohttp's resolver; drops blocked addresses from
  what a name resolves to and refuses the name when none is left.
- `guarded_socket_factory`: aiohttp's `socket_factory`, called with the very
  address each socket is about to connect to (IP-literal URLs never reach a
  resolver); the last word.
- `pinned_url`: the httpx path (Latin-1 header values) resolves the name
  here, checks the addresses and sends to the chosen address itself (the
  `Host` header and TLS name stay the URL's), so httpx cannot resolve again.

A refused send fails for good (`RefusedAddress`, no retry). Must not import
the runtime or another destination.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

BLOCK_VARIABLE = "OUTBOUND_HTTP_BLOCK_PRIVATE"
ALLOW_VARIABLE = "OUTBOUND_HTTP_ALLOW_ADDRESSES"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# IPv6 prefixes that carry an IPv4 address in their last 32 bits (RFC 6052 NAT64,
# well-known and local-use): the IPv4 address inside is what gets reached.
_NAT64 = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
)
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_METADATA = ipaddress.IPv4Address("169.254.169.254")


class RefusedAddress(OSError):
    """A connection refused by `OUTBOUND_HTTP_BLOCK_PRIVATE`; its text is the reason."""


def embedded_ipv4(address: IpAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (::ffff:a.b.c.d, NAT64, 6to4), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if any(address in prefix for prefix in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def address_kind(address: IpAddress) -> str | None:
    """What makes `address` non-public ("a loopback address", ...), or None when it is public.

    `is_global` is the rule (IANA's special-purpose registries); the explicit
    checks before it only name the reason. An IPv6 address that carries an
    IPv4 one is judged by the IPv4 address.
    """
    inner = embedded_ipv4(address)
    if inner is not None:  # what is reached is the IPv4 address inside
        kind = address_kind(inner)
        return None if kind is None else f"{kind} (IPv4 {inner} inside)"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address == _METADATA:
        return "a link-local address (cloud metadata)"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "a site-local address"
    if not address.is_global:
        return "a non-global address"
    return None


def parse_address(text: str) -> IpAddress:
    """An IP address from a socket or URL host (`[::1]`, `fe80::1%eth0` accepted)."""
    return ipaddress.ip_address(text.strip("[]"))


def parse_allowed(text: str | None) -> tuple[IpNetwork, ...]:
    """`OUTBOUND_HTTP_ALLOW_ADDRESSES`: comma-separated IP addresses and CIDR ranges.

    Host names are not accepted: the check is on the address connected to, and
    a name's addresses can change under it. ValueError naming the variable.
    """
    allowed: list[IpNetwork] = []
    for entry in (text or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            allowed.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            raise ValueError(
                f"{ALLOW_VARIABLE}: {entry!r} is not an IP address or CIDR range "
                "(host names are not accepted: the check is on the address connected to)"
            ) from None
    return tuple(allowed)


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """Which addresses may be connected to: all but the non-public ones, save `allowed`."""

    allowed: tuple[IpNetwork, ...] = ()

    def refusal(self, address: str, host: str | None = None) -> str | None:
        """The reason connecting to `address` (resolved from `host`) is refused, or None."""
        try:
            parsed = parse_address(address)
        except ValueError:
            return f"refused: {address!r} is not an IP address ({BLOCK_VARIABLE}=1)"
        kind = address_kind(parsed)
        if kind is None or self._is_allowed(parsed):
            return None
        shown = address.strip("[]")  # as given (3.11 writes ::ffff:127.0.0.1 as ::ffff:7f00:1)
        named = f"{host} resolves to {shown}" if host and host != shown else shown
        return f"refused: {named}, {kind} ({BLOCK_VARIABLE}=1)"

    def _is_allowed(self, address: IpAddress) -> bool:
        plain = address if address.version == 4 else address.__class__(int(address))  # no scope
        candidates = [plain, embedded_ipv4(address)]
        return any(
            candidate is not None and candidate.version == network.version and candidate in network
            for candidate in candidates
            for network in self.allowed
        )


def network_policy(block_private: bool, allowed: str | None) -> NetworkPolicy | None:
    """The policy the settings ask for: None (no check at all) unless blocking is on."""
    return NetworkPolicy(parse_allowed(allowed)) if block_private else None


class GuardedResolver(AbstractResolver):
    """aiohttp's default resolver, keeping only the addresses `policy` allows."""

    def __init__(self, policy: NetworkPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        resolved = await self.inner.resolve(host, port, family)
        kept = [result for result in resolved if self.policy.refusal(result["host"]) is None]
        if not kept:
            reason = self.policy.refusal(resolved[0]["host"], host) if resolved else None
            raise RefusedAddress(reason or f"refused: {host} resolves to no address")
        return kept

    async def close(self) -> None:
        await self.inner.close()


AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]


def guarded_socket_factory(policy: NetworkPolicy) -> Callable[[AddrInfo], socket.socket]:
    """aiohttp's `socket_factory`: refuses a socket whose address `policy` does not allow."""

    def make_socket(addr_info: AddrInfo) -> socket.socket:
        family, kind, proto, _, address = addr_info
        reason = policy.refusal(str(address[0]))
        if reason is not None:
            raise RefusedAddress(reason)
        return socket.socket(family=family, type=kind, proto=proto)

    return make_socket


def refusal_in(error: BaseException) -> RefusedAddress | None:
    """The `RefusedAddress` behind an aiohttp error (it wraps what the resolver raised)."""
    seen: BaseException | None = error
    for _ in range(4):  # aiohttp wraps it once or twice
        if seen is None:
            return None
        if isinstance(seen, RefusedAddress):
            return seen
        seen = getattr(seen, "os_error", None) or seen.__cause__
    return None


@dataclass(frozen=True, slots=True)
class PinnedUrl:
    """A URL whose host was resolved and checked: send to `url`, name the host in `host_header`."""

    url: httpx.URL
    host_header: str
    sni_hostname: str


async def pinned_url(policy: NetworkPolicy, url: str) -> PinnedUrl:
    """Resolve `url`'s host, keep the first allowed address and point the URL at it.

    RefusedAddress when no address is allowed; httpx.ConnectError when the name
    does not resolve (retried, as httpx's own failure would be).
    """
    parsed = httpx.URL(url)
    host = parsed.raw_host.decode("ascii")  # IDNA-encoded, as resolvers and TLS take it
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos: Sequence[Any] = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )
    except OSError as error:
        raise httpx.ConnectError(str(error)) from error
    addresses = [str(info[4][0]) for info in infos]
    allowed = next((a for a in addresses if policy.refusal(a) is None), None)
    if allowed is None:
        reason = policy.refusal(addresses[0], host) if addresses else None
        raise RefusedAddress(reason or f"refused: {host} resolves to no address")
    host_header = parsed.netloc.decode("ascii")
    return PinnedUrl(parsed.copy_with(host=allowed), host_header, host)
