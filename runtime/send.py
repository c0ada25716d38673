"""The send collector: `ctx.send.http/email/s3/sql/sse/emit/to(...)` and their validation.

Owns `SendCollector`, `SendError` and the rules each send's fields must meet.
A send validates everything at the call and raises `SendError` naming the
field and the rule; only a valid send is appended to the run's outbox, so a
caught error loses nothing that was already accepted. No I/O happens here:
delivery starts after the run ends. Payloads are encoded once, here, so their
size is checked at the call and destinations do not encode them again.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Any
from urllib.parse import urlsplit

from actors.ids import new_id
from destinations.delivery import Delivery, Outgoing
from destinations.http import HttpRequest
from runtime.config import Config


class SendError(ValueError):
    """A send's arguments break a rule; the message names the field and the rule."""

    def __init__(self, kind: str, field: str, rule: str) -> None:
        super().__init__(f"ctx.send.{kind}(): {field}: {rule}")
        self.kind = kind
        self.field = field
        self.rule = rule


#: What to do when a built-in destination is not running, per send kind.
HOW_TO_ENABLE: dict[str, str] = {
    "http": "the HTTP destination is not running",
    "email": "set OUTBOUND_SMTP_URL and OUTBOUND_EMAIL_FROM to enable email",
    "s3": "set OUTBOUND_S3_ENDPOINT (with OUTBOUND_S3_ACCESS_KEY and OUTBOUND_S3_SECRET_KEY) "
    "to enable S3",
    "sql": "set OUTBOUND_DATABASE_URL to enable SQL",
    "sse": "the SSE destination is not built into this version yet",
    "emit": "the emit destination is not built into this version yet",
}

HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 header field name
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_TABLE = re.compile(r"^(?!_)[a-z0-9_]+$", re.IGNORECASE)
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_HTTP_TIMEOUT = 300.0
MAX_PREFIX_BYTES = 512
MAX_IDENTIFIER_BYTES = 63  # Postgres truncates longer identifiers
MAX_SUBJECT_CHARS = 998  # RFC 5322 line length
MAX_CHANNEL_CHARS = 200


def encode_json(kind: str, field: str, value: Any) -> bytes:
    """Compact UTF-8 JSON, or SendError naming what is not JSON."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
            "utf-8"
        )
    except (TypeError, ValueError) as error:
        raise SendError(kind, field, f"must be JSON-serializable ({error})") from None
    except RecursionError:
        raise SendError(kind, field, "must be JSON-serializable (nested too deeply)") from None


@dataclass(frozen=True, slots=True)
class RunInfo:
    """Who is sending: copied into every delivery record of the run."""

    run_id: str
    workflow_id: str
    depth: int = 0


class SendCollector:
    """`ctx.send`: validates each call and appends it to the run's outbox."""

    __slots__ = ("_run", "_config", "_available", "outbox")

    def __init__(self, run: RunInfo, config: Config, available: Callable[[str], bool]) -> None:
        self._run = run
        self._config = config
        self._available = available
        self.outbox: list[Outgoing] = []

    # -- the six kinds ----------------------------------------------------------

    def http(
        self,
        url: str,
        *,
        method: str = "POST",
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        auth: tuple[str, str] | Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> str:
        """Queue one HTTP request. `data` is JSON-encoded unless it is str or bytes."""
        kind = "http"
        url = _check_url(url)
        if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
            raise SendError(kind, "method", f"must be one of {', '.join(sorted(HTTP_METHODS))}")
        clean_headers = _check_headers(headers)
        body: bytes | None
        if data is None:
            body = None
        elif isinstance(data, bytes | bytearray):
            body = bytes(data)
        elif isinstance(data, str):
            body = data.encode("utf-8")
        else:
            body = encode_json(kind, "data", data)
            if not any(name.lower() == "content-type" for name in clean_headers):
                clean_headers["Content-Type"] = "application/json"
        self._check_size(kind, "data", len(body or b""))
        timeout = self._config.http_timeout if timeout is None else timeout
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not math.isfinite(timeout)
            or not 0 < timeout <= MAX_HTTP_TIMEOUT
        ):
            raise SendError(kind, "timeout", f"must be seconds in (0, {MAX_HTTP_TIMEOUT:g}]")
        request = HttpRequest(
            method=method.upper(),
            url=url,
            headers=clean_headers,
            params=_check_params(params),
            body=body,
            auth=_check_auth(auth),
            timeout=float(timeout),
        )
        return self._append(kind, request, len(body or b""))

    def email(
        self,
        subject: str,
        text: str | None = None,
        html: str | None = None,
        to: str | list[str] | None = None,
    ) -> str:
        """Queue one email; at least one of `text` and `html`."""
        kind = "email"
        if not isinstance(subject, str) or not subject.strip():
            raise SendError(kind, "subject", "must be a non-empty string")
        if "\r" in subject or "\n" in subject:
            raise SendError(kind, "subject", "must not contain CR or LF (header injection)")
        if len(subject) > MAX_SUBJECT_CHARS:
            raise SendError(kind, "subject", f"must be at most {MAX_SUBJECT_CHARS} characters")
        for name, body in (("text", text), ("html", html)):
            if body is not None and not isinstance(body, str):
                raise SendError(kind, name, "must be a string")
        if not (text and text.strip()) and not (html and html.strip()):
            raise SendError(kind, "text", "give a non-empty text or html body")
        size = len((text or "").encode("utf-8")) + len((html or "").encode("utf-8"))
        self._check_size(kind, "text/html", size)
        recipients = _check_recipients(to if to is not None else self._config.email_to)
        payload = {"subject": subject, "text": text, "html": html, "to": recipients}
        return self._append(kind, payload, size)

    def s3(self, bucket: str, prefix: str, payload: Any) -> str:
        """Queue one payload for the NDJSON batch of `bucket`/`prefix`."""
        kind = "s3"
        _check_bucket(bucket)
        _check_prefix(prefix)
        line = encode_json(kind, "payload", payload)
        self._check_size(kind, "payload", len(line))
        return self._append(kind, (bucket, prefix, line), len(line))

    def sql(self, table: str, payload: Mapping[str, Any]) -> str:
        """Queue one row (a JSON object) for `table`."""
        kind = "sql"
        if not isinstance(table, str) or not _TABLE.match(table):
            raise SendError(
                kind, "table", "must match ^(?!_)[a-z0-9_]+$ (letters, digits, underscore)"
            )
        if len(table.encode("utf-8")) > MAX_IDENTIFIER_BYTES:
            raise SendError(kind, "table", f"must be at most {MAX_IDENTIFIER_BYTES} bytes")
        if not isinstance(payload, Mapping):
            raise SendError(kind, "payload", "must be a JSON object (a dict)")
        for key in payload:
            _check_column(key)
        row = encode_json(kind, "payload", dict(payload))
        self._check_size(kind, "payload", len(row))
        return self._append(kind, (table.lower(), row), len(row))

    def sse(self, channel: str, payload: Any) -> str:
        """Queue one event for this workflow's SSE stream, under event name `channel`."""
        kind = "sse"
        if not isinstance(channel, str) or not channel.strip():
            raise SendError(kind, "channel", "must be a non-empty string")
        if _CONTROL.search(channel):
            raise SendError(kind, "channel", "must not contain control characters (CR, LF, ...)")
        if len(channel) > MAX_CHANNEL_CHARS:
            raise SendError(kind, "channel", f"must be at most {MAX_CHANNEL_CHARS} characters")
        data = encode_json(kind, "payload", payload)
        self._check_size(kind, "payload", len(data))
        return self._append(kind, (channel, data), len(data))

    def emit(self, raw_event: Mapping[str, Any]) -> str:
        """Queue an event for the workflows that listen to this one."""
        kind = "emit"
        if not isinstance(raw_event, Mapping):
            raise SendError(kind, "raw_event", "must be a JSON object (a dict)")
        data = encode_json(kind, "raw_event", dict(raw_event))
        self._check_size(kind, "raw_event", len(data))
        return self._append(kind, data, len(data))

    def to(self, destination: str, payload: Any) -> str:
        """Queue `payload` for a custom destination added with `Runtime.add_destination`."""
        if not isinstance(destination, str) or not destination:
            raise SendError("to", "destination", "must be the name of an added destination")
        return self._append(destination, payload, 0, field="destination")

    # -- plumbing ---------------------------------------------------------------

    def _check_size(self, kind: str, field: str, size: int) -> None:
        limit = self._config.max_payload_bytes
        if size > limit:
            raise SendError(
                kind, field, f"is {size} bytes encoded; the limit is {limit} (max_payload_bytes)"
            )

    def _append(self, destination: str, payload: Any, size: int, field: str = "") -> str:
        if not self._available(destination):
            hint = HOW_TO_ENABLE.get(destination)
            if hint is None:
                raise SendError(
                    "to",
                    field or "destination",
                    f"no destination named {destination!r}; add it with rt.add_destination()",
                )
            raise SendError(destination, "destination", f"not configured: {hint}")
        run = self._run
        delivery_id = new_id()
        record = Delivery(
            destination,
            id=delivery_id,
            run_id=run.run_id,
            workflow_id=run.workflow_id,
            accepted_at=time.time(),
        )
        self.outbox.append(Outgoing(destination, payload, record, size, run.depth))
        return delivery_id


# -- field rules -------------------------------------------------------------------


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise SendError("http", "url", "must be a non-empty string")
    if _CONTROL.search(url) or " " in url:
        raise SendError("http", "url", "must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port
    except ValueError as error:
        raise SendError("http", "url", f"is not a valid URL ({error})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise SendError("http", "url", "must use the http or https scheme")
    if not parts.hostname:
        raise SendError("http", "url", "must name a host (http://host/path)")
    del port
    return url


def _check_headers(headers: Any) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise SendError("http", "headers", "must be a dict of str -> str")
    clean: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise SendError("http", "headers", f"must map str -> str; got {name!r}: {value!r}")
        if not _TOKEN.match(name):
            raise SendError("http", f"headers[{name!r}]", "is not a valid header name")
        if "\r" in value or "\n" in value or "\x00" in value:
            raise SendError("http", f"headers[{name!r}]", "value must not contain CR, LF or NUL")
        clean[name] = value
    return clean


def _check_params(params: Any) -> dict[str, Any] | None:
    if params is None:
        return None
    if not isinstance(params, Mapping):
        raise SendError("http", "params", "must be a dict of query parameters")
    scalar = str | int | float | bool
    for name, value in params.items():
        if not isinstance(name, str):
            raise SendError("http", "params", f"names must be strings, got {name!r}")
        values = value if isinstance(value, list | tuple) else [value]
        if not all(isinstance(item, scalar) for item in values):
            raise SendError(
                "http", f"params[{name!r}]", "must be a str, number, bool or a list of them"
            )
    return dict(params)


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
    return (auth[0], auth[1])


def _check_recipients(to: Any) -> list[str]:
    if to is None or to == "" or to == []:
        raise SendError("email", "to", "no recipient: pass to= or set OUTBOUND_EMAIL_TO")
    addresses = [part.strip() for part in to.split(",")] if isinstance(to, str) else to
    if not isinstance(addresses, list | tuple) or not addresses:
        raise SendError("email", "to", "must be an address or a list of addresses")
    for address in addresses:
        if not isinstance(address, str) or "\r" in address or "\n" in address:
            raise SendError("email", "to", f"{address!r} must be a string without CR or LF")
        _, bare = parseaddr(address)
        if not bare or not _ADDRESS.match(bare):
            raise SendError("email", "to", f"{address!r} is not a valid email address")
    return list(addresses)


def _check_bucket(bucket: Any) -> None:
    rule = None
    if not isinstance(bucket, str) or not _BUCKET.match(bucket):
        rule = (
            "must be 3-63 characters of lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    elif ".." in bucket:
        rule = "must not contain two adjacent periods"
    elif _is_ip(bucket):
        rule = "must not be formatted as an IP address"
    elif bucket.startswith(("xn--", "sthree-")) or bucket.endswith(("-s3alias", "--ol-s3")):
        rule = "must not use a prefix or suffix reserved by S3 (xn--, sthree-, -s3alias, --ol-s3)"
    if rule:
        raise SendError("s3", "bucket", f"{rule} (S3 bucket naming rules); got {bucket!r}")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def _check_prefix(prefix: Any) -> None:
    if not isinstance(prefix, str):
        raise SendError("s3", "prefix", "must be a string (use '' for the bucket root)")
    if prefix.startswith("/"):
        raise SendError("s3", "prefix", "must not start with '/'")
    if ".." in prefix:
        raise SendError("s3", "prefix", "must not contain '..'")
    if _CONTROL.search(prefix):
        raise SendError("s3", "prefix", "must not contain control characters")
    if len(prefix.encode("utf-8")) > MAX_PREFIX_BYTES:
        raise SendError("s3", "prefix", f"must be at most {MAX_PREFIX_BYTES} bytes")


def _check_column(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise SendError("sql", "payload", f"keys must be non-empty strings, got {key!r}")
    if key.startswith("_"):
        raise SendError("sql", f"payload[{key!r}]", "keys starting with '_' are reserved")
    if len(key.encode("utf-8")) > MAX_IDENTIFIER_BYTES:
        raise SendError(
            "sql", f"payload[{key!r}]", f"keys must be at most {MAX_IDENTIFIER_BYTES} bytes"
        )
    if "\x00" in key:
        raise SendError("sql", f"payload[{key!r}]", "keys must not contain NUL")
