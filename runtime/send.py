"""The send collector: `ctx.send.http/email/s3/sql/sse/emit/to(...)` and their validation.

Owns `SendCollector`, `SendError` and the rules each send's fields must meet.
A send validates everything at the call and raises `SendError` naming the
field and the rule; only a valid send is appended to the run's outbox, so a
caught error loses nothing that was already accepted. No I/O happens here:
delivery starts after the run ends. Payloads are encoded once, here, so their
size is checked at the call and destinations do not encode them again.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.errors import NonASCIILocalPartDefect
from email.headerregistry import HeaderRegistry
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx

from outbound.actors.ids import new_id
from outbound.config import Config
from outbound.destinations.delivery import Outgoing, new_send
from outbound.destinations.http.workers import HttpRequest
from outbound.destinations.json_encoding import json_encoder
from outbound.destinations.sql.rows import NotJsonValue, snapshot_row, sql_row
from outbound.destinations.sql.schema import MAX_COLUMNS, RESERVED_TABLE_PREFIX, SYSTEM_COLUMNS


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
    "sql": "set OUTBOUND_DATABASE_URL (postgresql://user:password@host:5432/dbname) to enable SQL",
    "sse": "the SSE destination is not running",
    "emit": "the emit destination is not running",
}

HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
# _TOKEN and _BUCKET go with `fullmatch`: `$` alone would let a trailing newline through.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 header field name
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# What an HTTP field value must not hold: control characters but tab (CR, LF and
# NUL among them). Text outside Latin-1 cannot be sent at all (see `_check_headers`).
_HEADER_VALUE_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Set by the HTTP client from the body: a user's value would contradict the
# body actually sent (h11 then refuses the request, or a server reads it wrongly).
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})
_IDEMPOTENCY_KEY = "Idempotency-Key"
# httpx's own checks of a host written like an IPv4 address (its `.` is any character).
_IPV4_STYLE_HOST = re.compile(r"[0-9]+.[0-9]+.[0-9]+.[0-9]+")
# local@domain: dot-atom local part (Unicode letters allowed, for SMTPUTF8), dotted domain.
_ADDRESS = re.compile(r"^[\w.!#$%&'*+/=?^`{|}~-]+@(?:[\w-]+\.)+[\w-]{2,}$")
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # control characters but tab
# Beyond ASCII, what `str.splitlines()` (and so the email package) takes for a
# line break, and the other C1 controls: never part of a header line.
_NON_ASCII_HEADER_BREAK = re.compile(r"[\x80-\x9f\u2028\u2029]")
_ADDRESS_HEADER = HeaderRegistry()  # parses address lists as the email package does
MAX_RECIPIENTS = 100
MAX_HTTP_TIMEOUT = 300.0
# The longest URL (params included, once encoded) a send may have: httpx refuses
# longer ones, and most servers stop far below it (8-16 KiB, then 414).
MAX_URL_CHARS = 65536
_VALID_HOSTS: set[str] = set()  # URL host names already checked
_VALID_HEADER_NAMES: dict[str, str] = {}  # header names already checked -> lower case
MAX_PREFIX_BYTES = 512
_VALID_S3_TARGETS: set[tuple[str, str]] = set()  # (bucket, prefix) pairs already checked
MAX_IDENTIFIER_BYTES = 63  # Postgres truncates longer identifiers
# The key tuples of SQL payloads already found valid, each kept once: rows of
# one shape share it (one tuple, not one per row), and a batch of them turns
# into columns with one zip.
_VALID_SQL_SHAPES: dict[tuple[str, ...], tuple[str, ...]] = {}
_VALID_SQL_TABLES: dict[str, str] = {}  # SQL table names already found valid -> lower case
MAX_SUBJECT_CHARS = 998  # RFC 5322 line length
MAX_CHANNEL_CHARS = 200


_compact_json = json_encoder(compact=True)


def encode_json(kind: str, field: str, value: Any) -> bytes:
    """Compact UTF-8 JSON, or SendError naming what is not JSON.

    Text is kept as it is (no `\\uXXXX` escapes), so a lone surrogate in a key
    or a value meets `.encode("utf-8")` here and is refused: escaped, it would
    be JSON that strict receivers reject (Postgres jsonb, I-JSON) and lenient
    ones silently turn into U+FFFD.
    """
    try:
        return _compact_json(value).encode("utf-8")
    except UnicodeEncodeError as error:
        raise SendError(kind, field, _unicode_rule(error)) from None
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
            try:
                body = data.encode("utf-8")
            except UnicodeEncodeError as error:
                raise SendError(kind, "data", _unicode_rule(error)) from None
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
        clean_params = _check_params(params)
        if clean_params:
            _check_url_length(url, clean_params)
        request = HttpRequest(
            method=method.upper(),
            url=url,
            headers=clean_headers,
            params=clean_params,
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
        if _HEADER_CONTROL.search(subject):
            raise SendError(kind, "subject", "must not contain control characters")
        if not subject.isascii() and _NON_ASCII_HEADER_BREAK.search(subject):
            raise SendError(kind, "subject", _NON_ASCII_BREAK_RULE)
        if len(subject) > MAX_SUBJECT_CHARS:
            raise SendError(kind, "subject", f"must be at most {MAX_SUBJECT_CHARS} characters")
        _check_unicode(kind, "subject", subject)
        for name, body in (("text", text), ("html", html)):
            if body is not None and not isinstance(body, str):
                raise SendError(kind, name, "must be a string")
            if body and "\x00" in body:
                raise SendError(kind, name, "must not contain NUL characters")
        if not (text and text.strip()) and not (html and html.strip()):
            raise SendError(kind, "text", "give a non-empty text or html body")
        if html and html.strip() and not (text and text.strip()):
            text = None  # a blank text part next to real HTML would only hide it
        elif text and text.strip() and not (html and html.strip()):
            html = None
        size = _check_unicode(kind, "text", text or "") + _check_unicode(kind, "html", html or "")
        self._check_size(kind, "text/html", size)
        recipients = _check_recipients(to if to is not None else self._config.email_to)
        payload = {"subject": subject, "text": text, "html": html, "to": recipients}
        return self._append(kind, payload, size)

    def s3(self, bucket: str, prefix: str, payload: Any) -> str:
        """Queue one payload for the NDJSON batch of `bucket`/`prefix`."""
        kind = "s3"
        if type(bucket) is not str or type(prefix) is not str:
            _check_bucket(bucket)
            _check_prefix(prefix)
        elif (bucket, prefix) not in _VALID_S3_TARGETS:
            _check_bucket(bucket)
            _check_prefix(prefix)
            if len(_VALID_S3_TARGETS) < 4096:
                _VALID_S3_TARGETS.add((bucket, prefix))
        line = encode_json(kind, "payload", payload)
        self._check_size(kind, "payload", len(line))
        return self._append(kind, (bucket, prefix, line), len(line))

    def sql(self, table: str, payload: Mapping[str, Any]) -> str:
        """Queue one row (a JSON object) for `table`."""
        kind = "sql"
        lowered = _VALID_SQL_TABLES.get(table) if type(table) is str else None
        if lowered is None:
            lowered = _check_table(table)
            if len(_VALID_SQL_TABLES) < 4096:
                _VALID_SQL_TABLES[table] = lowered
        if type(payload) is not dict and not isinstance(payload, Mapping):
            raise SendError(kind, "payload", "must be a JSON object (a dict)")
        keys = tuple(payload)
        shape = _VALID_SQL_SHAPES.get(keys)  # the same keys come again and again
        if shape is None:
            _check_columns(keys)
            shape = keys
            if len(_VALID_SQL_SHAPES) < 4096:
                _VALID_SQL_SHAPES[keys] = keys
        try:
            values, size = snapshot_row(payload)
        except NotJsonValue as error:
            raise SendError(
                kind, f"payload[{error.key!r}]", f"must be JSON-serializable ({error.reason})"
            ) from None
        self._check_size(kind, "payload", size)
        return self._append(kind, sql_row(lowered, shape, values), size)

    def sse(self, channel: str, payload: Any) -> str:
        """Queue one event for this workflow's SSE stream, under event name `channel`."""
        kind = "sse"
        if not isinstance(channel, str) or not channel.strip():
            raise SendError(kind, "channel", "must be a non-empty string")
        if _CONTROL.search(channel):
            raise SendError(kind, "channel", "must not contain control characters (CR, LF, ...)")
        if len(channel) > MAX_CHANNEL_CHARS:
            raise SendError(kind, "channel", f"must be at most {MAX_CHANNEL_CHARS} characters")
        if not channel.isascii():
            _check_unicode(kind, "channel", channel)
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
        if type(payload) not in _PLAIN_SCALARS:
            _check_custom_payload(payload)
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
        self.outbox.append(
            new_send(
                destination,
                delivery_id,
                run.run_id,
                run.workflow_id,
                time.time(),
                payload,
                size,
                run.depth,
            )
        )
        return delivery_id


# -- field rules -------------------------------------------------------------------


_NON_ASCII_BREAK_RULE = (
    "must not contain line breaks or control characters (U+0085, U+2028, U+2029, C1 controls)"
)
_PLAIN_SCALARS = frozenset({int, float, bool, type(None), bytes})


def _unicode_rule(error: UnicodeEncodeError) -> str:
    bad = error.object[error.start : error.end]
    return f"must be valid Unicode (no lone surrogates: {bad!r} cannot be encoded as UTF-8)"


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise SendError("http", "url", "must be a non-empty string")
    if _CONTROL.search(url) or " " in url:
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
        _check_unicode("http", "url", url)
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


def _check_headers(headers: Any) -> dict[str, str | bytes]:
    """Header name -> value as it goes on the wire: ASCII text, or Latin-1 bytes.

    httpx sends `str` values as ASCII only; Latin-1 text (RFC 9110's obs-text)
    goes as bytes so it arrives intact. Surrounding spaces and tabs are not
    part of a field value (RFC 9110, 5.5) and are dropped: h11 refuses them.
    """
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise SendError("http", "headers", "must be a dict of str -> str")
    clean: dict[str, str | bytes] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise SendError("http", "headers", f"must map str -> str; got {name!r}: {value!r}")
        lowered = _VALID_HEADER_NAMES.get(name)
        if lowered is None:
            if not _TOKEN.fullmatch(name):
                raise SendError("http", f"headers[{name!r}]", "is not a valid header name")
            lowered = name.lower()
            if len(_VALID_HEADER_NAMES) < 4096:
                _VALID_HEADER_NAMES[name] = lowered
        if lowered in _FRAMING_HEADERS:
            raise SendError(
                "http", f"headers[{name!r}]", "is set by the HTTP client from data; do not set it"
            )
        if lowered == "idempotency-key":
            name = _IDEMPOTENCY_KEY  # replaces the delivery id instead of going out twice
        if _HEADER_VALUE_CONTROL.search(value):
            raise SendError(
                "http",
                f"headers[{name!r}]",
                "value must not contain CR, LF, NUL or other control characters",
            )
        value = value.strip(" \t")
        if value.isascii():
            clean[name] = value
            continue
        try:
            clean[name] = value.encode("latin-1")
        except UnicodeEncodeError:
            raise SendError(
                "http",
                f"headers[{name!r}]",
                "value must be Latin-1 (ISO-8859-1) text; percent-encode anything else (RFC 8187)",
            ) from None
    return clean


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
            _check_unicode("http", "params", name)
        if isinstance(value, list | tuple):
            clean[name] = [_param_text(name, item) for item in value]
        else:
            clean[name] = _param_text(name, value)
    return clean


def _param_text(name: str, value: Any) -> str:
    if isinstance(value, str):
        if not value.isascii():
            _check_unicode("http", f"params[{name!r}]", value)
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
        if _CONTROL.search(part):
            raise SendError("http", "auth", "must not contain control characters")
        if not part.isascii():
            _check_unicode("http", "auth", part)
    return (username, password)


def _check_recipients(to: Any) -> list[str]:
    if to is None or to == "" or to == []:
        raise SendError("email", "to", "no recipient: pass to= or set OUTBOUND_EMAIL_TO")
    if not isinstance(to, str | list | tuple):
        raise SendError("email", "to", "must be an address or a list of addresses")
    recipients: list[str] = []
    for item in [to] if isinstance(to, str) else to:
        if not isinstance(item, str):
            raise SendError("email", "to", f"{item!r} must be a string")
        if "\r" in item or "\n" in item:
            raise SendError("email", "to", f"{item!r} must not contain CR or LF (header injection)")
        if _CONTROL.search(item):
            raise SendError("email", "to", f"{item!r} must not contain control characters")
        if not item.isascii() and _NON_ASCII_HEADER_BREAK.search(item):
            raise SendError("email", "to", f"{item!r} {_NON_ASCII_BREAK_RULE}")
        _check_unicode("email", "to", item)
        # A string may list several addresses ("a@x.org, B <b@y.org>"); quoted
        # display names may contain commas, so the email package's strict
        # header parser splits them, and anything it had to guess at is refused.
        header = _ADDRESS_HEADER("To", item)
        guessed = [d for d in header.defects if not isinstance(d, NonASCIILocalPartDefect)]
        if guessed or any(not _ADDRESS.match(a.addr_spec) for a in header.addresses):
            raise SendError(
                "email", "to", f"{item!r} is not a valid email address (name@example.com)"
            )
        recipients += [str(address) for address in header.addresses]
    if not recipients:
        raise SendError("email", "to", "no recipient: pass to= or set OUTBOUND_EMAIL_TO")
    if len(recipients) > MAX_RECIPIENTS:
        raise SendError("email", "to", f"at most {MAX_RECIPIENTS} recipients per email")
    return recipients


def _check_unicode(kind: str, field: str, value: str) -> int:
    """Encoded size in bytes, or SendError for text that is not valid Unicode."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise SendError(kind, field, _unicode_rule(error)) from None


def _check_custom_payload(payload: Any) -> None:
    """Refuse text that cannot be encoded anywhere in a `ctx.send.to` payload.

    A custom destination may keep Python objects as they are, but a payload that
    ends in the dead-letter file is written as UTF-8 JSON: one lone surrogate
    would make that write fail for every send beside it. Containers (dicts,
    lists, tuples, sets, dataclasses) are walked, each once; other objects are
    dead-lettered by their `repr`, which escapes surrogates. Leaves (str and
    plain scalars) are checked in place, so a flat dict costs one loop.
    """
    stack = [payload]
    seen: set[int] = set()
    while stack:
        container = stack.pop()
        kind = type(container)
        if kind is str:  # only the payload itself: _check_leaves does the others
            if not container.isascii():
                _check_unicode("to", "payload", container)
            continue
        if kind in _PLAIN_SCALARS or id(container) in seen:
            continue
        seen.add(id(container))
        if kind is dict or isinstance(container, Mapping):
            _check_leaves(container.keys(), stack)
            _check_leaves(container.values(), stack)
        elif kind is list or kind is tuple or isinstance(container, list | tuple | set | frozenset):
            _check_leaves(container, stack)
        elif isinstance(container, str):  # a str subclass
            _check_unicode("to", "payload", container)
        elif dataclasses.is_dataclass(container) and not isinstance(container, type):
            fields = dataclasses.fields(container)
            _check_leaves([getattr(container, field.name) for field in fields], stack)


def _check_leaves(items: Iterable[Any], containers: list[Any]) -> None:
    """Check the text among `items` at once; put the containers on the stack to walk."""
    for item in items:
        kind = type(item)
        if kind is str:
            if not item.isascii():
                _check_unicode("to", "payload", item)
        elif kind not in _PLAIN_SCALARS:
            containers.append(item)


def _check_bucket(bucket: Any) -> None:
    rule = None
    if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket):
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
    if not name.replace(".", "").isdigit():  # fast path: raising ValueError costs ~2 µs
        return False
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
    if _check_unicode("s3", "prefix", prefix) > MAX_PREFIX_BYTES:
        raise SendError("s3", "prefix", f"must be at most {MAX_PREFIX_BYTES} bytes")
    # Trailing slashes are dropped (`normalize_prefix`); inside, '.' segments are
    # refused by the minio client, and they (even with spaces around) and empty
    # ones ('a//b') by MinIO's server, while AWS keeps both as part of the name:
    # neither can be delivered alike.
    segments = prefix.rstrip("/").split("/")
    if any(segment.strip() == "." for segment in segments):
        raise SendError("s3", "prefix", "must not contain '.' path segments (such as './x')")
    if prefix.rstrip("/") and "" in segments:
        raise SendError("s3", "prefix", "must not contain empty path segments ('//')")


# Table names are ASCII only: with Unicode case rules, "\u212a" (the Kelvin sign)
# would match [a-z] and fold to "k", and "\u0130" would grow when lowercased.
_SQL_TABLE = re.compile(r"(?!_)[a-z0-9_]+", re.ASCII | re.IGNORECASE)


def _check_table(table: Any) -> str:
    """The table's name as stored (lowercase), or SendError for one Postgres cannot take."""
    # fullmatch: `$` alone would let a trailing newline through.
    if not isinstance(table, str) or not _SQL_TABLE.fullmatch(table):
        raise SendError(
            "sql", "table", "must match ^(?!_)[a-z0-9_]+$ (ASCII letters, digits, underscore)"
        )
    if len(table) > MAX_IDENTIFIER_BYTES:  # ASCII: one byte a character
        raise SendError("sql", "table", f"must be at most {MAX_IDENTIFIER_BYTES} bytes")
    lowered = table.lower()
    if lowered.startswith(RESERVED_TABLE_PREFIX):
        raise SendError(
            "sql",
            "table",
            f"must not start with {RESERVED_TABLE_PREFIX!r}: Postgres finds its catalogs "
            "(pg_class, ...) by those names before any table of ours",
        )
    return lowered


def _check_columns(keys: tuple[Any, ...]) -> None:
    """The keys of one payload, as the columns of one row."""
    if len(keys) > MAX_COLUMNS - 2:
        raise SendError(
            "sql",
            "payload",
            f"has {len(keys)} keys; a Postgres table has at most {MAX_COLUMNS} columns, "
            "two of them _event_id and _received_at",
        )
    for key in keys:
        _check_column(key)


def _check_column(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise SendError("sql", "payload", f"keys must be non-empty strings, got {key!r}")
    field = f"payload[{key!r}]"
    if key.startswith("_"):
        raise SendError("sql", field, "keys starting with '_' are reserved")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise SendError("sql", field, "keys must be valid Unicode (no lone surrogates)") from None
    if size > MAX_IDENTIFIER_BYTES:
        raise SendError("sql", field, f"keys must be at most {MAX_IDENTIFIER_BYTES} bytes")
    if "\x00" in key:
        raise SendError("sql", field, "keys must not contain NUL")
    if key in SYSTEM_COLUMNS:
        raise SendError(
            "sql",
            field,
            f"is a Postgres system column ({', '.join(sorted(SYSTEM_COLUMNS))}) that every "
            "table already has; rename the key",
        )
