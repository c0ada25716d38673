"""`ctx.send.email(...)`: the rules of an email send, and `Email`, what it becomes.

Owns `validate_email` (registered for `ctx.send.email` in
`destinations/registry.py`), which checks the subject, bodies and recipients
at the call and returns the typed payload the email actor sends (`Email`)
with its size, and the recipient rules (each address parsed by the core's
`parse_addresses`, as the email package parses a `To` header). Pure: no
I/O. Must not import the runtime or another destination.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outbound.destinations.email.settings import EmailSettings
from outbound.destinations.payloads import quick_init
from outbound.destinations.validation import (
    HEADER_CONTROL,
    NON_ASCII_BREAK_RULE,
    NON_ASCII_HEADER_BREAK,
    SendError,
    check_size,
    check_unicode,
    parse_addresses,
)

MAX_RECIPIENTS = 100
MAX_SUBJECT_CHARS = 998  # RFC 5322 line length


@quick_init  # a faster __init__: one payload per send (destinations/payloads.py)
@dataclass(frozen=True, slots=True)
class Email:
    """A validated `ctx.send.email(...)` call: at least one body, one or more recipients."""

    subject: str
    text: str | None
    html: str | None
    to: tuple[str, ...]  # formatted addresses, display names kept


def validate_email(
    config: EmailSettings,
    max_bytes: int,
    subject: str,
    text: str | None = None,
    html: str | None = None,
    to: str | list[str] | None = None,
) -> tuple[Email, int]:
    """`ctx.send.email(...)` as an `Email` and its bodies' size; at least one of text and html."""
    kind = "email"
    if not isinstance(subject, str) or not subject.strip():
        raise SendError(kind, "subject", "must be a non-empty string")
    if "\r" in subject or "\n" in subject:
        raise SendError(kind, "subject", "must not contain CR or LF (header injection)")
    if HEADER_CONTROL.search(subject):
        raise SendError(kind, "subject", "must not contain control characters")
    if not subject.isascii() and NON_ASCII_HEADER_BREAK.search(subject):
        raise SendError(kind, "subject", NON_ASCII_BREAK_RULE)
    if len(subject) > MAX_SUBJECT_CHARS:
        raise SendError(kind, "subject", f"must be at most {MAX_SUBJECT_CHARS} characters")
    check_unicode(kind, "subject", subject)
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
    size = check_unicode(kind, "text", text or "") + check_unicode(kind, "html", html or "")
    check_size(kind, "text/html", size, max_bytes)
    recipients = _check_recipients(to if to is not None else config.email_to)
    return Email(subject, text, html, tuple(recipients)), size


def _check_recipients(to: Any) -> list[str]:
    if to is None or to == "" or to == []:
        raise SendError("email", "to", "no recipient: pass to= or set OUTBOUND_EMAIL_TO")
    if not isinstance(to, str | list | tuple):
        raise SendError("email", "to", "must be an address or a list of addresses")
    recipients: list[str] = []
    for item in [to] if isinstance(to, str) else to:
        if not isinstance(item, str):
            raise SendError("email", "to", f"{item!r} must be a string")
        recipients += parse_addresses("email", "to", item)
    if not recipients:
        raise SendError("email", "to", "no recipient: pass to= or set OUTBOUND_EMAIL_TO")
    if len(recipients) > MAX_RECIPIENTS:
        raise SendError("email", "to", f"at most {MAX_RECIPIENTS} recipients per email")
    return recipients


def from_dead_letter(fields: Mapping[str, Any]) -> tuple[Email, int]:
    """A dead-letter line's fields (`{"payload": <Email as JSON>}`) as the email again.

    The inverse of the default dead-letter form; not validated again (it was accepted once).
    """
    email = fields["payload"]
    text, html = email.get("text"), email.get("html")
    size = len((text or "").encode("utf-8")) + len((html or "").encode("utf-8"))
    return Email(str(email["subject"]), text, html, tuple(email.get("to") or ())), size
