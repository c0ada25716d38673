"""Signed HTTP requests (Standard Webhooks), checked by an independent verifier.

Requests go to a real HTTP server on 127.0.0.1 and are verified with the
`standardwebhooks` package, as a receiver would: with the configured
secrets (and either of two while rotating), a per-send secret, and a body
changed on the way. Secrets must not show in reprs, records, dead letters or logs.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from outbound import Config, Runtime, SendError, __version__
from outbound.destinations.delivery import new_send
from outbound.destinations.http.headers import attempt_headers
from outbound.destinations.http.send import HttpRequest
from outbound.destinations.http.signing import SigningKeys
from outbound.embedded import ReceivedRequest, SinkResponse
from outbound.journal.codec import decode_sends, encode_sends


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def run_and_flush(rt: Runtime, fn: Any, event: Any = None) -> Any:
    rt.register("p_signed", fn)
    result = rt.run("p_signed", event)
    assert result.status == "succeeded", result.error
    assert rt.flush(timeout=20)
    return rt.deliveries(result.run_id)


def verify(secret: str, request: ReceivedRequest, body: bytes | None = None) -> Any:
    return Webhook(secret).verify(request.body if body is None else body, request.headers)


def test_signed_request_verifies_and_names_the_delivery(make_runtime: Any, sink: Any) -> None:
    secret = new_secret()
    rt = make_runtime(http_signing_secrets=secret)

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url + "/hook", data={"order": event["id"]}, sign=True)
        ctx.send.http(sink.url + "/plain", data={"order": event["id"]})

    records = run_and_flush(rt, workflow, {"id": 7})
    by_path = {request.path: request for request in sink.wait_for(2)}
    signed, plain = by_path["/hook"], by_path["/plain"]
    assert verify(secret, signed) == {"order": 7}
    assert signed.headers["webhook-id"] == signed.headers["idempotency-key"] == records[0].id
    assert signed.headers["webhook-signature"].startswith("v1,")
    assert " " not in signed.headers["webhook-signature"]  # one secret, one signature
    assert "webhook-signature" not in plain.headers
    for request in (signed, plain):
        assert request.headers["user-agent"] == f"outbound/{__version__}"
    with pytest.raises(WebhookVerificationError):
        verify(secret, signed, body=b'{"order": 8}')  # a body changed on the way
    with pytest.raises(WebhookVerificationError):
        verify(new_secret(), signed)  # another secret


def test_rotation_signs_with_every_active_secret(make_runtime: Any, sink: Any) -> None:
    old, new = new_secret(), new_secret()
    rt = make_runtime(http_signing_secrets=f"{old}, {new}")

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url, data={"id": 1}, sign=True)

    run_and_flush(rt, workflow)
    (request,) = sink.wait_for(1)
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert verify(old, request) == {"id": 1}  # a receiver that still has the old one
    assert verify(new, request) == {"id": 1}  # ... or already the new one
    with pytest.raises(WebhookVerificationError):
        verify(old, request, body=b'{"id": 2}')


def test_each_attempt_is_signed_when_it_is_made(make_runtime: Any, make_sink: Any) -> None:
    answers = iter([SinkResponse(status=503), SinkResponse(status=200)])
    sink = make_sink(lambda _request: next(answers))
    secret = new_secret()
    rt = make_runtime(http_signing_secrets=secret)

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url, data={"id": 1}, sign=True)

    (record,) = run_and_flush(rt, workflow)
    assert record.status == "delivered" and record.attempts == 2
    first, second = sink.wait_for(2)
    for request in (first, second):
        assert verify(secret, request) == {"id": 1}
        assert request.headers["webhook-id"] == record.id


def test_a_per_send_secret_signs_instead_of_the_configured_ones(
    make_runtime: Any, sink: Any
) -> None:
    configured, own = new_secret(), new_secret()
    rt = make_runtime(http_signing_secrets=configured)

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url, data={"id": 1}, signing_secret=own)

    run_and_flush(rt, workflow)
    (request,) = sink.wait_for(1)
    assert verify(own, request) == {"id": 1}
    with pytest.raises(WebhookVerificationError):
        verify(configured, request)


def test_a_per_send_secret_needs_no_configured_one(make_runtime: Any, sink: Any) -> None:
    own = new_secret()
    rt = make_runtime()

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url, data={"id": 1}, sign=True, signing_secret=own)

    run_and_flush(rt, workflow)
    assert verify(own, sink.wait_for(1)[0]) == {"id": 1}


def test_bad_configured_secrets_fail_when_the_config_is_made() -> None:
    good = new_secret()
    for value in ("nope", "whsec_", "whsec_not base64!", f"{good},whsec_%%%"):
        with pytest.raises(ValueError, match="OUTBOUND_HTTP_SIGNING_SECRETS") as caught:
            Config.from_env({"OUTBOUND_HTTP_SIGNING_SECRETS": value})
        assert good not in str(caught.value)
    with pytest.raises(ValueError, match=r"secret 2 of 2"):
        Config(http_signing_secrets=f"{good},{good[:-4]}!!!!")
    keys = Config.from_env({"OUTBOUND_HTTP_SIGNING_SECRETS": f" {good} "}).http_signing_secrets
    assert isinstance(keys, SigningKeys) and len(keys.keys) == 1


def test_bad_signing_arguments_are_refused_at_the_call(make_runtime: Any, sink: Any) -> None:
    rt = make_runtime()
    secret = new_secret()
    errors: dict[str, Exception | None] = {}

    def workflow(event: Any, ctx: Any) -> None:
        calls = {
            "unconfigured": lambda: ctx.send.http(sink.url, data={}, sign=True),
            "bad_secret": lambda: ctx.send.http(sink.url, data={}, signing_secret="whsec_!!"),
            "not_text": lambda: ctx.send.http(sink.url, data={}, signing_secret=b"whsec_AA=="),
            "not_bool": lambda: ctx.send.http(sink.url, data={}, sign="yes"),
            "header": lambda: ctx.send.http(
                sink.url, data={}, signing_secret=secret, headers={"Webhook-Signature": "x"}
            ),
        }
        for name, call in calls.items():
            try:
                call()
                errors[name] = None
            except Exception as error:  # noqa: BLE001 - checked below, outside the run
                errors[name] = error

    records = run_and_flush(rt, workflow)
    assert records == []  # nothing was queued
    fields = {name: getattr(error, "field", error) for name, error in errors.items()}
    assert fields == {
        "unconfigured": "sign",
        "bad_secret": "signing_secret",
        "not_text": "signing_secret",
        "not_bool": "sign",
        "header": "headers['Webhook-Signature']",
    }
    assert all(isinstance(error, SendError) for error in errors.values())
    assert "OUTBOUND_HTTP_SIGNING_SECRETS" in str(errors["unconfigured"])
    assert "whsec_" in str(errors["bad_secret"]) and "!!" not in str(errors["bad_secret"])


def test_secrets_stay_out_of_reprs_records_dead_letters_and_logs(
    make_runtime: Any, make_sink: Any, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = make_sink(lambda _request: SinkResponse(status=400))  # fails for good at once
    configured, own = new_secret(), new_secret()
    rt = make_runtime(http_signing_secrets=configured)
    hidden = [configured, own, configured[6:], own[6:]]  # with and without the prefix

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url, data={"id": 1}, sign=True)
        ctx.send.http(sink.url, data={"id": 2}, signing_secret=own)

    with caplog.at_level(logging.DEBUG):
        records = run_and_flush(rt, workflow)
    assert [record.status for record in records] == ["failed", "failed"]
    lines = [
        json.loads(line)
        for path in (data_dir / "dead-letter").glob("http-*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert len(lines) == 2
    seen = [
        repr(rt.config),
        json.dumps([record.as_dict() for record in records]),
        json.dumps(lines),
        caplog.text,
    ]
    for text in seen:
        for secret in hidden:
            assert secret not in text
    by_id = {line["delivery_id"]: line["payload"] for line in lines}
    configured_line, own_line = by_id[records[0].id], by_id[records[1].id]
    assert configured_line["sign"] and own_line["sign"]
    assert configured_line["signing_keys"] is None  # signed by whoever makes the attempt
    own_keys = own_line["signing_keys"]
    assert own_keys["fingerprints"][0].startswith("whsec_sha256:")  # named, not revealed


def test_the_journal_keeps_a_send_signed_and_traced() -> None:
    """The journal's codec brings a send back with its own secret and its trace (a crash,
    or another node taking it over), and the send still signs verifiably."""
    own = new_secret()
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    request = HttpRequest(
        "POST",
        "http://127.0.0.1:9/hook",
        body=b'{"id": 1}',
        sign=True,
        signing_keys=SigningKeys.from_text(own, "signing_secret"),
        traceparent=traceparent,
    )
    send = new_send("http", "delivery-1", "run-1", "p_journal", 0.0, request, 9, 0)
    (recovered,) = decode_sends(encode_sends([send]))
    assert recovered.payload.signing_keys.keys == request.signing_keys.keys
    assert recovered.payload.traceparent == traceparent
    headers = attempt_headers(recovered, None)
    assert headers["traceparent"] == traceparent
    assert Webhook(own).verify(request.body, headers) == {"id": 1}
    assert own[6:] not in repr(recovered.payload)


def test_replayed_dead_letters_are_signed_by_the_replaying_process(
    make_runtime: Any, make_sink: Any
) -> None:
    """A send signed with the configured secrets is replayed signed (with today's secrets);
    one signed with its own secret cannot be, from a file that keeps only its fingerprint."""
    broken = {"now": True}
    sink = make_sink(lambda _request: SinkResponse(status=400 if broken["now"] else 200))
    configured, own = new_secret(), new_secret()
    rt = make_runtime(http_signing_secrets=configured)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url + "/configured", data={"id": 1}, sign=True)
        ctx.send.http(sink.url + "/own", data={"id": 2}, signing_secret=own)
        ctx.send.http(sink.url + "/plain", data={"id": 3})

    # Run in a trace (no SDK: its traceparent is kept with each send, and its dead letter).
    token = context.attach(TraceContextTextMapPropagator().extract({"traceparent": traceparent}))
    try:
        records = run_and_flush(rt, workflow)
    finally:
        context.detach(token)
    assert [record.status for record in records] == ["failed"] * 3
    broken["now"] = False
    report = rt.replay_dead_letters()
    assert rt.flush(timeout=20)
    http = report.settled().destinations["http"]
    assert (http.found, http.replayed, http.unreadable, http.delivered) == (3, 2, 1, 2)
    replayed = {request.path: request for request in sink.requests[3:]}
    assert sorted(replayed) == ["/configured", "/plain"]
    assert verify(configured, replayed["/configured"]) == {"id": 1}
    assert replayed["/configured"].headers["webhook-id"] == records[0].id
    assert "webhook-signature" not in replayed["/plain"].headers
    for request in replayed.values():
        assert request.headers["traceparent"] == traceparent
