"""What the HTTP destination learned about endpoints: gone ones (410) and open circuits.

Owns `EndpointState`, one per runtime, shared by its facade
(`rt.enable_endpoint(url)`, `rt.health()`, `/metrics`) and the HTTP
destination (which marks an endpoint gone when it answers 410 Gone, and
publishes the hosts whose circuit is open, `limits.Circuit`). Thread-safe: the
facade's threads, the HTTP actor's thread and the asyncio loop's thread all use
it. It outlives the HTTP actor and a runtime's stop and start: a gone endpoint
stays gone until re-enabled (not journaled: a new process starts with none).
Settings registered in code are `endpoints.py`'s. Must not import the runtime
or another destination.
"""

from __future__ import annotations

import threading
from typing import Any


def shown_url(url: str) -> str:
    """`url` without its user info, query and fragment: errors are logged, and a webhook
    URL's query often carries a token."""
    scheme, _, rest = url.partition("://")
    rest = rest.split("#", 1)[0].split("?", 1)[0]
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def gone_error(url: str) -> str:
    """The error of a send to an endpoint marked gone: what happened and how to undo it."""
    shown = shown_url(url)
    whole = "" if shown == url else " (with its query: the send's detail['url'])"
    return (
        f"endpoint gone: {shown} answered 410 Gone; sends to it fail at once "
        f"until it is re-enabled with rt.enable_endpoint(url){whole}"
    )


class EndpointState:
    """Endpoints marked gone (by URL) and open circuits (by host)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gone: dict[str, str] = {}  # URL -> the error its sends fail with
        #: Open circuits by host (`Circuit.state`), replaced whole by the loop's thread.
        self.open_circuits: dict[str, dict[str, Any]] = {}

    def mark_gone(self, url: str) -> str:
        """Mark `url` gone; the error its sends fail with."""
        error = gone_error(url)
        with self._lock:
            self._gone[url] = error
        return error

    def gone(self, url: str) -> str | None:
        """Why sends to `url` fail at once, or None while it is not gone."""
        return self._gone.get(url) if self._gone else None

    def enable(self, url: str) -> bool:
        """Let sends to `url` go again; False if it was not marked gone."""
        with self._lock:
            return self._gone.pop(url, None) is not None

    def report(self) -> dict[str, Any]:
        """For health (served without a token): open circuits by host, and how many
        endpoints are gone (not which: a URL may hold a secret)."""
        return {"open_circuits": dict(self.open_circuits), "gone_endpoints": len(self._gone)}

    def gone_endpoints(self) -> list[str]:
        """The URLs marked gone, whole (for the embedding code, not for health)."""
        with self._lock:
            return sorted(self._gone)
