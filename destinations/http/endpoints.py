"""Settings registered per HTTP endpoint: `rt.http_endpoint(url_prefix, retry=..., rate_limit=...)`.

Owns `EndpointSettings` (what one endpoint changes of the global HTTP
settings: its `RetryPolicy`, its rate limit) and `Endpoints`, the registry the
runtime keeps and lends to the HTTP actor (`starter(..., http_endpoints=...)`),
where the settings of a send's URL are looked up: the longest registered
prefix of the URL's text wins. Registered in code, so a restarted process
registers them again: they are not journaled. A send's own settings
(`ctx.send.http(..., retry=...)`) win over its endpoint's, which win over the
global ones. Must not import the runtime or another destination.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from outbound.destinations.backoff import RetryPolicy
from outbound.destinations.http.limits import RateLimit


@dataclass(frozen=True, slots=True)
class EndpointSettings:
    """The settings of the HTTP sends whose URL starts with `url_prefix` (None: the global one).

    `rate_limit` (e.g. `"100/s"`) is read by the HTTP rate limiter.
    """

    url_prefix: str
    retry: RetryPolicy | None = None
    rate_limit: str | None = None

    def __post_init__(self) -> None:
        prefix = self.url_prefix
        if not isinstance(prefix, str) or not prefix:
            raise ValueError("url_prefix must be a non-empty string")
        try:
            parts = urlsplit(prefix)
        except ValueError as error:
            raise ValueError(f"url_prefix is not a valid URL ({error})") from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                "url_prefix must start with http:// or https:// and a host "
                f"(lower-case scheme, as sends write it), got {prefix!r}"
            )
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise ValueError(f"retry must be a RetryPolicy or None, got {self.retry!r}")
        if self.rate_limit is not None and not isinstance(self.rate_limit, str):
            raise ValueError(
                f"rate_limit must be a string such as '100/s', got {self.rate_limit!r}"
            )
        if self.rate_limit is not None:
            RateLimit.parse(self.rate_limit, "rate_limit")  # ValueError naming it and the rule


class Endpoints:
    """The registered `EndpointSettings`, by URL prefix; thread-safe.

    Registered from any thread (the embedding application's), read by the HTTP
    actor: readers take an immutable snapshot without a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_prefix: dict[str, EndpointSettings] = {}
        # Longest prefix first: the first match is the one that wins.
        self._ordered: tuple[EndpointSettings, ...] = ()

    def register(self, settings: EndpointSettings) -> None:
        """Set the settings of `settings.url_prefix`, replacing any registered before."""
        if not isinstance(settings, EndpointSettings):
            raise TypeError(f"expected EndpointSettings, got {type(settings).__name__}")
        with self._lock:
            self._by_prefix[settings.url_prefix] = settings
            self._reorder()

    def remove(self, url_prefix: str) -> bool:
        """Forget the settings of `url_prefix`; whether there were any."""
        with self._lock:
            found = self._by_prefix.pop(url_prefix, None) is not None
            self._reorder()
        return found

    def _reorder(self) -> None:
        self._ordered = tuple(
            sorted(self._by_prefix.values(), key=lambda s: len(s.url_prefix), reverse=True)
        )

    def lookup(self, url: str) -> EndpointSettings | None:
        """The settings of the longest registered prefix of `url`, or None."""
        for settings in self._ordered:
            if url.startswith(settings.url_prefix):
                return settings
        return None

    def all(self) -> list[EndpointSettings]:
        """Every registered endpoint, longest prefix first."""
        return list(self._ordered)
