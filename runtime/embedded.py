"""Embedded real services for the demo, the tests and the benchmarks.

Owns `HttpSink`: a real HTTP/1.1 server on loopback (asyncio + h11 on its own
thread) that records every request and answers as scripted: a status, headers,
a delay, or a body trickled slowly. Also runnable as its own process
(`python -m runtime.embedded sink --port N`) so a benchmark's sink does not
share the measured process's interpreter lock. `EmbeddedPostgres` runs a
real Postgres from the `pgserver` wheel's binaries in a temporary directory.
`SmtpServer` is a real SMTP server (aiosmtpd) that records received messages
and can be scripted to refuse commands (421, 550) or restarted on its port.
`S3Server` is moto's S3-protocol server (`ThreadedMotoServer`), stoppable and
restartable on its port.

Only loopback addresses are ever bound here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import h11


@dataclass(frozen=True)
class ReceivedRequest:
    """A request as the sink saw it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    received_at: float

    def json(self) -> Any:
        import json

        return json.loads(self.body)


@dataclass
class SinkResponse:
    """How the sink answers one request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay: float = 0.0  # seconds before the status line
    trickle: float = 0.0  # seconds between body bytes (a slow server)


Responder = Callable[[ReceivedRequest], SinkResponse]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class HttpSink:
    """An HTTP server on 127.0.0.1 that records requests; use as a context manager."""

    def __init__(
        self,
        responder: Responder | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.responder: Responder = responder or (lambda _request: SinkResponse())
        self.record = record
        self.requests: list[ReceivedRequest] = []
        self.count = 0
        self.connections_accepted = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._connections: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> HttpSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> HttpSink:
        self._thread = threading.Thread(target=self._main, name="http-sink", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._server is None:
            raise RuntimeError(f"the HTTP sink could not listen on {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedRequest]:
        """Wait until `count` requests have arrived; return the recorded ones."""
        with self._arrived:
            self._arrived.wait_for(lambda: self.count >= count, timeout)
            return list(self.requests)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, self.host, self.port, backlog=1024)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except OSError:
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        self.connections_accepted += 1
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(connection, reader)
                if request is None:
                    return
                response = self.responder(request)
                await self._answer(connection, writer, response)
                if connection.our_state is h11.MUST_CLOSE:
                    return
                connection.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:  # the sink is stopping
            return
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _read_request(
        self, connection: h11.Connection, reader: asyncio.StreamReader
    ) -> ReceivedRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                connection.receive_data(data)
                if not data and head is None:
                    return None
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                return None
        assert head is not None
        target = head.target.decode("latin-1")
        parts = urlsplit(target)
        request = ReceivedRequest(
            method=head.method.decode("ascii"),
            path=parts.path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers={
                name.decode("latin-1").lower(): v.decode("latin-1") for name, v in head.headers
            },
            body=bytes(body),
            received_at=time.time(),
        )
        with self._arrived:
            self.count += 1
            if self.record:
                self.requests.append(request)
            self._arrived.notify_all()
        return request

    async def _answer(
        self, connection: h11.Connection, writer: asyncio.StreamWriter, response: SinkResponse
    ) -> None:
        if response.delay:
            await asyncio.sleep(response.delay)
        headers = [("content-length", str(len(response.body)))]
        headers += [(name, value) for name, value in response.headers.items()]
        writer.write(connection.send(h11.Response(status_code=response.status, headers=headers)))
        if response.trickle and response.body:
            for index in range(len(response.body)):
                writer.write(connection.send(h11.Data(data=response.body[index : index + 1])))
                await writer.drain()
                await asyncio.sleep(response.trickle)
        elif response.body:
            writer.write(connection.send(h11.Data(data=response.body)))
        writer.write(connection.send(h11.EndOfMessage()))
        await writer.drain()


class S3Server:
    """An S3-protocol server on 127.0.0.1 (moto's `ThreadedMotoServer`); a context manager.

    `config()` gives the `Config` fields that reach it. `stop()` also cuts the
    connections clients keep alive, so a stopped server really is down, and
    `start()` again serves on the same port. moto keeps its buckets in
    process-global state, so they survive a restart (and are shared by every
    server in the process: use distinct bucket names).
    """

    access_key = "outbound-access"
    secret_key = "outbound-secret"
    region = "us-east-1"

    def __init__(self, port: int = 0) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self._moto: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def config(self) -> dict[str, Any]:
        """Keyword arguments for `Config(...)` that point the S3 destination here."""
        return {
            "s3_endpoint": self.endpoint,
            "s3_access_key": self.access_key,
            "s3_secret_key": self.secret_key,
            "s3_region": self.region,
            "s3_secure": False,
        }

    def start(self) -> S3Server:
        if self._moto is None:
            self._moto = _stoppable_moto_server(self.host, self.port)
            self._moto.start()
        return self

    def stop(self) -> None:
        moto, self._moto = self._moto, None
        if moto is not None:
            moto.stop()

    @property
    def running(self) -> bool:
        return self._moto is not None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _stoppable_moto_server(host: str, port: int) -> Any:
    """A `ThreadedMotoServer` whose `stop()` closes its socket and every open connection."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import ThreadedWSGIServer

    class QuietHandler(MotoRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass

    class TrackingServer(ThreadedWSGIServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.open_connections: set[socket.socket] = set()
            self.connections_lock = threading.Lock()
            super().__init__(*args, **kwargs)

        def process_request(self, request: Any, client_address: Any) -> None:
            with self.connections_lock:
                self.open_connections.add(request)
            super().process_request(request, client_address)

        def shutdown_request(self, request: Any) -> None:
            with self.connections_lock:
                self.open_connections.discard(request)
            super().shutdown_request(request)

        def cut_connections(self) -> None:
            with self.connections_lock:
                connections = list(self.open_connections)
            for connection in connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    class StoppableMotoServer(ThreadedMotoServer):
        def start(self) -> None:
            # Bind here, on the caller's thread, so a busy port raises at once.
            app = DomainDispatcherApplication(create_backend_app)
            try:
                self._server = TrackingServer(self._ip_address, self._port, app, QuietHandler)
            except SystemExit:  # werkzeug exits when it cannot bind
                raise RuntimeError(f"the S3 server could not listen on {host}:{port}") from None
            self._thread = threading.Thread(
                target=functools.partial(self._server.serve_forever, 0.05),
                name="s3-server",
                daemon=True,
            )
            self._thread.start()
            self._server_ready_event.set()

        def stop(self) -> None:
            server = self._server
            super().stop()
            if server is not None:
                server.server_close()
                server.cut_connections()

    return StoppableMotoServer(host, port, verbose=False)


class EmbeddedPostgres:
    """A real Postgres (the binaries of the `pgserver` wheel) on 127.0.0.1; a context manager.

    Lives in a temporary directory that `stop()` keeps (so `start()` again
    serves the same data on the same port: a restart) and `close()` deletes.
    As root, the server runs as the `nobody` user, since Postgres refuses to
    run as root. `url` is what `Config(database_url=...)` takes. Unless
    `durable`, fsync is off: faster tests, and a machine crash may lose data.
    """

    user = "postgres"
    database = "postgres"

    def __init__(
        self, port: int = 0, directory: str | Path | None = None, durable: bool = False
    ) -> None:
        self.host = "127.0.0.1"
        self.durable = durable  # False: fsync off (fast tests); True: Postgres's defaults
        self.port = port or free_port(self.host)
        self._own_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="outbound-pg-"))
        self.pgdata = self.directory / "data"
        self._run_as = "nobody" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
        self.running = False

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def _pg(self, program: str, *args: str, timeout: float = 60) -> None:
        import importlib.util

        # The wheel's binaries, found without importing pgserver (which registers
        # atexit hooks and a lock file of its own that we do not need).
        spec = importlib.util.find_spec("pgserver")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "install pgserver (pip install 'outbound-runtime[embedded]')", name="pgserver"
            )
        binaries = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
        subprocess.run(
            [str(binaries / program), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            user=self._run_as,
            timeout=timeout,
        )

    def start(self) -> EmbeddedPostgres:
        if self.running:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            shutil.chown(self.directory, user=self._run_as)
        if not (self.pgdata / "PG_VERSION").exists():
            self._pg("initdb", "-D", str(self.pgdata), "--auth=trust", "-U", self.user,
                     "--encoding=UTF8", "--no-sync")  # fmt: skip
        options = f"-h {self.host} -p {self.port} -k {self.directory}"
        if not self.durable:
            options += " -c fsync=off"
        log = str(self.directory / "postgres.log")
        self._pg("pg_ctl", "-D", str(self.pgdata), "-w", "-o", options, "-l", log, "start")
        self.running = True
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are cut); the data is kept."""
        if self.running:
            self._pg("pg_ctl", "-D", str(self.pgdata), "-w", "-m", "fast", "stop")
            self.running = False

    def close(self) -> None:
        """Stop the server and delete its directory (if this object made it)."""
        try:
            self.stop()
        finally:
            if self._own_directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class ReceivedEmail:
    """A message as the SMTP server received it, parsed by the `email` package."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: Any  # email.message.EmailMessage (policy.default)
    peer: tuple[str, int]  # the client's address: one per connection
    received_at: float

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    def body(self, subtype: str = "plain") -> str | None:
        """The text of the `text/<subtype>` part, or None if there is none."""
        part = self.message.get_body(preferencelist=(subtype,))
        if part is None or part.get_content_subtype() != subtype:
            return None
        return str(part.get_content())


class SmtpServer:
    """An SMTP server on 127.0.0.1 (aiosmtpd) that records what it receives.

    `fail_next(n, code)` answers the next `n` MAIL (or RCPT, DATA) commands
    with `code`; a 421 also closes the connection, as real servers do.
    `stop()` cuts open connections; `start()` again serves on the same port,
    keeping what was received. `connections` counts the sessions (EHLO/HELO).
    With `credentials=(user, password)` it requires AUTH and refuses any
    other login with 535. With `tls_context` it offers STARTTLS, or speaks
    TLS from the first byte with `implicit_tls=True` (smtps://).
    """

    def __init__(
        self,
        port: int = 0,
        credentials: tuple[str, str] | None = None,
        tls_context: Any = None,  # ssl.SSLContext for the server side
        implicit_tls: bool = False,
    ) -> None:
        if implicit_tls and tls_context is None:
            raise ValueError("implicit_tls needs a tls_context")
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.credentials = credentials
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.messages: list[ReceivedEmail] = []
        self.connections = 0
        self._arrived = threading.Condition()
        self._failures: list[tuple[str, int, str]] = []  # (command, code, text), in order
        self._controller: Any = None
        self._sessions: set[Any] = set()

    @property
    def url(self) -> str:
        scheme = "smtps" if self.implicit_tls else "smtp"
        login = ""
        if self.credentials:
            user, password = (quote(part, safe="") for part in self.credentials)
            login = f"{user}:{password}@"
        starttls = "?starttls=1" if self.tls_context is not None and not self.implicit_tls else ""
        return f"{scheme}://{login}{self.host}:{self.port}{starttls}"

    def config(
        self, email_from: str = "Outbound <outbound@example.com>", email_to: str = "ops@example.com"
    ) -> dict[str, Any]:
        """Keyword arguments for `Config(...)` that point the email destination here."""
        return {"smtp_url": self.url, "email_from": email_from, "email_to": email_to}

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> SmtpServer:
        if self._controller is None:
            self._controller = _smtp_controller(self)
            self._controller.start()
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is None:
            return
        loop = controller.loop

        def cut() -> None:
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.close()

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(cut)
        controller.stop()
        self._sessions.clear()

    def restart(self) -> None:
        self.stop()
        self.start()

    def fail_next(self, count: int, code: int, command: str = "MAIL", text: str = "") -> None:
        """Answer the next `count` `command`s (MAIL, RCPT or DATA) with `code`."""
        command = command.upper()
        if command not in ("MAIL", "RCPT", "DATA"):
            raise ValueError("command must be MAIL, RCPT or DATA")
        text = text or ("Service not available, closing channel" if code == 421 else "Refused")
        with self._arrived:
            self._failures += [(command, code, text)] * count

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedEmail]:
        """Wait until `count` messages have arrived; return them all."""
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)

    # -- called by the handler on the server's loop -----------------------------------

    def _scripted_failure(self, command: str, server: Any) -> str | None:
        with self._arrived:
            if not self._failures or self._failures[0][0] != command:
                return None
            _, code, text = self._failures.pop(0)
        if code == 421 and server.transport is not None:
            server.loop.call_soon(server.transport.close)  # after the reply is written
        return f"{code} {text}"

    def _received(self, envelope: Any, peer: Any) -> None:
        import email
        import email.policy

        raw = bytes(envelope.original_content or envelope.content or b"")
        message = email.message_from_bytes(raw, policy=email.policy.default)
        received = ReceivedEmail(
            str(envelope.mail_from),
            list(envelope.rcpt_tos),
            raw,
            message,
            tuple(peer) if peer else ("", 0),
            time.time(),
        )
        with self._arrived:
            self.messages.append(received)
            self._arrived.notify_all()


class _SmtpHandler:
    """aiosmtpd hooks: record sessions and messages, answer scripted failures."""

    def __init__(self, owner: SmtpServer) -> None:
        self.owner = owner

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: N802
        self.owner.connections += 1
        session.host_name = hostname
        return responses

    async def handle_HELO(self, server, session, envelope, hostname):  # noqa: N802
        self.owner.connections += 1
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # noqa: N802
        failure = self.owner._scripted_failure("MAIL", server)
        if failure:
            return failure
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        failure = self.owner._scripted_failure("RCPT", server)
        if failure:
            return failure
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        failure = self.owner._scripted_failure("DATA", server)
        if failure:
            return failure
        self.owner._received(envelope, session.peer)
        return "250 Message accepted for delivery"


def _smtp_controller(owner: SmtpServer) -> Any:
    """An aiosmtpd Controller whose sessions `owner` can cut when it stops."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

    class TrackedSMTP(SMTP):
        def connection_made(self, transport: Any) -> None:
            owner._sessions.add(self)
            super().connection_made(transport)

        def connection_lost(self, error: Exception | None) -> None:
            owner._sessions.discard(self)
            super().connection_lost(error)

    class TrackedController(Controller):
        def factory(self) -> SMTP:
            with warnings.catch_warnings():  # AUTH without TLS: on loopback, on purpose
                warnings.simplefilter("ignore", UserWarning)
                return TrackedSMTP(self.handler, **self.SMTP_kwargs)

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        expected = tuple(part.encode("utf-8") for part in owner.credentials or ("", ""))
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == expected
        return AuthResult(success=ok, handled=False)

    options: dict[str, Any] = {}
    if owner.credentials:
        options = {"authenticator": authenticate, "auth_required": True, "auth_require_tls": False}
    if owner.implicit_tls:
        options["ssl_context"] = owner.tls_context
    elif owner.tls_context is not None:
        options.update(tls_context=owner.tls_context, require_starttls=True)
    return TrackedController(
        _SmtpHandler(owner),
        hostname=owner.host,
        port=owner.port,
        server_hostname="localhost",  # not socket.getfqdn(): no DNS lookup
        ready_timeout=10.0,
        **options,
    )


def _sink_main(arguments: argparse.Namespace) -> None:
    """Serve a sink in this process until SIGTERM/SIGINT; prints its port first."""
    answer = SinkResponse(delay=arguments.delay)
    sink = HttpSink(lambda _request: answer, port=arguments.port, record=False).start()
    print(sink.port, flush=True)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    sink.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runtime.embedded")
    commands = parser.add_subparsers(dest="command", required=True)
    sink = commands.add_parser("sink", help="serve an HTTP sink on 127.0.0.1")
    sink.add_argument("--port", type=int, default=0)
    sink.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    arguments = parser.parse_args(argv)
    if arguments.command == "sink":
        _sink_main(arguments)


if __name__ == "__main__":
    main()
