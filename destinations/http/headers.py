"""The headers of one HTTP attempt: ids, User-Agent, trace context and signature.

Owns `attempt_headers(send, configured_keys)`, called by the workers once per
attempt, just before the request: `Idempotency-Key` (the delivery id, the same
on every attempt), `User-Agent: outbound/<version>`, `traceparent` (the
attempt's span, or the run's when no SDK makes spans), then the send's own
headers (which may replace the first three), then, for a signed send, the
Standard Webhooks headers, signed now, with this attempt's timestamp
(`signing.py`). Must not import the runtime or another destination.
"""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

from outbound.destinations.delivery import Send
from outbound.destinations.http.send import HttpRequest
from outbound.destinations.http.signing import SECRETS_VARIABLE, SigningKeys, signature_headers
from outbound.destinations.tracing import current_traceparent

try:
    USER_AGENT = f"outbound/{version('outbound-runtime')}"
except PackageNotFoundError:  # a source tree that was never installed
    USER_AGENT = "outbound/0+unknown"


class SigningUnavailableError(RuntimeError):
    """A send asks to be signed with the configured secrets, and none are configured now.

    (It was accepted by a process that had them: a journal recovered it, or
    a replay sends it again, under another configuration.) The send fails
    for good and is dead-lettered; set the variable and replay it.
    """


def attempt_headers(send: Send, configured_keys: SigningKeys | None) -> dict[str, str | bytes]:
    """What one attempt of `send` sends as headers; signed now if the send is signed."""
    request: HttpRequest = send.payload
    headers: dict[str, str | bytes] = {"Idempotency-Key": send.id, "User-Agent": USER_AGENT}
    traceparent = current_traceparent() or request.traceparent
    if traceparent is not None:
        headers["traceparent"] = traceparent
    headers.update(request.headers)
    if request.sign:
        keys = request.signing_keys or configured_keys
        if keys is None:
            raise SigningUnavailableError(
                f"this send is signed (sign=True) and {SECRETS_VARIABLE} is not set here"
            )
        headers.update(signature_headers(keys, send.id, int(time.time()), request.body))
    return headers
