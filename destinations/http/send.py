"""`ctx.send.http(...)`: the rules of an HTTP send, and `HttpRequest`, what it becomes.

Owns `validate_http` (registered for `ctx.send.http` in `destinations/registry.py`),
which checks every argument at the call and returns the typed payload the
HTTP actor sends (`HttpRequest`) with its size, and the URL, query and auth
rules (header fields are checked by the core's `check_http_headers`), and
whether the request is signed (`signing.py`: `sign=True` with the configured
secrets, or `signing_secret=` of its own) and which trace it belongs to (the
`traceparent` active at the call: the run's span), and its own `RetryPolicy`
(`retry=`, kept in the payload so the journal keeps it across a restart). Pure: no I/O. Must not
import the runtime or another destination.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx

from outbound.destinations.backoff import RetryPolicy
from outbound.destinations.http.settings import HttpSettings
from outbound.destinations.http.signing import SIGNATURE_HEADERS, SigningKeys, check_signing
from outbound.destinations.payloads import quick_init
from outbound.destinations.tracing import current_traceparent, valid_traceparent
from outbound.destinations.validation import (
    CONTROL,
    SendError,
    check_http_headers,
    check_size,
    check_unicode,
    encode_json,
    unicode_rule,
)

HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
# httpx's own checks of a host written like an IPv4 address (its `.` is any character).
_IPV4_STYLE_HOST = re.compile(r"[0-9]+.[0-9]+.[0-9]+.[0-9]+")
MAX_HTTP_TIMEOUT = 300.0
# The longest URL (params included, once encoded) a send may have: httpx refuses
# longer ones, and most servers stop far below it (8-16 KiB, then 414).
MAX_URL_CHARS = 65536
_VALID_HOSTS: set[str] = set()  # URL host names already checked


@quick_init  # a faster __init__: one payload per send (destinations/payloads.py)
@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A validated `ctx.send.http(...)` call, ready to send.

    Header values are ASCII `str` or, for Latin-1 text, `bytes` (httpx sends
    `str` values as ASCII only); params are the text httpx puts in the query.
    `sign`: each attempt carries Standard Webhooks headers, signed with
    `signing_keys` (a per-send secret) or else the configured secrets (never
    kept here). `traceparent`: the W3C trace context of the run that sent it.
    `retry`: the send's own retry policy (None: its endpoint's, or the global
    one). New fields go last, with defaults: the journal keeps fields by position.
    """

    method: str
    url: str
    headers: dict[str, str | bytes] = field(default_factory=dict)
    params: dict[str, str | list[str]] | None = None
    body: bytes | None = None
    auth: tuple[str, str] | None = None
    timeout: float = 5.0
    sign: bool = False
    signing_keys: SigningKeys | None = None
    traceparent: str | None = None
    retry: RetryPolicy | None = None


def validate_http(
    config: HttpSettings,
    max_bytes: int,
    url: str,
    *,
    method: str = "POST",
    data: Any = None,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    auth: tuple[str, str] | Mapping[str, str] | None = None,
    timeout: float | None = None,
    sign: bool = False,
    signing_secret: str | None = None,
    retry: RetryPolicy | None = None,
) -> tuple[HttpRequest, int]:
    """`ctx.send.http(...)` as an `HttpRequest` and its body size (JSON unless str or bytes).

    `sign=True` signs each attempt (Standard Webhooks) with the secrets of
    `OUTBOUND_HTTP_SIGNING_SECRETS`; `signing_secret="whsec_..."` (comma-separated
    for several) signs it with that secret instead. `retry=RetryPolicy(...)` sets
    this send's attempts and backoff over its endpoint's and the global ones.
    """
    kind = "http"
    url = _check_url(url)
    if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
        raise SendError(kind, "method", f"must be one of {', '.join(sorted(HTTP_METHODS))}")
    clean_headers = check_http_headers(kind, headers)
    body: bytes | None
    if data is None:
        body = None
    elif isinstance(data, bytes | bytearray):
        body = bytes(data)
    elif isinstance(data, str):
        try:
            body = data.encode("utf-8")
        except UnicodeEncodeError as error:
            raise SendError(kind, "data", unicode_rule(error)) from None
    else:
        body = encode_json(kind, "data", data)
        if not any(name.lower() == "content-type" for name in clean_headers):
            clean_headers["Content-Type"] = "application/json"
    check_size(kind, "data", len(body or b""), max_bytes)
    timeout = config.http_timeout if timeout is None else timeout
    if (
        not isinstance(timeout, int | float)
        or isinstance(timeout, bool)
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_HTTP_TIMEOUT
    ):
        raise SendError(kind, "timeout", f"must be seconds in (0, {MAX_HTTP_TIMEOUT:g}]")
    clean_params = _check_params(params)
    if clean_params:
        _check_url_length(url, clean_params)
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise SendError(kind, "retry", "must be a RetryPolicy (from outbound import RetryPolicy)")
    signing_keys = None
    if sign is not False or signing_secret is not None:
        signing_keys = check_signing(config.http_signing_secrets, sign, signing_secret)
        sign = True  # (a signing_secret signs too)
        for name in clean_headers:
            if name.lower() in SIGNATURE_HEADERS:
                raise SendError(kind, f"headers[{name!r}]", "is set by signing; do not set it")
    request = HttpRequest(
        method=method.upper(),
        url=url,
        headers=clean_headers,
        params=clean_params,
        body=body,
        auth=_check_auth(auth),
        timeout=float(timeout),
        sign=sign,
        signing_keys=signing_keys,
        traceparent=current_traceparent(),
        retry=retry,
    )
    return request, len(body or b"")


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise SendError("http", "url", "must be a non-empty string")
    if CONTROL.search(url) or " " in url:
        raise SendError("http", "url", "must not contain spaces or control characters")
    if len(url) > MAX_URL_CHARS:
        raise SendError("http", "url", f"must be at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port
    except ValueError as error:
        raise SendError("http", "url", f"is not a valid URL ({error})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise SendError("http", "url", "must use the http or https scheme")
    host = parts.hostname
    if not host:
        raise SendError("http", "url", "must name a host (http://host/path)")
    del port
    if not url.isascii():
        # Rare: let httpx itself say whether it can send it (IDNA host names,
        # percent-encoding of the path), at a cost paid only by such URLs.
        check_unicode("http", "url", url)
        try:
            httpx.URL(url)
        except (httpx.InvalidURL, ValueError) as error:
            raise SendError("http", "url", f"is not a valid URL ({error})") from None
    if host not in _VALID_HOSTS:
        _check_host(host)
        if len(_VALID_HOSTS) < 4096:
            _VALID_HOSTS.add(host)
    return url


def _check_host(host: str) -> None:
    """What the resolver and httpx would refuse only when the request is made."""
    if ":" in host:  # an IPv6 literal: urlsplit has checked its brackets
        return
    if _IPV4_STYLE_HOST.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise SendError("http", "url", f"{host!r} is not a valid IPv4 address") from None
        return
    if host.isascii():
        try:
            host.encode("idna")  # what the resolver does: labels of 1-63 characters
        except UnicodeError:
            raise SendError(
                "http", "url", f"host {host!r} must be dot-separated labels of 1-63 characters"
            ) from None
    if len(host) > 253:
        raise SendError("http", "url", "host name must be at most 253 characters")


def _check_url_length(url: str, params: Mapping[str, str | list[str]]) -> None:
    """The URL with its query parameters, once encoded, must stay within MAX_URL_CHARS."""
    raw = sum(
        len(name) + 2 + (len(value) if isinstance(value, str) else sum(map(len, value)))
        for name, value in params.items()
    )
    if len(url) + 12 * raw <= MAX_URL_CHARS:  # 12: one character, 4 bytes, each %XX
        return
    encoded = urlencode(params, doseq=True, quote_via=quote)
    if len(url) + 1 + len(encoded) > MAX_URL_CHARS:
        raise SendError(
            "http", "params", f"make the URL longer than {MAX_URL_CHARS} characters once encoded"
        )


def _check_params(params: Any) -> dict[str, str | list[str]] | None:
    """Query parameters as the text httpx sends: `true`/`false` for booleans, `str()` else."""
    if params is None:
        return None
    if not isinstance(params, Mapping):
        raise SendError("http", "params", "must be a dict of query parameters")
    clean: dict[str, str | list[str]] = {}
    for name, value in params.items():
        if not isinstance(name, str):
            raise SendError("http", "params", f"names must be strings, got {name!r}")
        if not name.isascii():
            check_unicode("http", "params", name)
        if isinstance(value, list | tuple):
            clean[name] = [_param_text(name, item) for item in value]
        else:
            clean[name] = _param_text(name, value)
    return clean


def _param_text(name: str, value: Any) -> str:
    if isinstance(value, str):
        if not value.isascii():
            check_unicode("http", f"params[{name!r}]", value)
        return value
    if value is True or value is False:
        return "true" if value else "false"
    if not isinstance(value, int | float):
        raise SendError(
            "http", f"params[{name!r}]", "must be a str, number, bool or a list of them"
        )
    try:
        return str(value)
    except ValueError as error:  # an int with more digits than str() allows
        raise SendError("http", f"params[{name!r}]", f"is too large ({error})") from None


def _check_auth(auth: Any) -> tuple[str, str] | None:
    if auth is None:
        return None
    if isinstance(auth, Mapping):
        if set(auth) != {"username", "password"}:
            raise SendError("http", "auth", 'a dict must have exactly "username" and "password"')
        auth = (auth["username"], auth["password"])
    if (
        not isinstance(auth, tuple | list)
        or len(auth) != 2
        or not all(isinstance(part, str) for part in auth)
    ):
        raise SendError("http", "auth", "must be (username, password) strings")
    username, password = auth
    if ":" in username:
        raise SendError("http", "auth", "the username must not contain ':' (RFC 7617)")
    for part in (username, password):
        if CONTROL.search(part):
            raise SendError("http", "auth", "must not contain control characters")
        if not part.isascii():
            check_unicode("http", "auth", part)
    return (username, password)


def from_dead_letter(fields: Mapping[str, Any]) -> tuple[HttpRequest, int]:
    """A dead-letter line's fields (`{"payload": <HttpRequest as JSON>}`) as the request again.

    The inverse of the default dead-letter form (`deadletter.payload_fields`,
    written with `deadletter.jsonable`): bytes that were UTF-8 come back from
    text, others from `{"base64": ...}`. Not validated again: it was accepted once.
    A send signed with the configured secrets is signed with those of the
    replaying process; one signed with a secret of its own cannot be replayed
    from a file (files keep only the secret's fingerprint: ValueError), only
    from the journal's dead-letter stream.
    """
    request = fields["payload"]
    if request.get("signing_keys"):
        fingerprints = ", ".join(request["signing_keys"].get("fingerprints") or ())
        raise ValueError(
            f"signed with a signing_secret of its own ({fingerprints}), which dead-letter "
            "files do not keep: send it again from the workflow"
        )
    headers = {
        name: _bytes_or_text(value) for name, value in (request.get("headers") or {}).items()
    }
    body = request.get("body")
    body = None if body is None else _as_bytes(body)
    auth = request.get("auth")
    replayed = HttpRequest(
        method=str(request["method"]),
        url=str(request["url"]),
        headers=headers,
        params=request.get("params"),
        body=body,
        auth=(str(auth[0]), str(auth[1])) if auth else None,
        timeout=float(request.get("timeout") or 5.0),
        sign=bool(request.get("sign")),
        traceparent=valid_traceparent(request.get("traceparent")),
        retry=RetryPolicy(**request["retry"]) if request.get("retry") else None,
    )
    return replayed, len(body or b"")


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, dict) and "base64" in value:
        return base64.b64decode(value["base64"])
    return str(value).encode("utf-8")


def _bytes_or_text(value: Any) -> str | bytes:
    """A header value as it was: ASCII text stays `str`, other text was Latin-1 `bytes`."""
    if isinstance(value, dict) and "base64" in value:
        return base64.b64decode(value["base64"])
    text = str(value)
    return text if text.isascii() else text.encode("utf-8")
