"""The HTTP destination's settings (`OUTBOUND_HTTP_*`): timeout, attempts, concurrency (global
and per host), rate limit per host, signing, which addresses may be called (`network.py`).

Owns these fields and `check_http_settings` (reads the signing secrets and the
rate limit when the `Config` is made); the runtime's `Config` composes them and reads the
environment. Must not import the runtime or another destination.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from outbound.destinations.http.limits import (
    FAILURES_TO_OPEN,
    FIRST_COOL_DOWN,
    RATE_RULE,
    RateLimit,
    rate_limit_setting,
)
from outbound.destinations.http.network import (
    ALLOW_VARIABLE,
    BLOCK_VARIABLE,
    NetworkPolicy,
    network_policy,
)
from outbound.destinations.http.signing import SECRETS_VARIABLE, SigningKeys, signing_setting
from outbound.destinations.settings import Settings, always_enabled, setting

#: What a send says when this destination is not running (it always runs).
HOW_TO_ENABLE = "the HTTP destination is not running"


@dataclass(frozen=True)
class HttpSettings(Settings):
    """How the HTTP destination sends: always enabled."""

    http_timeout: float = setting(
        "OUTBOUND_HTTP_TIMEOUT",
        5.0,
        "seconds for a whole HTTP request, connect to last byte",
        rule="positive",
    )
    http_max_attempts: int | None = setting(
        "OUTBOUND_HTTP_MAX_ATTEMPTS",
        None,
        "attempts per HTTP send, first included (1 = no retry); unset: 5, or with the "
        "journal on enough to retry for OUTBOUND_RETRY_FOR at the OUTBOUND_RETRY_CAP",
        rule="at least 1",
    )
    http_concurrency: int = setting(
        "OUTBOUND_HTTP_CONCURRENCY", 16, "HTTP requests in flight at once", rule="at least 1"
    )
    http_host_concurrency: int = setting(
        "OUTBOUND_HTTP_HOST_CONCURRENCY",
        8,
        "HTTP requests in flight at once to one host (scheme, host and port), within "
        "OUTBOUND_HTTP_CONCURRENCY: a slow host cannot take every request slot",
        rule="at least 1",
    )
    http_circuit_failures: int = setting(
        "OUTBOUND_HTTP_CIRCUIT_FAILURES",
        FAILURES_TO_OPEN,
        "failed HTTP attempts in a row (connect error, timeout, 429, 5xx) that open a host's "
        "circuit: its sends wait, without spending attempts, until a probe succeeds",
        rule="at least 1",
    )
    http_circuit_cool_down: float = setting(
        "OUTBOUND_HTTP_CIRCUIT_COOL_DOWN",
        FIRST_COOL_DOWN,
        "seconds an open circuit waits before its probe, doubled after each failed probe "
        "(at most 60 s)",
        rule="positive",
    )
    # Text until `check_http_settings` reads it: then a `RateLimit`.
    http_rate_limit: RateLimit | str | None = setting(
        "OUTBOUND_HTTP_RATE_LIMIT",
        None,
        "HTTP requests at most to one host (scheme, host and port) from this node, as "
        "N/s, N/min or N/h (e.g. 100/s, 6000/min; token bucket, bursts of a tenth of a "
        "second's worth); unset: no limit",
    )
    # Text (whsec_..., comma-separated) until `check_http_settings` reads it: then
    # `SigningKeys`, whose repr shows only fingerprints.
    http_signing_secrets: SigningKeys | str | None = setting(
        SECRETS_VARIABLE,
        None,
        "Standard Webhooks secrets (whsec_<base64>, comma-separated while rotating: each "
        "one adds a signature) that sign ctx.send.http(..., sign=True)",
    )
    http_block_private: bool = setting(
        BLOCK_VARIABLE,
        False,
        "refuse HTTP sends to loopback, private, link-local (cloud metadata), multicast and "
        "other non-public addresses, checked on the address connected to (after DNS); "
        "turn on when URLs come from event data",
    )
    http_allow_addresses: str | None = setting(
        ALLOW_VARIABLE,
        None,
        "comma-separated IP addresses and CIDR ranges still allowed with "
        "OUTBOUND_HTTP_BLOCK_PRIVATE=1 (known internal endpoints; no host names)",
    )


def check_http_settings(settings: Any) -> None:
    """Read the signing secrets, the rate limit and the allow-list (ValueError naming the
    variable if one is bad)."""
    keys = signing_setting(settings.http_signing_secrets)
    object.__setattr__(settings, "http_signing_secrets", keys)  # a frozen dataclass
    try:
        limit = rate_limit_setting(settings.http_rate_limit, "OUTBOUND_HTTP_RATE_LIMIT")
    except ValueError:
        raise ValueError(
            f"OUTBOUND_HTTP_RATE_LIMIT must be {RATE_RULE}, got {settings.http_rate_limit!r}"
        ) from None
    object.__setattr__(settings, "http_rate_limit", limit)
    http_network_policy(settings)


def http_network_policy(settings: Any) -> NetworkPolicy | None:
    """Which addresses HTTP sends may reach: None (all) unless OUTBOUND_HTTP_BLOCK_PRIVATE=1."""
    return network_policy(settings.http_block_private, settings.http_allow_addresses)


#: Whether the runtime starts this destination: always, there is nothing to configure.
is_enabled = always_enabled
