"""The email destination: one message per send, over one reused SMTP connection.

Owns `SmtpSettings` (parsing `OUTBOUND_SMTP_URL` once, with errors that name
it), `build_message` (the MIME message, built by the standard library's
`email` package, never by string concatenation) and `EmailDestination` (the
actor). The actor keeps the queue and decides; the asyncio loop only talks
SMTP through aiosmtplib, one message at a time over one connection that is
kept open across messages and reopened when the server drops it. Transient
failures (4xx replies, connection loss, timeouts) are retried with the shared
backoff policy; permanent 5xx replies are final. Message-ID and Date come from
the send itself, so every attempt of one send is the same message.
Must not import `runtime`; validation of the call is in `runtime/send.py`.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import socket
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import aiosmtplib

from outbound.actors import LoopResult
from outbound.destinations.backoff import Backoff
from outbound.destinations.base import Services
from outbound.destinations.delivery import Outgoing
from outbound.destinations.retrying import RetryingDestination

URL_VARIABLE = "OUTBOUND_SMTP_URL"
DEFAULT_TIMEOUT = 30.0  # seconds for each SMTP command, connect included
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


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
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise bad(f"starttls={raw!r} must be 1 or 0")


def build_message(send: Outgoing, sender: str) -> EmailMessage:
    """The MIME message of one email send: text, html, or both as multipart/alternative.

    Message-ID and Date derive from the send (its delivery id and the time of
    the call), so a retried send is byte-for-byte the same message.
    """
    payload: dict[str, Any] = send.payload
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(payload["to"])
    message["Subject"] = payload["subject"]
    sent_at = datetime.datetime.fromtimestamp(send.accepted_at or time.time(), datetime.UTC)
    message["Date"] = format_datetime(sent_at)
    message["Message-ID"] = message_id(send, sender)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies, please
    text, html = payload.get("text"), payload.get("html")
    if text and html:
        message.set_content(text)
        message.add_alternative(html, subtype="html")  # last part = preferred
    elif html:
        message.set_content(html, subtype="html")
    else:
        message.set_content(text or "")
    return message


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one try of sending a message came to."""

    code: int | None  # the SMTP reply code, None when the connection failed
    reply: str
    latency: float
    error: str | None = None
    refused: dict[str, str] = field(default_factory=dict)  # some recipients refused
    retryable: bool = False
    reconnected: bool = False

    @property
    def succeeded(self) -> bool:
        return self.error is None


class EmailDestination(RetryingDestination):
    """Sends email sends one by one over a single, reused SMTP connection."""

    name = "email"

    def __init__(self, services: Services, settings: SmtpSettings) -> None:
        super().__init__(services=services)
        config = services.config
        self.settings = settings
        self.loop = services.asyncio
        self.backoff = Backoff(config.retry_base, config.retry_cap, config.email_max_attempts)

    # Durable state: survives a crash of this actor.
    @property
    def queue(self) -> collections.deque[Outgoing]:
        return self.durable.setdefault("queue", collections.deque())

    def recover(self) -> None:
        self._pump()

    def holds(self) -> set[str]:
        sending = self.durable.get("sending")
        return {send.id for send in self.queue} | ({sending} if sending else set())

    def deliver(self, sends: list[Outgoing]) -> None:
        self.queue.extend(sends)
        self._pump()

    def _pump(self) -> None:
        """Start the next message unless one is on the wire (one connection, one at a time)."""
        queue = self.queue
        while queue and self.durable.get("sending") is None:
            send = queue.popleft()
            if send.final:
                continue
            try:
                message = build_message(send, self.settings.sender)
                recipients = [parseaddr(address)[1] for address in send.payload["to"]]
            except Exception as error:  # a payload not made by ctx.send.email(): final
                self.failed(send, f"could not build the message: {type(error).__name__}: {error}")
                continue
            send.attempts += 1
            self.durable["sending"] = send.id
            self.loop.spawn(self._transmit, message, recipients, reply_to=self.stable_ref, tag=send)

    # -- on the asyncio loop ---------------------------------------------------------

    async def _connect(self) -> aiosmtplib.SMTP:
        settings = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            username=settings.username,
            password=settings.password,
            use_tls=settings.implicit_tls,
            start_tls=settings.starttls,
            timeout=settings.timeout,
            local_hostname=settings.local_hostname,
        )
        await smtp.connect()
        self.durable["smtp"] = smtp
        self.services.ledger.count(self.name, "connections")
        return smtp

    async def _transmit(self, message: EmailMessage, recipients: list[str]) -> Attempt:
        started = time.perf_counter()
        smtp: aiosmtplib.SMTP | None = self.durable.get("smtp")
        reused = smtp is not None and smtp.is_connected
        reconnected = False
        try:
            if smtp is None or not reused:
                smtp = await self._connect()
            try:
                refused, reply = await self._send(smtp, message, recipients)
            except aiosmtplib.SMTPServerDisconnected:
                if not reused:
                    raise
                # The server dropped the connection while it sat idle (restart,
                # idle timeout): open a new one and send once more right away.
                smtp.close()
                smtp = await self._connect()
                reconnected = True
                refused, reply = await self._send(smtp, message, recipients)
        except aiosmtplib.SMTPRecipientsRefused as error:
            codes = [refusal.code for refusal in error.recipients]
            detail = {r.recipient: f"{r.code} {r.message}" for r in error.recipients}
            return Attempt(
                min(codes),
                "; ".join(f"{who}: {why}" for who, why in detail.items()),
                time.perf_counter() - started,
                f"every recipient was refused: {detail}",
                retryable=any(400 <= code < 500 for code in codes),
                reconnected=reconnected,
            )
        except aiosmtplib.SMTPResponseException as error:
            return Attempt(
                error.code,
                error.message,
                time.perf_counter() - started,
                f"SMTP {error.code} {error.message}".strip(),
                retryable=400 <= error.code < 500,
                reconnected=reconnected,
            )
        except aiosmtplib.SMTPTimeoutError as error:  # before OSError: it is a TimeoutError
            self._drop_connection()
            return Attempt(
                None,
                "",
                time.perf_counter() - started,
                f"timed out after {self.settings.timeout:g} s: {error}",
                retryable=True,
                reconnected=reconnected,
            )
        except OSError as error:  # SMTPServerDisconnected, SMTPConnectError, refused, reset
            self._drop_connection()
            return Attempt(
                None,
                "",
                time.perf_counter() - started,
                f"connection failed: {type(error).__name__}: {error}",
                retryable=True,
                reconnected=reconnected,
            )
        except aiosmtplib.SMTPException as error:  # e.g. SMTPUTF8 needed but not offered
            return Attempt(None, "", time.perf_counter() - started, f"{error}", retryable=False)
        return Attempt(
            250,
            reply,
            time.perf_counter() - started,
            refused={who: f"{r.code} {r.message}" for who, r in refused.items()},
            reconnected=reconnected,
        )

    async def _send(
        self, smtp: aiosmtplib.SMTP, message: EmailMessage, recipients: list[str]
    ) -> tuple[dict[str, Any], str]:
        return await smtp.send_message(
            message, sender=self.settings.envelope_sender, recipients=recipients
        )

    def _drop_connection(self) -> None:
        smtp = self.durable.pop("smtp", None)
        if smtp is not None:
            smtp.close()

    # -- back on the actor ---------------------------------------------------------------

    def on_loop_result(self, result: LoopResult) -> None:
        send: Outgoing = result.tag
        if self.durable.get("sending") == send.id:
            self.durable["sending"] = None
        if result.error is not None:  # a bug or cancellation, not an SMTP outcome
            self._drop_connection_soon()
            self.failed(send, result.error)
        elif not send.final:  # (dead-lettered while on the wire: its payload is gone)
            self._settle(send, result.value)
        self._pump()

    def _drop_connection_soon(self) -> None:
        if self.loop.running:
            with contextlib.suppress(RuntimeError):
                self.loop.spawn(self._close_quietly)

    async def _close_quietly(self) -> None:
        self._drop_connection()

    def _settle(self, send: Outgoing, attempt: Attempt) -> None:
        detail: dict[str, Any] = {
            "smtp_code": attempt.code,
            "recipients": list(send.payload["to"]),
            "message_id": message_id(send, self.settings.sender),
            "latency_ms": round(attempt.latency * 1000, 3),
        }
        if attempt.reply:
            detail["smtp_reply"] = attempt.reply
        if attempt.reconnected:
            detail["reconnected"] = True
        if attempt.succeeded:
            if attempt.refused:
                detail["refused"] = attempt.refused
            self.delivered(send, **detail)
            return
        assert attempt.error is not None
        self.attempt_failed(send, attempt.error, retryable=attempt.retryable, **detail)

    def retry(self, send: Outgoing) -> None:
        self.queue.appendleft(send)
        self._pump()

    def on_stop(self) -> None:
        smtp = self.durable.pop("smtp", None)
        if smtp is not None and self.loop.running:
            with contextlib.suppress(Exception):  # the server or the loop is going away
                self.loop.call(_quit, smtp, timeout=5)


def message_id(send: Outgoing, sender: str) -> str:
    """`<delivery-id@sender-domain>`: unique per send, the same on every attempt."""
    domain = parseaddr(sender)[1].rpartition("@")[2] or "outbound.invalid"
    return f"<{send.id}@{domain}>"


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    if smtp.is_connected:
        try:
            await smtp.quit(timeout=2)
        except aiosmtplib.SMTPException:
            smtp.close()
