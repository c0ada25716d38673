"""The email destination's settings (`OUTBOUND_SMTP_URL`, `OUTBOUND_EMAIL_*`).

Owns these fields only; the runtime's `Config` composes them and reads the
environment. The SMTP URL is parsed by `smtp.py` (`SmtpSettings.from_url`)
when the destination is enabled. Must not import the runtime or another
destination.
"""

from __future__ import annotations

from dataclasses import dataclass

from outbound.destinations.settings import Settings, setting

#: What a send by email says when email is not enabled.
HOW_TO_ENABLE = "set OUTBOUND_SMTP_URL and OUTBOUND_EMAIL_FROM to enable email"


@dataclass(frozen=True)
class EmailSettings(Settings):
    """How the email destination reaches SMTP: enabled when `smtp_url` and `email_from` are set."""

    smtp_url: str | None = setting(
        "OUTBOUND_SMTP_URL", None, "smtp://user:pass@host:port (smtps:// or ?starttls=1)"
    )
    email_from: str | None = setting("OUTBOUND_EMAIL_FROM", None, "sender address")
    email_to: str | None = setting("OUTBOUND_EMAIL_TO", None, "default recipient address")
    email_max_attempts: int | None = setting(
        "OUTBOUND_EMAIL_MAX_ATTEMPTS",
        None,
        "attempts per email send, first included (1 = no retry); unset: 5, or with the "
        "journal on enough to retry for OUTBOUND_RETRY_FOR at the OUTBOUND_RETRY_CAP",
        rule="at least 1",
    )


def is_enabled(settings: EmailSettings) -> bool:
    """Whether the runtime starts this destination."""
    return bool(settings.smtp_url and settings.email_from)
