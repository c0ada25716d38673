"""Bad input to every send kind: a SendError at the call naming the field and the rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from outbound import Config, SendError
from outbound.destinations.base import Destination
from outbound.destinations.s3.send import S3Line
from outbound.destinations.sse.send import SseEvent
from outbound.send import RunInfo, SendCollector


def collector(available: set[str] | None = None, **config: Any) -> SendCollector:
    names = available if available is not None else {"http", "email", "s3", "sql", "sse", "emit"}
    return SendCollector(
        RunInfo("run-1", "p_test"), Config(email_to="ops@example.com", **config), names.__contains__
    )


def rejects(call: Any, field: str, rule_part: str) -> SendError:
    with pytest.raises(SendError) as caught:
        call()
    error = caught.value
    assert error.field == field, str(error)
    assert rule_part in error.rule, str(error)
    assert field in str(error) and isinstance(error, ValueError)
    return error


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("ftp://example.com/x", "http or https"),
        ("example.com/path", "http or https"),
        ("http:///no-host", "must name a host"),
        ("http://exa mple.com/", "spaces"),
        ("http://example.com:99999/", "not a valid URL"),
        ("", "non-empty"),
        (None, "non-empty"),
    ],
)
def test_http_url_rules(url: Any, rule: str) -> None:
    rejects(lambda: collector().http(url), "url", rule)


def test_http_field_rules() -> None:
    send = collector()
    url = "http://127.0.0.1:9/x"
    rejects(lambda: send.http(url, method="FETCH"), "method", "must be one of")
    rejects(lambda: send.http(url, data={"when": object()}), "data", "JSON-serializable")
    rejects(lambda: send.http(url, data={"x": float("nan")}), "data", "JSON-serializable")
    rejects(lambda: send.http(url, headers={"X-A": 1}), "headers", "str -> str")
    rejects(lambda: send.http(url, headers=["X-A"]), "headers", "dict")
    rejects(lambda: send.http(url, headers={"X-A": "a\r\nX-Evil: 1"}), "headers['X-A']", "CR, LF")
    rejects(lambda: send.http(url, headers={"Bad Name": "v"}), "headers['Bad Name']", "header name")
    rejects(lambda: send.http(url, params={"q": object()}), "params['q']", "str, number")
    rejects(lambda: send.http(url, auth=("only-user",)), "auth", "(username, password)")
    rejects(lambda: send.http(url, auth={"user": "u"}), "auth", "username")
    rejects(lambda: send.http(url, timeout=0), "timeout", "seconds")
    rejects(lambda: send.http(url, timeout=float("inf")), "timeout", "seconds")


def test_payload_size_limit_is_configurable() -> None:
    send = collector(max_payload_bytes=1000)
    send.http("http://127.0.0.1:9/", data="x" * 1000)
    error = rejects(
        lambda: send.http("http://127.0.0.1:9/", data="x" * 1001), "data", "the limit is 1000"
    )
    assert "1001 bytes" in error.rule
    assert len(send.outbox) == 1  # the accepted send is kept, the rejected one is not


def test_a_caught_send_error_queues_nothing() -> None:
    send = collector()
    send.http("http://127.0.0.1:9/ok", data={"a": 1})
    with pytest.raises(SendError):
        send.http("http://127.0.0.1:9/bad", data={1, 2})
    assert [item.payload.url for item in send.outbox] == ["http://127.0.0.1:9/ok"]


def test_json_data_gets_a_content_type_and_strings_pass_through() -> None:
    send = collector()
    send.http("http://127.0.0.1:9/", data={"a": "é"})
    send.http("http://127.0.0.1:9/", data="raw", headers={"Content-Type": "text/plain"})
    send.http("http://127.0.0.1:9/", data=b"\x00\x01", method="put")
    json_request, text_request, bytes_request = (item.payload for item in send.outbox)
    assert json_request.body == '{"a":"é"}'.encode()
    assert json_request.headers["Content-Type"] == "application/json"
    assert text_request.headers == {"Content-Type": "text/plain"} and text_request.body == b"raw"
    assert bytes_request.method == "PUT" and bytes_request.body == b"\x00\x01"


def test_auth_accepts_a_tuple_or_a_username_password_dict() -> None:
    send = collector()
    send.http("http://127.0.0.1:9/", auth={"username": "u", "password": "p"})
    send.http("http://127.0.0.1:9/", auth=("u", "p"))
    assert [item.payload.auth for item in send.outbox] == [("u", "p"), ("u", "p")]


@pytest.mark.parametrize(
    ("bucket", "rule"),
    [
        ("ab", "3-63 characters"),
        ("Upper-Case", "3-63 characters"),
        ("-starts-with-dash", "starting and ending"),
        ("a" * 64, "3-63 characters"),
        ("two..dots", "adjacent periods"),
        ("192.168.1.1", "IP address"),
        ("xn--bucket", "reserved"),
        ("bucket-s3alias", "reserved"),
        ("under_score", "3-63 characters"),
    ],
)
def test_s3_bucket_naming_rules(bucket: str, rule: str) -> None:
    rejects(lambda: collector().s3(bucket=bucket, prefix="p/", payload={}), "bucket", rule)


@pytest.mark.parametrize(
    ("prefix", "rule"),
    [
        ("../escape", "'..'"),
        ("a/../b", "'..'"),
        ("/leading", "start with '/'"),
        ("tab\there", "control characters"),
        ("x" * 513, "512 bytes"),
        (None, "must be a string"),
    ],
)
def test_s3_prefix_rules(prefix: Any, rule: str) -> None:
    rejects(lambda: collector().s3(bucket="events", prefix=prefix, payload={}), "prefix", rule)


def test_s3_payload_rules() -> None:
    send = collector(max_payload_bytes=100)
    rejects(lambda: send.s3(bucket="events", prefix="", payload={"x": object()}), "payload", "JSON")
    rejects(lambda: send.s3(bucket="events", prefix="", payload="x" * 200), "payload", "limit")
    send.s3(bucket="my.events-1", prefix="", payload=[1, "two"])
    assert send.outbox[0].payload == S3Line(bucket="my.events-1", prefix="", line=b'[1,"two"]')


@pytest.mark.parametrize("table", ["_hidden", "has-dash", "has space", "", "t" * 64, "ünï"])
def test_sql_table_rules(table: str) -> None:
    rejects(lambda: collector().sql(table=table, payload={"a": 1}), "table", "")


def test_sql_payload_and_key_rules() -> None:
    send = collector()
    rejects(lambda: send.sql(table="t", payload=[1, 2]), "payload", "JSON object")
    rejects(lambda: send.sql(table="t", payload={"": 1}), "payload", "non-empty")
    rejects(
        lambda: send.sql(table="t", payload={"_event_id": 1}), "payload['_event_id']", "reserved"
    )
    rejects(
        lambda: send.sql(table="t", payload={"k" * 64: 1}), f"payload['{'k' * 64}']", "63 bytes"
    )
    send.sql(table="Orders_2024", payload={'a"; drop table x; --': 1, "naïve key": True})
    assert send.outbox[0].payload.table == "orders_2024"


@pytest.mark.parametrize(
    ("table", "payload", "field", "rule_part"),
    [
        # Names Postgres would take for something else, or change when lowercasing.
        ("pg_class", {"a": 1}, "table", "pg_"),
        ("PG_Events", {"a": 1}, "table", "pg_"),
        ("\u0130" * 31, {"a": 1}, "table", "ASCII"),  # 62 bytes, 93 once lowercased
        ("\u212aelvin", {"a": 1}, "table", "ASCII"),  # the Kelvin sign folds to "k"
        ("\u017ftate", {"a": 1}, "table", "ASCII"),  # long s folds to "s"
        ("t\ud800", {"a": 1}, "table", "ASCII"),  # a lone surrogate
        ("t", {"xmin": 1}, "payload['xmin']", "system column"),
        ("t", {"ctid": "x"}, "payload['ctid']", "system column"),
        ("t", {"tableoid": 1}, "payload['tableoid']", "system column"),
        ("t", {"cmax": None}, "payload['cmax']", "system column"),
        # Text that cannot be encoded: refused here, not by UnicodeEncodeError later.
        ("t", {"\ud800": 1}, "payload['\\ud800']", "lone surrogates"),
        ("t", {"a": "x\udfff"}, "payload['a']", "not valid Unicode"),
        ("t", {"a": {"deep": ["\ud800"]}}, "payload['a']", "surrogates not allowed"),
        ("t", {"a": {"\ud800": 1}}, "payload['a']", "surrogates not allowed"),
        # More keys than a table can have columns.
        ("t", {f"k{i}": 1 for i in range(1599)}, "payload", "1600 columns"),
        # An integer Python cannot print as JSON (more than 4300 digits).
        ("t", {"n": 10**5000}, "payload['n']", "4300"),
    ],
)
def test_sql_names_postgres_cannot_take_and_text_that_cannot_be_encoded(
    table: str, payload: dict[str, Any], field: str, rule_part: str
) -> None:
    send = collector()
    rejects(lambda: send.sql(table=table, payload=payload), field, rule_part)
    assert send.outbox == []


def test_sql_names_that_only_look_odd_are_accepted() -> None:
    send = collector()
    send.sql(table="pgx_events", payload={"oid": 1, "XMIN": 2, "\u212a": 3, "\u0130" * 31: 4})
    send.sql(table="select", payload={"user": 1, "n": 2**64})
    send.sql(table="wide", payload={f"k{i}": 1 for i in range(1598)})
    assert [s.payload.table for s in send.outbox] == ["pgx_events", "select", "wide"]


def test_sse_rules() -> None:
    send = collector()
    rejects(lambda: send.sse(channel="", payload={}), "channel", "non-empty")
    rejects(lambda: send.sse(channel="a\nevent: x", payload={}), "channel", "control characters")
    rejects(lambda: send.sse(channel="c", payload={"x": {1}}), "payload", "JSON")


def test_emit_rules() -> None:
    send = collector()
    rejects(lambda: send.emit(raw_event=[1]), "raw_event", "JSON object")
    rejects(lambda: send.emit(raw_event={"x": object()}), "raw_event", "JSON")


def test_email_rules() -> None:
    send = collector()
    rejects(lambda: send.email(subject="Hi\r\nBcc: x@evil.com", text="t"), "subject", "CR or LF")
    rejects(lambda: send.email(subject="", text="t"), "subject", "non-empty")
    rejects(lambda: send.email(subject="s"), "text", "non-empty text or html")
    rejects(lambda: send.email(subject="s", text="  "), "text", "non-empty text or html")
    rejects(lambda: send.email(subject="s", text="t", to="not-an-address"), "to", "valid email")
    rejects(lambda: send.email(subject="s", text="t", to="a@b.com\r\nBcc: c@d.com"), "to", "CR")
    no_default = SendCollector(RunInfo("r", "w"), Config(), lambda _name: True)
    rejects(lambda: no_default.email(subject="s", text="t"), "to", "OUTBOUND_EMAIL_TO")


@pytest.mark.parametrize(
    ("kind", "call", "variable"),
    [
        ("s3", lambda s: s.s3(bucket="events", prefix="", payload={}), "OUTBOUND_S3_ENDPOINT"),
        ("sql", lambda s: s.sql(table="t", payload={}), "OUTBOUND_DATABASE_URL"),
        ("email", lambda s: s.email(subject="s", text="t"), "OUTBOUND_SMTP_URL"),
    ],
)
def test_unconfigured_destination_names_the_variable(kind: str, call: Any, variable: str) -> None:
    send = collector(available={"http"})
    error = rejects(lambda: call(send), "destination", variable)
    assert f"ctx.send.{kind}()" in str(error)
    assert send.outbox == []


def test_unknown_custom_destination() -> None:
    rejects(lambda: collector().to("nowhere", {}), "destination", "rt.add_destination")


# -- text that cannot be encoded, and input a server or client would refuse later ------------

SURROGATE = "\ud800"  # a lone surrogate: a str Python holds, but no UTF-8 encoder takes


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.http("http://127.0.0.1:9/" + SURROGATE), "url"),
        (lambda s: s.http("http://127.0.0.1:9/", data="body " + SURROGATE), "data"),
        (lambda s: s.http("http://127.0.0.1:9/", data={"k": ["v", SURROGATE]}), "data"),
        (lambda s: s.http("http://127.0.0.1:9/", data={"k" + SURROGATE: 1}), "data"),
        (lambda s: s.http("http://127.0.0.1:9/", headers={"X-A": SURROGATE}), "headers['X-A']"),
        (lambda s: s.http("http://127.0.0.1:9/", params={"q": SURROGATE}), "params['q']"),
        (lambda s: s.http("http://127.0.0.1:9/", params={"q": ["a", SURROGATE]}), "params['q']"),
        (lambda s: s.http("http://127.0.0.1:9/", params={SURROGATE: "v"}), "params"),
        (lambda s: s.http("http://127.0.0.1:9/", auth=("u" + SURROGATE, "p")), "auth"),
        (lambda s: s.http("http://127.0.0.1:9/", auth=("u", SURROGATE)), "auth"),
        (lambda s: s.email(subject="s" + SURROGATE, text="t"), "subject"),
        (lambda s: s.email(subject="s", text="t" + SURROGATE), "text"),
        (lambda s: s.email(subject="s", html="<p>" + SURROGATE), "html"),
        (lambda s: s.email(subject="s", text="t", to=f"N{SURROGATE} <a@example.org>"), "to"),
        (lambda s: s.email(subject="s", text="t", to=f"a{SURROGATE}@example.org"), "to"),
        (lambda s: s.s3(bucket="events", prefix="p" + SURROGATE, payload={}), "prefix"),
        (lambda s: s.s3(bucket="ev" + SURROGATE + "ts", prefix="", payload={}), "bucket"),
        (lambda s: s.s3(bucket="events", prefix="", payload={"k": SURROGATE}), "payload"),
        (lambda s: s.sse(channel="c" + SURROGATE, payload={}), "channel"),
        (lambda s: s.sse(channel="c", payload=[SURROGATE]), "payload"),
        (lambda s: s.emit(raw_event={"k": SURROGATE}), "raw_event"),
        (lambda s: s.emit(raw_event={SURROGATE: 1}), "raw_event"),
        (lambda s: s.to("memory", SURROGATE), "payload"),
        (lambda s: s.to("memory", {"nested": [{"deep": ("x", SURROGATE)}]}), "payload"),
        (lambda s: s.to("memory", {SURROGATE: 1}), "payload"),
        (lambda s: s.to("memory", {"set": frozenset({SURROGATE})}), "payload"),
        (lambda s: s.to("memory", Box(inner=[SURROGATE])), "payload"),
    ],
)
def test_lone_surrogates_are_refused_at_the_call_naming_the_field(call: Any, field: str) -> None:
    send = collector(available={"http", "email", "s3", "sse", "emit", "memory"})
    send.sse(channel="before", payload={"kept": True})
    error = rejects(lambda: call(send), field, "")
    if field != "bucket":  # the bucket rule is S3's naming rule, which surrogates break
        assert "valid Unicode" in error.rule or "Latin-1" in error.rule, str(error)
    assert [item.payload for item in send.outbox] == [SseEvent("before", b'{"kept":true}')]


@dataclass
class Box:
    inner: list[Any]


def test_custom_payloads_of_any_shape_are_still_accepted() -> None:
    send = collector(available={"memory"})
    cyclic: list[Any] = ["é"]
    cyclic.append(cyclic)  # walked once, not forever
    payloads = [7, None, b"\xff", "naïve", cyclic, Box(inner=[{"ü": 1}]), object()]
    for payload in payloads:
        send.to("memory", payload)
    assert [item.payload for item in send.outbox] == payloads


def test_http_header_values_go_out_as_a_server_reads_them() -> None:
    send = collector()
    url = "http://127.0.0.1:9/"
    send.http(url, headers={"X-Latin": "café", "X-Padded": " \tv a l\t ", "X-Empty": ""})
    send.http(url, headers={"idempotency-key": "mine"})
    send.http(url, headers={"Host": "example.org"})  # virtual hosting: the user's Host is sent
    latin, idempotent, host = (item.payload.headers for item in send.outbox)
    assert latin == {"X-Latin": "café".encode("latin-1"), "X-Padded": "v a l", "X-Empty": ""}
    assert idempotent == {"Idempotency-Key": "mine"}  # replaces the delivery id, not beside it
    assert host == {"Host": "example.org"}


@pytest.mark.parametrize(
    ("headers", "field", "rule"),
    [
        ({"X-A": "€"}, "headers['X-A']", "Latin-1"),
        ({"X-A": "a\x01b"}, "headers['X-A']", "control characters"),
        ({"X-A": "a\x7fb"}, "headers['X-A']", "control characters"),
        ({"X-A": "a\x00b"}, "headers['X-A']", "NUL"),
        ({"X-A": "a\nb"}, "headers['X-A']", "LF"),
        ({"X-A\n": "v"}, "headers['X-A\\n']", "header name"),
        ({"Content-Length": "5"}, "headers['Content-Length']", "set by the HTTP client"),
        ({"content-length": "5"}, "headers['content-length']", "set by the HTTP client"),
        ({"Transfer-Encoding": "chunked"}, "headers['Transfer-Encoding']", "do not set it"),
    ],
)
def test_http_header_rules(headers: dict[str, str], field: str, rule: str) -> None:
    rejects(lambda: collector().http("http://127.0.0.1:9/", data="x", headers=headers), field, rule)


def test_http_url_length_counts_the_encoded_params() -> None:
    send = collector()
    base = "http://127.0.0.1:9/"
    send.http(base + "a" * (65536 - len(base)))  # exactly the limit
    rejects(lambda: send.http(base + "a" * (65537 - len(base))), "url", "at most 65536")
    send.http(base, params={"q": "a" * 60000})
    rejects(lambda: send.http(base, params={"q": "a" * 65536}), "params", "65536")
    rejects(lambda: send.http(base, params={"q": "é" * 11000}), "params", "once encoded")
    assert len(send.outbox) == 2


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("http://" + "a" * 64 + ".example.com/", "1-63 characters"),
        ("http://a..b/", "1-63 characters"),
        ("http://1.2.3.999/", "not a valid IPv4 address"),
        ("http://\u2603.example/", "not a valid URL"),  # not a valid IDNA host name
        ("http://127.0.0.1:9/" + "x" * 70000, "at most 65536"),
    ],
)
def test_http_urls_the_client_could_not_send_are_refused(url: str, rule: str) -> None:
    rejects(lambda: collector().http(url), "url", rule)


def test_http_params_are_kept_as_the_text_that_is_sent() -> None:
    send = collector()
    send.http("http://bücher.example/straße", params={"b": True, "n": [1, 2.5], "s": "ü"})
    request = send.outbox[0].payload
    assert request.params == {"b": "true", "n": ["1", "2.5"], "s": "ü"}
    rejects(lambda: send.http("http://127.0.0.1:9/", params={"n": 10**5000}), "params['n']", "")


def test_http_auth_rules() -> None:
    send = collector()
    url = "http://127.0.0.1:9/"
    rejects(lambda: send.http(url, auth=("us:er", "p")), "auth", "':'")
    rejects(lambda: send.http(url, auth=("user", "p\r\n")), "auth", "control characters")
    send.http(url, auth=("üser", "pa:ss"))  # UTF-8 (RFC 7617); ':' is fine in the password
    assert send.outbox[0].payload.auth == ("üser", "pa:ss")


@pytest.mark.parametrize("breaker", ["\u2028", "\u2029", "\x85", "\x9f"])
def test_email_header_text_with_unicode_line_breaks_is_refused(breaker: str) -> None:
    send = collector()
    rejects(lambda: send.email(subject=f"one{breaker}two", text="t"), "subject", "line breaks")
    rejects(
        lambda: send.email(subject="s", text="t", to=f"Jane{breaker}Doe <j@example.org>"),
        "to",
        "line breaks",
    )
    send.email(subject="fine", text=f"a body may{breaker}break lines")
    assert len(send.outbox) == 1


@pytest.mark.parametrize(
    ("prefix", "rule"),
    [
        ("./x", "'.' path segments"),
        ("a/./b", "'.' path segments"),
        (".", "'.' path segments"),
        ("a/ . /b", "'.' path segments"),  # MinIO trims spaces around a segment
        ("a//b", "empty path segments"),
    ],
)
def test_s3_prefixes_no_store_keeps_alike_are_refused(prefix: str, rule: str) -> None:
    rejects(lambda: collector().s3(bucket="events", prefix=prefix, payload={}), "prefix", rule)


def test_s3_names_with_a_trailing_newline_are_refused() -> None:
    send = collector()
    rejects(lambda: send.s3(bucket="events\n", prefix="", payload={}), "bucket", "3-63")
    send.s3(bucket="events", prefix="a//", payload={})  # trailing slashes are dropped
    send.s3(bucket="events", prefix=".hidden/x.y/z.", payload={})
    assert len(send.outbox) == 2


class Memory(Destination):
    """A custom destination keeping what it is given."""

    received: list[Any] = []

    def deliver(self, sends: list[Any]) -> None:
        for send in sends:
            Memory.received.append(send.payload)
            self.delivered(send)


def test_refused_emit_and_custom_payloads_leave_the_rest_of_the_run_delivered(
    make_runtime: Any,
) -> None:
    rt = make_runtime(start=False)
    Memory.received = []
    rt.add_destination("memory", lambda _config: Memory.start())
    fields: list[str] = []

    @rt.workflow("p_mixed")
    def mixed(event: Any, ctx: Any) -> None:
        ctx.send.to("memory", {"n": 1})
        for call in (
            lambda: ctx.send.to("memory", {"text": ["x", SURROGATE]}),
            lambda: ctx.send.emit(raw_event={"text": SURROGATE}),
            lambda: ctx.send.sse(channel=SURROGATE, payload={}),
        ):
            try:
                call()
            except SendError as error:
                fields.append(error.field)
        ctx.send.emit(raw_event={"n": 2})
        ctx.send.to("memory", {"n": 3})

    rt.start()
    result = rt.run("p_mixed", None)
    assert fields == ["payload", "raw_event", "channel"] and result.sends == 3
    assert rt.flush(timeout=10)
    assert [r.status for r in rt.deliveries(result.run_id)] == ["delivered"] * 3
    assert Memory.received == [{"n": 1}, {"n": 3}]
