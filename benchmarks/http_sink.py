"""A minimal HTTP sink for the `http` benchmark, fast enough not to be the limit.

Owns `FastSinkProtocol` (an asyncio Protocol that answers every request at
once with one fixed `200` response), `fast_sink_process` (the sink in a child
process, on 127.0.0.1 only) and `sink_capacity` (how many requests a second the
sink answers to a cheap pipelining client: what the clients measured against
it may at most reach). The embedded `HttpSink` parses with h11 in pure Python
and records every request, so it tops out near the speed of the clients it
measures; this one only frames requests (head, then `Content-Length` bytes of
body). Run as `python -m outbound.benchmarks.http_sink [--delay S]`: prints its
port, then serves until terminated. Touches nothing of the runtime.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import time

from outbound.benchmarks.common import sink_process

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n"
    b"Connection: keep-alive\r\n\r\nok"
)
_CONTENT_LENGTH = b"\r\ncontent-length:"


class FastSinkProtocol(asyncio.Protocol):
    """One connection: frame each request (head, then its body) and answer it at once.

    With `delay`, each answer is written `delay` seconds after its request
    arrived (a slow endpoint); requests on one connection are answered in order.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.buffer = bytearray()
        self.body_left = 0  # bytes of the current request's body still to skip
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        answers = 0
        while True:
            if self.body_left:
                skipped = min(self.body_left, len(buffer))
                del buffer[:skipped]
                self.body_left -= skipped
                if self.body_left:
                    break
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(buffer[: end + 2]).lower()
            del buffer[: end + 4]
            at = head.find(_CONTENT_LENGTH)
            if at >= 0:
                value_end = head.find(b"\r\n", at + len(_CONTENT_LENGTH))
                self.body_left = int(head[at + len(_CONTENT_LENGTH) : value_end])
            answers += 1
        if answers:
            self._answer(RESPONSE * answers)

    def _answer(self, response: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, self._write, response)
        else:
            transport.write(response)

    def _write(self, response: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(delay: float, port: int = 0) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FastSinkProtocol(delay), "127.0.0.1", port, backlog=1024
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def fast_sink_process(delay: float = 0.0) -> contextlib.AbstractContextManager[str]:
    """The sink in a child process (its CPU is not the measured process's); yields its URL."""
    return sink_process(delay, command=("outbound.benchmarks.http_sink",))


class _PipeliningClient(asyncio.Protocol):
    """Keeps `depth` requests outstanding on one connection; counts the answers."""

    def __init__(self, request: bytes, depth: int, deadline: float, done: asyncio.Future) -> None:
        self.request = request
        self.depth = depth
        self.deadline = deadline
        self.done = done
        self.answered = 0
        self.pending = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request * self.depth)

    def data_received(self, data: bytes) -> None:
        self.pending += data
        count = len(self.pending) // len(RESPONSE)
        if not count:
            return
        del self.pending[: count * len(RESPONSE)]
        self.answered += count
        assert self.transport is not None
        if time.perf_counter() < self.deadline:
            self.transport.write(self.request * count)
        elif not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def sink_capacity(url: str, seconds: float = 2.0, connections: int = 16, depth: int = 16) -> float:
    """Requests a second the sink answers: `connections` clients pipelining `depth` each.

    The client only writes fixed bytes and counts fixed-size answers, so it
    costs far less per request than the sink does; the figure is the sink's.
    """
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"POST /bench HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        "Content-Length: 2\r\n\r\n{}"
    ).encode()

    async def main() -> float:
        loop = asyncio.get_running_loop()
        deadline = time.perf_counter() + seconds
        clients: list[_PipeliningClient] = []
        started = time.perf_counter()
        for _ in range(connections):
            client = _PipeliningClient(request, depth, deadline, loop.create_future())
            await loop.create_connection(lambda client=client: client, host, int(port))
            clients.append(client)
        await asyncio.wait_for(asyncio.gather(*(client.done for client in clients)), seconds + 10)
        elapsed = time.perf_counter() - started
        for client in clients:
            if client.transport is not None:
                client.transport.close()
        return sum(client.answered for client in clients) / elapsed

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m outbound.benchmarks.http_sink")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--port", type=int, default=0)
    arguments = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(arguments.delay, arguments.port))


if __name__ == "__main__":
    main()
