"""The email destination's SMTP side: where the server is, and the messages it is sent.

Owns `SmtpSettings` (parsing `OUTBOUND_SMTP_URL` once, with errors that name
it), `build_message` (the MIME message of an `Email` send, built by the
standard library's `email` package, never by string concatenation) and
`message_id`. Message-ID and Date come from the send itself, so every attempt
of one send is the same message. No I/O but `quit_quietly`. Must not import
the runtime or another destination.
"""

from __future__ import annotations

import datetime
import socket
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import aiosmtplib

from outbound.destinations.delivery import Send
from outbound.destinations.email.send import Email
from outbound.destinations.settings import parse_bool

URL_VARIABLE = "OUTBOUND_SMTP_URL"
DEFAULT_TIMEOUT = 30.0  # seconds for each SMTP command, connect included


@dataclass(frozen=True)
class SmtpSettings:
    """Where and how to reach the SMTP server, and who the mail is from."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    implicit_tls: bool = False  # smtps://
    starttls: bool = False  # ?starttls=1
    timeout: float = DEFAULT_TIMEOUT
    sender: str = ""  # the From header, e.g. "Outbound <noreply@example.com>"
    local_hostname: str = field(default_factory=socket.gethostname)

    @property
    def envelope_sender(self) -> str:
        return parseaddr(self.sender)[1]

    @classmethod
    def from_url(cls, url: str, sender: str) -> SmtpSettings:
        """Parse `smtp://user:pass@host:port`, `smtps://...` or `...?starttls=1&timeout=S`."""

        def bad(rule: str) -> ValueError:
            return ValueError(f"{URL_VARIABLE}: {rule}")

        if not isinstance(url, str) or not url.strip():
            raise bad("is empty; expected smtp://user:pass@host:port")
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as error:
            raise bad(f"is not a valid URL ({error})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("smtp", "smtps"):
            raise bad(f"must start with smtp:// or smtps://, got {parts.scheme or 'no'} scheme")
        if not parts.hostname:
            raise bad("must name a host: smtp://host:port")
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(options) - {"starttls", "timeout"}
        if unknown:
            raise bad(f"unknown option(s) {', '.join(sorted(unknown))} (known: starttls, timeout)")
        starttls = _flag(options.get("starttls", "0"), bad)
        if starttls and scheme == "smtps":
            raise bad("starttls=1 cannot be combined with smtps:// (that is already TLS)")
        try:
            timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
        except ValueError:
            raise bad(f"timeout={options['timeout']!r} is not a number of seconds") from None
        if not 0 < timeout <= 600:
            raise bad("timeout must be seconds in (0, 600]")
        if port is None:
            port = 465 if scheme == "smtps" else 587 if starttls else 25
        _, address = parseaddr(sender or "")
        if not address or "@" not in address or any(ch in sender for ch in "\r\n"):
            raise ValueError(
                f"OUTBOUND_EMAIL_FROM: {sender!r} is not a valid sender address "
                "(e.g. 'Outbound <noreply@example.com>')"
            )
        return cls(
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            implicit_tls=scheme == "smtps",
            starttls=starttls,
            timeout=timeout,
            sender=sender,
        )


def _flag(raw: str, bad: Any) -> bool:
    try:
        return parse_bool(raw)
    except ValueError:
        raise bad(f"starttls={raw!r} must be 1 or 0") from None


def build_message(send: Send, sender: str) -> EmailMessage:
    """The MIME message of one email send: text, html, or both as multipart/alternative.

    Message-ID and Date derive from the send (its delivery id and the time of
    the call), so a retried send is byte-for-byte the same message.
    """
    email: Email = send.payload
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(email.to)
    message["Subject"] = email.subject
    sent_at = datetime.datetime.fromtimestamp(send.accepted_at or time.time(), datetime.UTC)
    message["Date"] = format_datetime(sent_at)
    message["Message-ID"] = message_id(send, sender)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies, please
    text, html = email.text, email.html
    if text and html:
        message.set_content(text)
        message.add_alternative(html, subtype="html")  # last part = preferred
    elif html:
        message.set_content(html, subtype="html")
    else:
        message.set_content(text or "")
    return message


def message_id(send: Send, sender: str) -> str:
    """`<delivery-id@sender-domain>`: unique per send, the same on every attempt."""
    domain = parseaddr(sender)[1].rpartition("@")[2] or "outbound.invalid"
    return f"<{send.id}@{domain}>"


async def quit_quietly(smtp: aiosmtplib.SMTP) -> None:
    if smtp.is_connected:
        try:
            await smtp.quit(timeout=2)
        except aiosmtplib.SMTPException:
            smtp.close()
