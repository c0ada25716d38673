"""The rules every kind of send shares, and `SendError`, which names the broken one.

Owns `SendError` (public as `outbound.SendError`), the Unicode checks (no lone
surrogates), the one JSON encoding of payloads (`encode_json`), the size
limit (`check_size`), the character classes refused in header-like text, the
rules of HTTP header fields (`check_http_headers`), the parsing of email
addresses (`parse_addresses`) and the check of `ctx.send.to` payloads. Each
destination's own rules live in its `send.py`; they raise through these
helpers so every message reads
`ctx.send.<kind>(): <field>: <rule>`. Pure functions: no I/O, no actors, and
no import of the runtime or of any destination.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Mapping
from email.errors import NonASCIILocalPartDefect
from email.headerregistry import HeaderRegistry
from typing import Any

from outbound.destinations.json_encoding import json_encoder


class SendError(ValueError):
    """A send's arguments break a rule; the message names the field and the rule."""

    def __init__(self, kind: str, field: str, rule: str) -> None:
        super().__init__(f"ctx.send.{kind}(): {field}: {rule}")
        self.kind = kind
        self.field = field
        self.rule = rule


#: Control characters (CR, LF, NUL among them): never in a name, channel or URL.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Control characters but tab: never in a header line.
HEADER_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
#: Beyond ASCII, what `str.splitlines()` (and so the email package) takes for a
#: line break, and the other C1 controls: never part of a header line.
NON_ASCII_HEADER_BREAK = re.compile(r"[\x80-\x9f\u2028\u2029]")
NON_ASCII_BREAK_RULE = (
    "must not contain line breaks or control characters (U+0085, U+2028, U+2029, C1 controls)"
)
# HTTP header field names (RFC 9110 tokens); with `fullmatch`: `$` alone would
# let a trailing newline through.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What an HTTP field value must not hold: control characters but tab (CR, LF and
# NUL among them). Text outside Latin-1 cannot be sent at all (see `check_http_headers`).
_HEADER_VALUE_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Set by the HTTP client from the body: a user's value would contradict the
# body actually sent (h11 then refuses the request, or a server reads it wrongly).
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})
# Headers every HTTP attempt sets, by their lower-case name: a send's own header of
# that name (in any case) is spelled the same way, so it replaces ours instead of
# going out twice.
_ATTEMPT_HEADERS = {
    "idempotency-key": "Idempotency-Key",
    "user-agent": "User-Agent",
    "traceparent": "traceparent",
}
_VALID_HEADER_NAMES: dict[str, str] = {}  # header names already checked -> lower case
# local@domain: dot-atom local part (Unicode letters allowed, for SMTPUTF8), dotted domain.
_ADDRESS = re.compile(r"^[\w.!#$%&'*+/=?^`{|}~-]+@(?:[\w-]+\.)+[\w-]{2,}$")
_ADDRESS_HEADER = HeaderRegistry()  # parses address lists as the email package does
#: Values kept as they are in a `ctx.send.to` payload: nothing in them to check.
PLAIN_SCALARS = frozenset({int, float, bool, type(None), bytes})

_compact_json = json_encoder(compact=True)


def unicode_rule(error: UnicodeEncodeError) -> str:
    """The rule a lone surrogate breaks, quoting it."""
    bad = error.object[error.start : error.end]
    return f"must be valid Unicode (no lone surrogates: {bad!r} cannot be encoded as UTF-8)"


def check_unicode(kind: str, field: str, value: str) -> int:
    """Encoded size in bytes, or SendError for text that is not valid Unicode."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise SendError(kind, field, unicode_rule(error)) from None


#: The size limit a replayed dead letter is checked against: none (it was accepted once).
REPLAY_MAX_BYTES = 2**62


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
        raise SendError(kind, field, unicode_rule(error)) from None
    except (TypeError, ValueError) as error:
        raise SendError(kind, field, f"must be JSON-serializable ({error})") from None
    except RecursionError:
        raise SendError(kind, field, "must be JSON-serializable (nested too deeply)") from None


def check_size(kind: str, field: str, size: int, limit: int) -> None:
    """SendError when a payload's encoded `size` is over `limit` (`max_payload_bytes`)."""
    if size > limit:
        raise SendError(
            kind, field, f"is {size} bytes encoded; the limit is {limit} (max_payload_bytes)"
        )


def is_ipv4(name: str) -> bool:
    """Is `name` written as an IPv4 address (`192.168.5.4`)?"""
    if not name.replace(".", "").isdigit():  # fast path: raising ValueError costs ~2 µs
        return False
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def check_http_headers(kind: str, headers: Any) -> dict[str, str | bytes]:
    """Header name -> value as it goes on the wire: ASCII text, or Latin-1 bytes.

    httpx sends `str` values as ASCII only; Latin-1 text (RFC 9110's obs-text)
    goes as bytes so it arrives intact. Surrounding spaces and tabs are not
    part of a field value (RFC 9110, 5.5) and are dropped: h11 refuses them.
    """
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise SendError(kind, "headers", "must be a dict of str -> str")
    clean: dict[str, str | bytes] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise SendError(kind, "headers", f"must map str -> str; got {name!r}: {value!r}")
        lowered = _VALID_HEADER_NAMES.get(name)
        if lowered is None:
            if not _TOKEN.fullmatch(name):
                raise SendError(kind, f"headers[{name!r}]", "is not a valid header name")
            lowered = name.lower()
            if len(_VALID_HEADER_NAMES) < 4096:
                _VALID_HEADER_NAMES[name] = lowered
        if lowered in _FRAMING_HEADERS:
            raise SendError(
                kind, f"headers[{name!r}]", "is set by the HTTP client from data; do not set it"
            )
        name = _ATTEMPT_HEADERS.get(lowered, name)  # replaces ours instead of going out twice
        if _HEADER_VALUE_CONTROL.search(value):
            raise SendError(
                kind,
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
                kind,
                f"headers[{name!r}]",
                "value must be Latin-1 (ISO-8859-1) text; percent-encode anything else (RFC 8187)",
            ) from None
    return clean


def parse_addresses(kind: str, field: str, item: str) -> list[str]:
    """The addresses one string lists (`"a@x.org, B <b@y.org>"`), formatted, or SendError.

    Quoted display names may contain commas, so the email package's strict
    header parser splits them, and anything it had to guess at is refused.
    """
    if "\r" in item or "\n" in item:
        raise SendError(kind, field, f"{item!r} must not contain CR or LF (header injection)")
    if CONTROL.search(item):
        raise SendError(kind, field, f"{item!r} must not contain control characters")
    if not item.isascii() and NON_ASCII_HEADER_BREAK.search(item):
        raise SendError(kind, field, f"{item!r} {NON_ASCII_BREAK_RULE}")
    check_unicode(kind, field, item)
    header = _ADDRESS_HEADER("To", item)
    guessed = [d for d in header.defects if not isinstance(d, NonASCIILocalPartDefect)]
    if guessed or any(not _ADDRESS.match(a.addr_spec) for a in header.addresses):
        raise SendError(kind, field, f"{item!r} is not a valid email address (name@example.com)")
    return [str(address) for address in header.addresses]


def check_custom_payload(payload: Any) -> None:
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
                check_unicode("to", "payload", container)
            continue
        if kind in PLAIN_SCALARS or id(container) in seen:
            continue
        seen.add(id(container))
        if kind is dict or isinstance(container, Mapping):
            _check_leaves(container.keys(), stack)
            _check_leaves(container.values(), stack)
        elif kind is list or kind is tuple or isinstance(container, list | tuple | set | frozenset):
            _check_leaves(container, stack)
        elif isinstance(container, str):  # a str subclass
            check_unicode("to", "payload", container)
        elif dataclasses.is_dataclass(container) and not isinstance(container, type):
            fields = dataclasses.fields(container)
            _check_leaves([getattr(container, field.name) for field in fields], stack)


def _check_leaves(items: Iterable[Any], containers: list[Any]) -> None:
    """Check the text among `items` at once; put the containers on the stack to walk."""
    for item in items:
        kind = type(item)
        if kind is str:
            if not item.isascii():
                check_unicode("to", "payload", item)
        elif kind not in PLAIN_SCALARS:
            containers.append(item)
