"""The email destination against a real SMTP server (aiosmtpd) on loopback."""

from __future__ import annotations

import email.utils
import json
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tls_support import self_signed_certificate

from outbound import Runtime, SendError
from outbound.destinations.email.smtp import SmtpSettings
from outbound.embedded import SmtpServer

SENDER = "Outbound <outbound@example.com>"


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture
def mailer(make_runtime: Callable[..., Runtime], smtp: SmtpServer) -> Callable[..., Runtime]:
    """`mailer(**config)` -> a started runtime whose workflow "p_mail" sends `event` as email."""

    def make(**overrides: Any) -> Runtime:
        config = {**smtp.config(email_from=SENDER), **overrides}
        rt = make_runtime(start=False, **config)
        rt.register("p_mail", lambda event, ctx: ctx.send.email(**event))
        return rt.start()

    return make


def send(rt: Runtime, **fields: Any) -> Any:
    """Run one email send; return its delivery record once final."""
    result = rt.run("p_mail", fields, timeout=10)
    assert result.status == "succeeded", result.error
    assert rt.flush(timeout=20)
    [delivery] = rt.deliveries(result.run_id)
    return delivery


def test_headers_of_a_text_email(mailer: Callable[..., Runtime], smtp: SmtpServer) -> None:
    rt = mailer()
    before = time.time()
    delivery = send(rt, subject="Order 42 shipped", text="It is on its way.")

    assert delivery.status == "delivered", delivery.error
    assert delivery.attempts == 1
    assert delivery.detail["smtp_code"] == 250
    assert delivery.detail["recipients"] == ["ops@example.com"]
    [received] = smtp.wait_for(1)
    message = received.message
    assert message["From"] == SENDER
    assert message["To"] == "ops@example.com"
    assert message["Subject"] == "Order 42 shipped"
    assert message["Message-ID"] == delivery.detail["message_id"]
    assert message["Message-ID"].endswith("@example.com>")
    sent_at = email.utils.parsedate_to_datetime(message["Date"]).timestamp()
    assert before - 2 <= sent_at <= time.time() + 1
    assert message.get_content_type() == "text/plain"
    assert received.body("plain").strip() == "It is on its way."
    assert received.mail_from == "outbound@example.com"
    assert received.rcpt_tos == ["ops@example.com"]


def test_html_only(mailer: Callable[..., Runtime], smtp: SmtpServer) -> None:
    rt = mailer()
    assert send(rt, subject="Report", html="<h1>Daily</h1>").status == "delivered"
    [received] = smtp.wait_for(1)
    assert received.message.get_content_type() == "text/html"
    assert received.body("html").strip() == "<h1>Daily</h1>"
    assert received.body("plain") is None


def test_text_and_html_make_multipart_alternative_with_html_preferred(
    mailer: Callable[..., Runtime], smtp: SmtpServer
) -> None:
    rt = mailer()
    send(rt, subject="Both", text="plain words", html="<p>rich words</p>")
    [received] = smtp.wait_for(1)
    message = received.message
    assert message.get_content_type() == "multipart/alternative"
    parts = [part.get_content_type() for part in message.iter_parts()]
    assert parts == ["text/plain", "text/html"]  # the last part is the preferred one
    assert message.get_body().get_content_type() == "text/html"
    assert received.body("plain").strip() == "plain words"
    assert received.body("html").strip() == "<p>rich words</p>"


def test_unicode_subject_body_and_display_names(
    mailer: Callable[..., Runtime], smtp: SmtpServer
) -> None:
    rt = mailer()
    delivery = send(
        rt,
        subject="Größe ✓ — 注文 42",
        text="Grüße aus Köln ☕",
        to=["Zoë Ä <zoe@example.org>", '"Doe, Jane" <jane@example.net>'],
    )
    assert delivery.status == "delivered", delivery.error
    [received] = smtp.wait_for(1)
    assert received.subject == "Größe ✓ — 注文 42"
    assert received.body("plain").strip() == "Grüße aus Köln ☕"
    assert sorted(received.rcpt_tos) == ["jane@example.net", "zoe@example.org"]
    names = {address.display_name for address in received.message["To"].addresses}
    assert names == {"Zoë Ä", "Doe, Jane"}
    assert b"Subject: =?utf-8?" in received.raw  # encoded by the library, not raw UTF-8


def test_one_connection_carries_several_messages(
    mailer: Callable[..., Runtime], smtp: SmtpServer
) -> None:
    rt = mailer()
    futures = [rt.submit("p_mail", {"subject": f"n{i}", "text": "x"}) for i in range(6)]
    for future in futures:
        assert future.result(10).status == "succeeded"
    assert rt.flush(timeout=20)
    received = smtp.wait_for(6)
    assert sorted(message.subject for message in received) == [f"n{i}" for i in range(6)]
    assert smtp.connections == 1
    assert len({message.peer for message in received}) == 1
    assert rt.stats()["destinations"]["email"]["connections"] == 1


def test_reconnects_after_the_server_restarts(
    mailer: Callable[..., Runtime], smtp: SmtpServer
) -> None:
    rt = mailer()
    assert send(rt, subject="before", text="x").status == "delivered"
    smtp.restart()  # same port; the old connection is cut
    delivery = send(rt, subject="after", text="x")
    assert delivery.status == "delivered", delivery.error
    received = smtp.wait_for(2)
    assert [message.subject for message in received] == ["before", "after"]
    assert smtp.connections == 2
    assert received[0].peer != received[1].peer


def test_a_restarted_email_actor_sends_the_queued_mail_on_a_connection_of_its_own(
    mailer: Callable[..., Runtime], smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection is not carried over a crash: the next incarnation opens its own."""
    from outbound.destinations.email.actor import EmailDestination

    deliver = EmailDestination.deliver

    def crash_on_poison(self: EmailDestination, sends: list[Any]) -> None:
        if any(send.payload.subject == "crash" for send in sends):
            raise RuntimeError("injected crash")
        deliver(self, sends)

    monkeypatch.setattr(EmailDestination, "deliver", crash_on_poison)
    rt = mailer()
    assert send(rt, subject="before", text="x").status == "delivered"
    crashed = send(rt, subject="crash", text="x")
    assert crashed.status == "failed" and "injected crash" in crashed.error
    assert send(rt, subject="after", text="x").status == "delivered"
    received = smtp.wait_for(2)
    assert [message.subject for message in received] == ["before", "after"]
    assert smtp.connections == 2
    assert received[0].peer != received[1].peer


def test_delivered_once_a_server_that_was_down_comes_back(
    mailer: Callable[..., Runtime], smtp: SmtpServer
) -> None:
    rt = mailer(email_max_attempts=100, retry_cap=0.05)
    smtp.stop()
    result = rt.run("p_mail", {"subject": "late", "text": "x"})
    time.sleep(0.3)
    [delivery] = rt.deliveries(result.run_id)
    assert delivery.status == "retrying"
    assert "connection failed" in delivery.error
    smtp.start()
    assert rt.flush(timeout=20)
    [delivery] = rt.deliveries(result.run_id)
    assert delivery.status == "delivered", delivery.error
    assert delivery.attempts > 1
    assert [message.subject for message in smtp.wait_for(1)] == ["late"]


def test_a_421_is_retried_then_delivered(mailer: Callable[..., Runtime], smtp: SmtpServer) -> None:
    rt = mailer()
    smtp.fail_next(1, 421)  # "service not available, closing channel"
    delivery = send(rt, subject="retry me", text="x")
    assert delivery.status == "delivered", delivery.error
    assert delivery.attempts == 2
    assert [message.subject for message in smtp.wait_for(1)] == ["retry me"]
    assert rt.stats()["destinations"]["email"]["retries"] == 1


def test_a_4xx_on_a_recipient_is_retried(mailer: Callable[..., Runtime], smtp: SmtpServer) -> None:
    rt = mailer()
    smtp.fail_next(2, 451, command="RCPT", text="Try again later")
    delivery = send(rt, subject="greylisted", text="x")
    assert delivery.status == "delivered", delivery.error
    assert delivery.attempts == 3
    assert len(smtp.wait_for(1)) == 1


def test_transient_failures_give_up_after_max_attempts(
    mailer: Callable[..., Runtime], smtp: SmtpServer
) -> None:
    rt = mailer(email_max_attempts=3)
    smtp.fail_next(10, 421)
    delivery = send(rt, subject="never", text="x")
    assert delivery.status == "failed"
    assert delivery.attempts == 3
    assert "421" in delivery.error and "gave up after 3 attempts" in delivery.error
    assert delivery.detail["smtp_code"] == 421
    assert smtp.messages == []


def test_a_550_is_final_and_the_connection_stays_usable(
    mailer: Callable[..., Runtime], smtp: SmtpServer
) -> None:
    rt = mailer()
    smtp.fail_next(1, 550, text="Mailbox unavailable")
    refused = send(rt, subject="refused", text="x")
    assert refused.status == "failed"
    assert refused.attempts == 1
    assert refused.detail["smtp_code"] == 550
    assert "550 Mailbox unavailable" in refused.error
    assert rt.stats()["destinations"]["email"].get("retries", 0) == 0
    accepted = send(rt, subject="next", text="x")
    assert accepted.status == "delivered", accepted.error
    assert [message.subject for message in smtp.wait_for(1)] == ["next"]
    assert smtp.connections == 1


def test_undelivered_email_is_dead_lettered_on_stop(
    mailer: Callable[..., Runtime], smtp: SmtpServer, data_dir: Any
) -> None:
    rt = mailer(email_max_attempts=1000, retry_cap=0.05)
    smtp.stop()
    rt.run("p_mail", {"subject": "keep me", "text": "body", "to": "a@example.org"})
    report = rt.stop(drain=True, timeout=0.5)
    assert report.per_destination == {"email": 1}
    [path] = (data_dir / "dead-letter").glob("email-*.jsonl")
    [line] = path.read_text(encoding="utf-8").splitlines()
    payload = json.loads(line)["payload"]
    assert payload["subject"] == "keep me" and payload["to"] == ["a@example.org"]


# -- bad input: SendError at the call, nothing queued ----------------------------------


@pytest.fixture
def attempt(make_runtime: Callable[..., Runtime], smtp: SmtpServer) -> Callable[..., str]:
    """`attempt(config=..., **fields)` -> the SendError message a send with `fields` raised."""

    def call(config: dict[str, Any] | None = None, **fields: Any) -> str:
        rt = make_runtime(start=False, **{**smtp.config(email_from=SENDER), **(config or {})})
        caught: list[BaseException] = []

        def workflow(event: Any, ctx: Any) -> None:
            try:
                ctx.send.email(**fields)
            except SendError as error:
                caught.append(error)

        rt.register("p_bad", workflow)
        rt.start()
        result = rt.run("p_bad", None, timeout=10)
        assert result.sends == 0
        assert caught, f"no SendError for {fields}"
        rt.stop()
        return str(caught[0])

    return call


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"subject": "hi\r\nBcc: victim@example.org", "text": "x"},
            "subject: must not contain CR or LF",
        ),
        ({"subject": "hi\nthere", "text": "x"}, "subject: must not contain CR or LF"),
        ({"subject": "hi", "text": "x", "to": "a@example.org\r\nBcc: b@example.org"}, "CR or LF"),
        (
            {"subject": "hi", "text": "x", "to": ["ok@example.org", "x@y.org\nCc: z@y.org"]},
            "CR or LF",
        ),
        ({"subject": "hi", "text": "x", "to": "not-an-address"}, "not a valid email address"),
        ({"subject": "hi", "text": "x", "to": "someone@localhost"}, "not a valid email address"),
        ({"subject": "hi", "text": "x", "to": "a@example.org <b@example.org>"}, "not a valid"),
        ({"subject": "hi", "text": ""}, "give a non-empty text or html body"),
        ({"subject": "hi", "text": "   ", "html": None}, "give a non-empty text or html body"),
        ({"subject": "hi"}, "give a non-empty text or html body"),
        ({"subject": "", "text": "x"}, "subject: must be a non-empty string"),
        ({"subject": "hi", "text": 42}, "text: must be a string"),
        ({"subject": "a\x00b", "text": "x"}, "subject: must not contain control characters"),
        ({"subject": "hi", "text": "a\x00b"}, "text: must not contain NUL"),
        ({"subject": "hi", "html": "\ud800"}, "html: must be valid Unicode"),
        ({"subject": "hi \ud800", "text": "x"}, "subject: must be valid Unicode"),
        ({"subject": "hi", "text": "x \ud800"}, "text: must be valid Unicode"),
        ({"subject": "hi", "text": "x", "to": "J\ud800 <j@example.org>"}, "to: must be valid"),
        ({"subject": "one\u2028two", "text": "x"}, "subject: must not contain line breaks"),
        ({"subject": "one\u2029two", "text": "x"}, "subject: must not contain line breaks"),
        ({"subject": "one\x85two", "text": "x"}, "subject: must not contain line breaks"),
        ({"subject": "hi", "text": "x", "to": "J\u2028D <j@example.org>"}, "line breaks"),
        (
            {"subject": "hi", "text": "x", "to": [f"u{i}@example.org" for i in range(101)]},
            "at most 100",
        ),
        ({"subject": "hi", "text": "x", "to": 42}, "must be an address or a list"),
    ],
)
def test_bad_input_is_refused_at_the_call(
    attempt: Callable[..., str], fields: dict[str, Any], expected: str
) -> None:
    message = attempt(**fields)
    assert message.startswith("ctx.send.email(): ")
    assert expected in message


def test_a_body_over_the_size_limit_is_refused(attempt: Callable[..., str]) -> None:
    message = attempt(config={"max_payload_bytes": 1000}, subject="big", html="é" * 600)
    assert "text/html: is 1200 bytes encoded; the limit is 1000" in message


def test_no_recipient_configured_is_refused(attempt: Callable[..., str]) -> None:
    message = attempt(config={"email_to": None}, subject="hi", text="x")
    assert "no recipient" in message and "OUTBOUND_EMAIL_TO" in message


def test_email_not_configured_names_the_variables(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(start=False)
    caught: list[str] = []

    def workflow(event: Any, ctx: Any) -> None:
        try:
            ctx.send.email(subject="hi", text="x", to="a@example.org")
        except SendError as error:
            caught.append(str(error))

    rt.register("p", workflow)
    rt.start()
    rt.run("p", timeout=10)
    assert caught and "OUTBOUND_SMTP_URL" in caught[0] and "OUTBOUND_EMAIL_FROM" in caught[0]


# -- OUTBOUND_SMTP_URL ----------------------------------------------------------------------


def test_smtp_url_forms() -> None:
    plain = SmtpSettings.from_url("smtp://mail.example.com", SENDER)
    assert (plain.host, plain.port, plain.implicit_tls, plain.starttls) == (
        "mail.example.com",
        25,
        False,
        False,
    )
    tls = SmtpSettings.from_url("smtps://u%40x:p%2Fw@mail.example.com", SENDER)
    assert (tls.port, tls.implicit_tls, tls.username, tls.password) == (465, True, "u@x", "p/w")
    upgraded = SmtpSettings.from_url("smtp://u:p@mail.example.com?starttls=1&timeout=5", SENDER)
    assert (upgraded.port, upgraded.starttls, upgraded.timeout) == (587, True, 5.0)
    assert SmtpSettings.from_url("smtp://127.0.0.1:2525", SENDER).port == 2525
    assert "p/w" not in repr(tls)  # the password stays out of logs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://mail.example.com", "must start with smtp:// or smtps://"),
        ("smtp://", "must name a host"),
        ("smtp://mail.example.com:notaport", "not a valid URL"),
        ("smtp://mail.example.com?starttls=maybe", "starttls='maybe' must be 1 or 0"),
        ("smtps://mail.example.com?starttls=1", "cannot be combined with smtps://"),
        ("smtp://mail.example.com?tls=1", "unknown option(s) tls"),
    ],
)
def test_a_bad_smtp_url_fails_at_construction_naming_the_variable(
    make_runtime: Callable[..., Runtime], url: str, expected: str
) -> None:
    with pytest.raises(ValueError) as caught:
        make_runtime(start=False, smtp_url=url, email_from=SENDER)
    assert str(caught.value).startswith("OUTBOUND_SMTP_URL: ")
    assert expected in str(caught.value)


def test_a_bad_sender_fails_at_construction(make_runtime: Callable[..., Runtime]) -> None:
    with pytest.raises(ValueError, match="OUTBOUND_EMAIL_FROM"):
        make_runtime(start=False, smtp_url="smtp://127.0.0.1:25", email_from="nobody")


def test_the_server_fixture_is_a_real_smtp_server(smtp: SmtpServer) -> None:
    """The embedded server speaks SMTP to the standard library's client too."""
    import smtplib

    with smtplib.SMTP(smtp.host, smtp.port, timeout=5) as client:
        client.sendmail("a@example.org", ["b@example.org"], b"Subject: raw\r\n\r\nhello\r\n")
    [received] = smtp.wait_for(1)
    assert received.subject == "raw"
    assert received.rcpt_tos == ["b@example.org"]


def test_a_payload_not_made_by_send_email_fails_cleanly(
    make_runtime: Callable[..., Runtime], smtp: SmtpServer
) -> None:
    rt = make_runtime(**smtp.config(email_from=SENDER))
    rt.register("p_raw", lambda event, ctx: ctx.send.to("email", "just a string"))
    result = rt.run("p_raw", timeout=10)
    assert rt.flush(timeout=10)
    [delivery] = rt.deliveries(result.run_id)
    assert delivery.status == "failed"
    assert "could not build the message" in delivery.error
    assert rt.health()["status"] == "ok"
    assert smtp.messages == []


def test_logs_in_with_the_credentials_of_the_url(make_runtime: Callable[..., Runtime]) -> None:
    with SmtpServer(credentials=("mailer", "s3cret/:@")) as server:
        assert "s3cret%2F%3A%40" in server.url  # percent-encoded in the URL
        rt = make_runtime(start=False, **server.config(email_from=SENDER))
        rt.register("p_mail", lambda event, ctx: ctx.send.email(**event))
        rt.start()
        assert send(rt, subject="authenticated", text="x").status == "delivered"
        assert [message.subject for message in server.wait_for(1)] == ["authenticated"]
        rt.stop()


def test_wrong_credentials_fail_without_retrying(make_runtime: Callable[..., Runtime]) -> None:
    with SmtpServer(credentials=("mailer", "right")) as server:
        url = server.url.replace(":right@", ":wrong@")
        rt = make_runtime(start=False, smtp_url=url, email_from=SENDER, email_to="a@example.org")
        rt.register("p_mail", lambda event, ctx: ctx.send.email(**event))
        rt.start()
        delivery = send(rt, subject="denied", text="x")
        assert delivery.status == "failed" and delivery.attempts == 1
        assert delivery.detail["smtp_code"] == 535
        assert server.messages == []
        rt.stop()


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["starttls", "smtps"])
def test_tls_forms_of_the_url(
    make_runtime: Callable[..., Runtime],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    implicit_tls: bool,
) -> None:
    pem = self_signed_certificate(tmp_path, "smtp-test")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))  # the client trusts our certificate
    with SmtpServer(
        credentials=("mailer", "pw"), tls_context=server_context, implicit_tls=implicit_tls
    ) as server:
        expected = "smtps://" if implicit_tls else "?starttls=1"
        assert expected in server.url
        rt = make_runtime(start=False, **server.config(email_from=SENDER))
        rt.register("p_mail", lambda event, ctx: ctx.send.email(**event))
        rt.start()
        delivery = send(rt, subject="over TLS", text="secret")
        assert delivery.status == "delivered", delivery.error
        assert [message.subject for message in server.wait_for(1)] == ["over TLS"]
        rt.stop()


def test_refused_emails_leave_the_others_of_the_run_delivered(
    mailer: Callable[..., Runtime], smtp: SmtpServer
) -> None:
    """Subjects with Unicode line breaks used to be accepted, then fail to build."""
    rt = mailer()
    fields: list[str] = []

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.email(subject="Grüße, first", text="one", to="a@example.org")
        for subject in ("bad\u2028subject", "bad\x85subject", "bad \ud800"):
            try:
                ctx.send.email(subject=subject, text="x", to="a@example.org")
            except SendError as error:
                fields.append(error.field)
        ctx.send.email(
            subject="last", text="line\u2028breaks are fine in a body", to="a@example.org"
        )

    rt.register("p_mixed", workflow)
    result = rt.run("p_mixed", None)
    assert fields == ["subject"] * 3 and result.sends == 2
    assert rt.flush(timeout=10)
    assert [r.status for r in rt.deliveries(result.run_id)] == ["delivered"] * 2
    received = smtp.wait_for(2)
    assert sorted(message.subject for message in received) == ["Grüße, first", "last"]
    (last,) = [message for message in received if message.subject == "last"]
    assert last.body().rstrip() == "line\u2028breaks are fine in a body"
