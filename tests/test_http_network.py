"""OUTBOUND_HTTP_BLOCK_PRIVATE: the address rules, and real sends to a sink on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from tls_support import self_signed_certificate

from outbound import Config, Runtime
from outbound.destinations.http.network import (
    GuardedResolver,
    NetworkPolicy,
    RefusedAddress,
    address_kind,
    guarded_socket_factory,
    parse_allowed,
)
from outbound.destinations.http.workers import verified_tls_context

LATIN1 = {"X-Latin": "café"}  # a Latin-1 header value: the send goes through httpx

ADDRESS_RULES = [
    ("127.0.0.1", "a loopback address"),
    ("127.8.9.10", "a loopback address"),
    ("::1", "a loopback address"),
    ("10.1.2.3", "a private address"),
    ("172.16.0.1", "a private address"),
    ("192.168.1.1", "a private address"),
    ("fc00::1", "a private address"),
    ("fd00:ec2::254", "a private address"),
    ("100.64.0.1", "a shared (carrier-grade NAT) address"),
    ("169.254.169.254", "a link-local address (cloud metadata)"),
    ("169.254.1.1", "a link-local address"),
    ("fe80::1", "a link-local address"),
    ("fe80::1%1", "a link-local address"),
    ("224.0.0.1", "a multicast address"),
    ("ff02::1", "a multicast address"),
    ("0.0.0.0", "an unspecified address"),
    ("::", "an unspecified address"),
    ("240.0.0.1", "a reserved address"),
    ("192.0.2.1", "a private address"),  # TEST-NET-1, documentation
    ("::ffff:127.0.0.1", "a loopback address (IPv4 127.0.0.1 inside)"),
    ("::ffff:10.0.0.1", "a private address (IPv4 10.0.0.1 inside)"),
    ("64:ff9b::7f00:1", "a loopback address (IPv4 127.0.0.1 inside)"),
    ("64:ff9b::a9fe:a9fe", "a link-local address (cloud metadata) (IPv4 169.254.169.254 inside)"),
    ("2002:7f00:1::", "a loopback address (IPv4 127.0.0.1 inside)"),
    ("93.184.215.14", None),
    ("1.1.1.1", None),
    ("2606:4700:4700::1111", None),
    ("::ffff:8.8.8.8", None),  # reaches 8.8.8.8
    ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
]


@pytest.mark.parametrize(("address", "kind"), ADDRESS_RULES)
def test_address_rules(address: str, kind: str | None) -> None:
    assert address_kind(ipaddress.ip_address(address)) == kind
    reason = NetworkPolicy().refusal(address)
    if kind is None:
        assert reason is None
    else:
        assert reason == f"refused: {address}, {kind} (OUTBOUND_HTTP_BLOCK_PRIVATE=1)"


def test_the_allow_list_takes_addresses_and_ranges() -> None:
    policy = NetworkPolicy(parse_allowed(" 10.0.0.0/8, 127.0.0.1 ,fd00::/8,[::1]"))
    for allowed in ("10.200.0.1", "127.0.0.1", "fd12::5", "::1", "::ffff:10.0.0.7"):
        assert policy.refusal(allowed) is None, allowed
    for refused in ("127.0.0.2", "192.168.0.1", "169.254.169.254", "fe80::1"):
        assert policy.refusal(refused) is not None, refused
    assert parse_allowed("") == parse_allowed(None) == ()


def test_bad_settings_name_the_variable() -> None:
    with pytest.raises(ValueError, match="OUTBOUND_HTTP_ALLOW_ADDRESSES: 'internal.example'"):
        Config(http_block_private=True, http_allow_addresses="10.0.0.0/8, internal.example")
    with pytest.raises(ValueError, match="OUTBOUND_HTTP_BLOCK_PRIVATE='maybe'"):
        Config.from_env({"OUTBOUND_HTTP_BLOCK_PRIVATE": "maybe"})
    config = Config.from_env(
        {"OUTBOUND_HTTP_BLOCK_PRIVATE": "1", "OUTBOUND_HTTP_ALLOW_ADDRESSES": "127.0.0.1"}
    )
    assert config.http_block_private is True and config.http_allow_addresses == "127.0.0.1"
    assert Config().http_block_private is False  # off by default


class _Answers(AbstractResolver):
    """A DNS answer fixed by the test: rebinding cannot be staged with a real resolver here."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        return None


def test_the_resolver_keeps_only_allowed_addresses() -> None:
    policy = NetworkPolicy()
    mixed = GuardedResolver(policy, _Answers("127.0.0.1", "93.184.215.14", "169.254.169.254"))
    kept = asyncio.run(mixed.resolve("hooks.example", 443))
    assert [result["host"] for result in kept] == ["93.184.215.14"]
    rebound = GuardedResolver(policy, _Answers("169.254.169.254"))
    with pytest.raises(RefusedAddress) as refused:
        asyncio.run(rebound.resolve("hooks.example", 443))
    assert str(refused.value) == (
        "refused: hooks.example resolves to 169.254.169.254, a link-local address "
        "(cloud metadata) (OUTBOUND_HTTP_BLOCK_PRIVATE=1)"
    )


def test_no_socket_is_made_for_a_refused_address() -> None:
    make_socket = guarded_socket_factory(NetworkPolicy())
    with pytest.raises(RefusedAddress, match="refused: ::1, a loopback address"):
        make_socket((socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 80, 0, 0)))


def _send_and_flush(rt: Runtime, url: str, headers: dict[str, str] | None = None) -> Any:
    workflow_id = f"p_net_{len(rt.workflows)}"
    rt.register(workflow_id, lambda event, ctx: ctx.send.http(url, data="x", headers=headers))
    result = rt.run(workflow_id, None)
    assert result.status == "succeeded", result.error
    assert rt.flush(timeout=20)
    (record,) = rt.deliveries(result.run_id)
    return record


@pytest.mark.parametrize("headers", [None, LATIN1], ids=["aiohttp", "httpx"])
def test_blocking_refuses_loopback_for_good(
    make_runtime: Any, sink: Any, headers: dict[str, str] | None
) -> None:
    rt = make_runtime(http_block_private=True)
    record = _send_and_flush(rt, sink.url + "/hook", headers)
    assert (record.status, record.attempts) == ("failed", 1)  # no retry
    assert record.error == "refused: 127.0.0.1, a loopback address (OUTBOUND_HTTP_BLOCK_PRIVATE=1)"
    assert sink.requests == []


@pytest.mark.parametrize("headers", [None, LATIN1], ids=["aiohttp", "httpx"])
def test_a_name_resolving_to_loopback_is_refused(
    make_runtime: Any, sink: Any, headers: dict[str, str] | None
) -> None:
    rt = make_runtime(http_block_private=True)
    record = _send_and_flush(rt, f"http://localhost:{sink.port}/hook", headers)
    assert (record.status, record.attempts) == ("failed", 1)
    assert record.error.startswith("refused: localhost resolves to ")
    assert record.error.endswith(", a loopback address (OUTBOUND_HTTP_BLOCK_PRIVATE=1)")
    assert sink.requests == []


@pytest.mark.parametrize("headers", [None, LATIN1], ids=["aiohttp", "httpx"])
@pytest.mark.parametrize("allowed", ["127.0.0.1", "127.0.0.0/8"])
def test_the_allow_list_lets_internal_endpoints_through(
    make_runtime: Any, sink: Any, headers: dict[str, str] | None, allowed: str
) -> None:
    rt = make_runtime(http_block_private=True, http_allow_addresses=allowed)
    by_address = _send_and_flush(rt, sink.url + "/by-address", headers)
    by_name = _send_and_flush(rt, f"http://localhost:{sink.port}/by-name", headers)
    assert [(r.status, r.attempts) for r in (by_address, by_name)] == [("delivered", 1)] * 2
    received = {request.path: request for request in sink.wait_for(2)}
    assert received["/by-name"].headers["host"] == f"localhost:{sink.port}"
    assert received["/by-address"].headers["host"] == f"127.0.0.1:{sink.port}"


@pytest.mark.parametrize("headers", [None, LATIN1], ids=["aiohttp", "httpx"])
def test_off_by_default_loopback_is_delivered(
    make_runtime: Any, sink: Any, headers: dict[str, str] | None
) -> None:
    rt = make_runtime()
    record = _send_and_flush(rt, f"http://localhost:{sink.port}/hook", headers)
    assert (record.status, record.attempts) == ("delivered", 1)
    assert [request.path for request in sink.wait_for(1)] == ["/hook"]


@pytest.mark.parametrize(
    ("host", "shown", "kind"),
    [
        ("0.0.0.0", "0.0.0.0", "an unspecified address"),  # Linux connects it to loopback
        ("127.0.0.2", "127.0.0.2", "a loopback address"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1", "a loopback address (IPv4 127.0.0.1 inside)"),
        ("[::1]", "::1", "a loopback address"),
    ],
)
@pytest.mark.parametrize("headers", [None, LATIN1], ids=["aiohttp", "httpx"])
def test_other_loopback_spellings_are_refused(
    make_runtime: Any, sink: Any, headers: dict[str, str] | None, host: str, shown: str, kind: str
) -> None:
    rt = make_runtime(http_block_private=True)
    record = _send_and_flush(rt, f"http://{host}:{sink.port}/hook", headers)
    assert (record.status, record.attempts) == ("failed", 1)
    assert record.error == f"refused: {shown}, {kind} (OUTBOUND_HTTP_BLOCK_PRIVATE=1)"
    assert sink.requests == []


@pytest.mark.parametrize("headers", [None, LATIN1], ids=["aiohttp", "httpx"])
@pytest.mark.parametrize("named", [True, False], ids=["cert-names-host", "cert-for-ip-only"])
def test_tls_to_a_checked_address_verifies_the_urls_host_name(
    make_runtime: Any,
    tmp_path: Path,
    monkeypatch: Any,
    headers: dict[str, str] | None,
    named: bool,
) -> None:
    """With blocking on, the httpx path sends to the address it checked, not the name: TLS
    must still name and verify the URL's host (SNI and the certificate's name), so a
    certificate for `localhost` is accepted and one only for 127.0.0.1 is not."""
    pem = self_signed_certificate(tmp_path, "tls-pinned", ("localhost",) if named else ())
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))  # trusted, by httpx's and aiohttp's context
    verified_tls_context.cache_clear()
    server_names: list[str | None] = []
    with TlsServer(pem, server_names) as server:
        try:
            rt = make_runtime(
                http_block_private=True, http_allow_addresses="127.0.0.1", http_max_attempts=1
            )
            record = _send_and_flush(rt, f"https://localhost:{server.port}/hook", headers)
        finally:
            verified_tls_context.cache_clear()  # the next runtime trusts certifi's again
    if named:
        assert (record.status, record.attempts) == ("delivered", 1), record.error
        assert server.requests == [("/hook", f"localhost:{server.port}")]
    else:
        assert record.status == "failed" and "certificate verify failed" in record.error
        assert "localhost" in record.error and server.requests == []
    assert server_names and set(server_names) == {"localhost"}  # SNI named the host


class TlsServer:
    """An HTTPS server on 127.0.0.1 answering 200; records (path, Host) and the SNI names."""

    def __init__(self, pem: Path, server_names: list[str | None]) -> None:
        import http.server
        import ssl

        self.requests: list[tuple[str, str]] = []
        requests = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                requests.append((self.path, self.headers["host"]))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pem)
        context.sni_callback = lambda _socket, name, _context: server_names.append(name)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TlsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)
