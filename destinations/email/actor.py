"""The email destination: one message per send, over one reused SMTP connection.

Owns `EmailDestination` (the actor); the SMTP settings and the message are
`smtp.py`'s. The actor keeps the queue and decides; the asyncio loop only talks
SMTP through aiosmtplib, one message at a time over one connection that is
kept open across messages and reopened when the server drops it. Transient
failures (4xx replies, connection loss, timeouts) are retried with the shared
backoff policy; permanent 5xx replies are final. Message-ID and Date come from
the send itself, so every attempt of one send is the same message.
Must not import the runtime or another destination; the call is validated
by `send.py`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any, ClassVar

import aiosmtplib
import pykka

from outbound.actors import LoopResult
from outbound.destinations.backoff import Backoff
from outbound.destinations.base import DurableWork, Services
from outbound.destinations.delivery import Send
from outbound.destinations.email.settings import EmailSettings
from outbound.destinations.email.smtp import SmtpSettings, build_message, message_id, quit_quietly
from outbound.destinations.retrying import RetryingDestination, RetryWork
from outbound.destinations.settings import max_attempts


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


@dataclass
class EmailWork(RetryWork):
    """The email actor's durable work: sends waiting their turn, and the one on the wire."""

    queue: collections.deque[Send] = field(default_factory=collections.deque)
    sending: str | None = None  # delivery id of the message being sent


class EmailDestination(RetryingDestination):
    """Sends email sends one by one over a single, reused SMTP connection."""

    name = "email"
    Work: ClassVar[type[DurableWork]] = EmailWork
    work: EmailWork

    def __init__(self, services: Services, settings: SmtpSettings) -> None:
        super().__init__(services=services)
        config = services.config
        self.settings = settings
        self.loop = services.asyncio
        self.backoff = Backoff(
            config.retry_base,
            config.retry_cap,
            max_attempts(config, config.email_max_attempts),
            retry_for=config.retry_for,
        )
        # The connection is this incarnation's (read and written on the asyncio
        # loop); a crashed one closes it once its message on the wire is answered.
        self._smtp: aiosmtplib.SMTP | None = None
        self._on_wire = False  # a message is being sent (loop side)
        self._retired = False  # this incarnation crashed: close the connection when idle

    @property
    def queue(self) -> collections.deque[Send]:
        """Sends waiting their turn (durable: survives a crash of this actor)."""
        return self.work.queue

    def recover(self) -> None:
        self._pump()

    def holds(self) -> set[str]:
        sending = self.work.sending
        return {send.id for send in self.queue} | ({sending} if sending else set())

    def deliver(self, sends: list[Send]) -> None:
        self.queue.extend(sends)
        self._pump()

    def _pump(self) -> None:
        """Start the next message unless one is on the wire (one connection, one at a time)."""
        queue = self.queue
        while queue and self.work.sending is None:
            send = queue.popleft()
            if send.final:
                continue
            try:
                message = build_message(send, self.settings.sender)
                recipients = [parseaddr(address)[1] for address in send.payload.to]
            except Exception as error:  # a payload not made by ctx.send.email(): final
                self.failed(send, f"could not build the message: {type(error).__name__}: {error}")
                continue
            send.attempts += 1
            self.work.sending = send.id
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
        self._smtp = smtp
        self.services.ledger.count(self.name, "connections")
        return smtp

    async def _transmit(self, message: EmailMessage, recipients: list[str]) -> Attempt:
        started = time.perf_counter()
        self._on_wire = True
        try:
            return await self._attempt(message, recipients, started)
        finally:
            self._on_wire = False
            if self._retired:  # this incarnation crashed meanwhile: the next one reconnects
                self._drop_connection()

    async def _attempt(
        self, message: EmailMessage, recipients: list[str], started: float
    ) -> Attempt:
        smtp = self._smtp
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
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    # -- back on the actor ---------------------------------------------------------------

    def on_loop_result(self, result: LoopResult) -> None:
        send: Send = result.tag
        if self.work.sending == send.id:
            self.work.sending = None
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
        if not (self._retired and self._on_wire):  # else `_transmit` closes it when answered
            self._drop_connection()

    def _settle(self, send: Send, attempt: Attempt) -> None:
        detail: dict[str, Any] = {
            "smtp_code": attempt.code,
            "recipients": list(send.payload.to),
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

    def retry(self, send: Send) -> None:
        self.queue.appendleft(send)
        self._pump()

    def on_crash(self, error: BaseException | None) -> None:
        # Close this incarnation's connection, on the loop: at once if it is idle,
        # else once the message on the wire is answered (`_transmit`; its result
        # reaches the next incarnation).
        self._retired = True
        self._drop_connection_soon()
        super().on_crash(error)

    def on_stop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None and self.loop.running:
            with contextlib.suppress(Exception):  # the server or the loop is going away
                self.loop.call(quit_quietly, smtp, timeout=5)


def starter(config: EmailSettings, **parts: Any) -> Callable[[Services], pykka.ActorRef[Any]]:
    """What starts the email actor. Parses OUTBOUND_SMTP_URL now, so a malformed one
    fails when the runtime is made, naming itself."""
    smtp = SmtpSettings.from_url(config.smtp_url or "", config.email_from or "")
    return functools.partial(EmailDestination.start, settings=smtp)
