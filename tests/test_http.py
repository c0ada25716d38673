"""The HTTP destination against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import pytest
from tls_support import self_signed_certificate

from outbound import Runtime, SendError
from outbound.embedded import ReceivedRequest, SinkResponse


def run_and_flush(rt: Runtime, fn: Any, event: Any = None, timeout: float = 20) -> Any:
    rt.register("p_test", fn)
    result = rt.run("p_test", event)
    assert result.status == "succeeded", result.error
    assert rt.flush(timeout=timeout)
    return rt.deliveries(result.run_id)


def test_request_fields_arrive_as_sent(make_runtime: Any, sink: Any) -> None:
    rt = make_runtime()

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(
            url=sink.url + "/orders/new",
            method="PUT",
            data={"id": 7, "name": "Luke"},
            headers={"X-Trace": "abc"},
            params={"source": "test", "n": 3},
            auth=("user", "pa:ss"),
        )
        ctx.send.http(sink.url + "/plain", data="hello", auth={"username": "u", "password": "p"})
        ctx.send.http(sink.url + "/get", method="GET")

    (first, second, third) = run_and_flush(rt, workflow)
    requests = sorted(sink.requests, key=lambda r: r.path)
    get, orders, plain = requests
    assert orders.method == "PUT" and orders.path == "/orders/new"
    assert orders.query == {"source": "test", "n": "3"}
    assert orders.headers["x-trace"] == "abc"
    assert orders.headers["content-type"] == "application/json"
    assert orders.json() == {"id": 7, "name": "Luke"}
    expected = "Basic " + base64.b64encode(b"user:pa:ss").decode()
    assert orders.headers["authorization"] == expected
    assert plain.method == "POST" and plain.body == b"hello"
    assert plain.headers["authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
    assert get.method == "GET" and get.body == b""
    assert orders.headers["idempotency-key"] == first.id
    assert len({r.headers["idempotency-key"] for r in requests}) == 3
    for record in (first, second, third):
        assert record.status == "delivered" and record.attempts == 1
        assert record.detail["status_code"] == 200 and record.detail["latency_ms"] > 0
        assert record.error is None


def test_retries_503_then_succeeds_with_a_stable_idempotency_key(
    make_runtime: Any, make_sink: Any
) -> None:
    answers = iter([503, 502, 200])
    sink = make_sink(lambda _r: SinkResponse(next(answers)))
    rt = make_runtime()
    (record,) = run_and_flush(rt, lambda e, ctx: ctx.send.http(sink.url + "/flaky", data={"a": 1}))
    assert record.status == "delivered" and record.attempts == 3
    assert record.detail["status_code"] == 200
    keys = {r.headers["idempotency-key"] for r in sink.requests}
    assert keys == {record.id} and len(sink.requests) == 3
    assert rt.stats()["destinations"]["http"]["retries"] == 2


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_4xx_are_final(make_runtime: Any, make_sink: Any, status: int) -> None:
    sink = make_sink(lambda _r: SinkResponse(status, body=b"nope"))
    rt = make_runtime()
    (record,) = run_and_flush(rt, lambda e, ctx: ctx.send.http(sink.url + "/x"))
    assert record.status == "failed" and record.attempts == 1
    assert record.detail["status_code"] == status and record.error == f"HTTP {status}"
    assert record.detail["response"] == "nope"
    assert len(sink.requests) == 1


@pytest.mark.parametrize("status", [408, 429, 500])
def test_retryable_statuses_give_up_after_max_attempts(
    make_runtime: Any, make_sink: Any, status: int
) -> None:
    sink = make_sink(lambda _r: SinkResponse(status))
    rt = make_runtime(http_max_attempts=3)
    (record,) = run_and_flush(rt, lambda e, ctx: ctx.send.http(sink.url + "/x"))
    assert record.status == "failed" and record.attempts == 3
    assert "gave up after 3 attempts" in record.error
    assert len(sink.requests) == 3


def test_max_attempts_one_is_the_seed_systems_no_retry(make_runtime: Any, make_sink: Any) -> None:
    sink = make_sink(lambda _r: SinkResponse(503))
    rt = make_runtime(http_max_attempts=1)
    (record,) = run_and_flush(rt, lambda e, ctx: ctx.send.http(sink.url + "/x"))
    assert record.status == "failed" and record.attempts == 1 and len(sink.requests) == 1


def test_retry_after_is_honoured(make_runtime: Any, make_sink: Any) -> None:
    answers = iter([SinkResponse(429, headers={"Retry-After": "1"}), SinkResponse(200)])
    sink = make_sink(lambda _r: next(answers))
    rt = make_runtime(retry_base=0.001, retry_cap=0.01)  # our own backoff would be ~instant
    (record,) = run_and_flush(rt, lambda e, ctx: ctx.send.http(sink.url + "/x"))
    assert record.status == "delivered" and record.attempts == 2
    first, second = sink.requests
    assert second.received_at - first.received_at >= 0.95


def test_timeout_bounds_the_whole_request(make_runtime: Any, make_sink: Any) -> None:
    # Each byte comes within httpx's per-phase read timeout; only a whole-request
    # deadline stops this.
    # The full answer takes 8 s: a failure that names the 0.5 s deadline can only
    # come from it (no wall-clock assertion: the machine may be slow).
    sink = make_sink(lambda _r: SinkResponse(200, body=b"x" * 40, trickle=0.2))
    rt = make_runtime(http_max_attempts=1)
    (record,) = run_and_flush(rt, lambda e, ctx: ctx.send.http(sink.url + "/slow", timeout=0.5))
    assert record.status == "failed"
    assert "no complete response within 0.5 s" in record.error


def test_connect_errors_are_retried_then_fail(make_runtime: Any) -> None:
    from outbound.embedded import free_port

    url = f"http://127.0.0.1:{free_port()}/closed"
    rt = make_runtime(http_max_attempts=2)
    (record,) = run_and_flush(rt, lambda e, ctx: ctx.send.http(url))
    assert record.status == "failed" and record.attempts == 2
    assert "ConnectError" in record.error


def test_in_flight_requests_are_bounded(make_runtime: Any, make_sink: Any) -> None:
    active = [0]
    peak = [0]
    lock = threading.Lock()

    def slow(_request: ReceivedRequest) -> SinkResponse:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        return SinkResponse(200)

    sink = make_sink(slow)
    rt = make_runtime(http_concurrency=4)

    def workflow(event: Any, ctx: Any) -> None:
        for n in range(40):
            ctx.send.http(sink.url + f"/{n}")

    records = run_and_flush(rt, workflow)
    assert all(r.status == "delivered" for r in records)
    assert len(sink.requests) == 40
    assert peak[0] <= 4


def test_connections_are_kept_alive_across_sends_to_several_hosts(
    make_runtime: Any, make_sink: Any
) -> None:
    first, second = make_sink(), make_sink()
    rt = make_runtime(http_concurrency=4)

    def workflow(event: Any, ctx: Any) -> None:
        for n in range(60):
            ctx.send.http((first if n % 2 else second).url + f"/{n}")

    records = run_and_flush(rt, workflow)
    assert [r.status for r in records] == ["delivered"] * 60
    assert (len(first.requests), len(second.requests)) == (30, 30)
    # Four request workers, each keeping one connection per host.
    assert first.connections_accepted <= 4
    assert second.connections_accepted <= 4


def test_delivery_is_pending_until_the_server_answers(make_runtime: Any, make_sink: Any) -> None:
    gate = threading.Event()
    sink = make_sink(lambda _r: (gate.wait(10), SinkResponse(200))[1])
    rt = make_runtime()
    rt.register("p", lambda e, ctx: ctx.send.http(sink.url + "/wait"))
    result = rt.run("p", {})
    (record,) = rt.deliveries(result.run_id)
    assert record.status == "pending"
    gate.set()
    assert rt.flush(timeout=10)
    (record,) = rt.deliveries(result.run_id)
    assert record.status == "delivered"
    assert json.loads(json.dumps(record.as_dict()))["status"] == "delivered"


BAD_HTTP_SENDS = [
    ({"url": "/x\ud800"}, "url"),
    ({"url": "/" + "x" * 70_000}, "url"),
    ({"url": "/x", "params": {"q": "x" * 70_000}}, "params"),
    ({"data": "text \ud800"}, "data"),
    ({"data": {"key\ud800": "value"}}, "data"),
    ({"data": {"key": ["\ud800"]}}, "data"),
    ({"headers": {"X-Name": "\u20ac"}}, "headers['X-Name']"),
    ({"headers": {"X-Name": "\ud800"}}, "headers['X-Name']"),
    ({"headers": {"X-Name": "a\x01b"}}, "headers['X-Name']"),
    ({"headers": {"Content-Length": "3"}}, "headers['Content-Length']"),
    ({"headers": {"transfer-encoding": "chunked"}}, "headers['transfer-encoding']"),
    ({"params": {"q": "\ud800"}}, "params['q']"),
    ({"auth": ("user\ud800", "pw")}, "auth"),
]


def test_unsendable_input_is_refused_at_the_call_and_the_rest_is_delivered(
    make_runtime: Any, sink: Any
) -> None:
    """Each of these used to be accepted, then failed (or retried) at delivery."""
    rt = make_runtime()
    fields: list[str] = []

    def workflow(event: Any, ctx: Any) -> None:
        ctx.send.http(sink.url + "/first", data={"n": 1})
        for arguments, _field in BAD_HTTP_SENDS:
            arguments = dict(arguments)
            url = sink.url + arguments.pop("url", "/bad")
            try:
                ctx.send.http(url, **{"data": "x", **arguments})
            except SendError as error:
                fields.append(error.field)
        ctx.send.http(
            sink.url + "/last",
            data="body",
            headers={"X-Latin": "café", "X-Padded": "  v  ", "idempotency-key": "mine"},
        )

    records = run_and_flush(rt, workflow)
    assert fields == [field for _arguments, field in BAD_HTTP_SENDS]
    assert [(r.status, r.attempts) for r in records] == [("delivered", 1)] * 2
    first, last = sorted(sink.wait_for(2), key=lambda request: request.path)
    assert (first.path, first.json()) == ("/first", {"n": 1})
    assert last.path == "/last" and last.body == b"body"
    assert last.headers["x-latin"] == "café"  # sent as Latin-1 bytes, read back as Latin-1
    assert last.headers["x-padded"] == "v"
    assert last.headers["idempotency-key"] == "mine"
    assert len(sink.requests) == 2


def test_tls_certificates_are_verified(make_runtime: Any, tmp_path: Any) -> None:
    """An endpoint whose certificate no trusted authority signed gets no request."""
    import http.server
    import ssl

    pem = self_signed_certificate(tmp_path, "http-test")
    answered: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            answered.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pem)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}/hook"
        rt = make_runtime(http_max_attempts=1)
        (record,) = run_and_flush(rt, lambda e, ctx: ctx.send.http(url, data={"a": 1}))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert record.status == "failed" and record.error.startswith("ConnectError")
    assert "certificate verify failed" in record.error
    assert answered == []


def test_params_join_the_urls_own_query(make_runtime: Any, sink: Any) -> None:
    rt = make_runtime()
    url = sink.url + "/q/é?x=1"
    params = {"s": "a b&c", "u": "é", "n": 2}
    (record,) = run_and_flush(rt, lambda e, ctx: ctx.send.http(url, params=params))
    assert record.status == "delivered"
    (request,) = sink.requests
    assert request.path == "/q/%C3%A9"
    assert request.query == {"x": "1", "s": "a b&c", "u": "é", "n": "2"}


def test_the_request_target_is_the_one_httpx_sends() -> None:
    import httpx

    from outbound.destinations.http.send import HttpRequest
    from outbound.destinations.http.workers import wire_url

    urls = [
        "http://127.0.0.1:8080/orders/12345?x=1&y=a,b",
        "http://127.0.0.1:8080?x=1",
        "http://Example.com",
        "http://h.test/a b/c?q=a b",
        "http://h.test/%zz/%41",
        "http://h.test/a/./b/../c",
        'http://h.test/a|b{c}^`d"e<f>',
        "https://h.test/p/é?q=ü#fragment",
        "http://[::1]:8080/x",
    ]
    for url in urls:
        expected = httpx.URL(url)
        sent = wire_url(HttpRequest(method="GET", url=url))
        assert sent.raw_path_qs == expected.raw_path.decode("ascii"), url
        default_port = 443 if expected.scheme == "https" else 80
        assert (sent.host, sent.port) == (expected.host, expected.port or default_port), url
