"""Embedded real services for the demo, the tests and the benchmarks.

Owns `HttpSink`: a real HTTP/1.1 server on loopback (asyncio + h11 on its own
thread) that records every request and answers as scripted: a status, headers,
a delay, or a body trickled slowly. Also runnable as its own process
(`python -m runtime.embedded sink --port N`) so a benchmark's sink does not
share the measured process's interpreter lock.

Only loopback addresses are ever bound here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

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
