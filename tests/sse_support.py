"""Test helpers for SSE: a WHATWG event-stream parser and real streaming clients.

`SseParser` follows the "Interpreting an event stream" rules of the HTML
standard (CR, LF and CRLF line ends, comments, field parsing, one leading
space stripped, `id` without NUL, dispatch on a blank line, default type
"message"). `collect()` reads a stream with httpx; `fan_collect()` runs many
concurrent clients on trio with h11; `StalledClient` connects and never reads.
"""

from __future__ import annotations

import codecs
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11
import httpx
import trio


@dataclass(frozen=True)
class Event:
    type: str
    data: str
    last_event_id: str


class SseParser:
    """Feed bytes, get dispatched events; comments are kept in `comments`."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._first = True
        self._data: list[str] = []
        self._type = ""
        self.last_event_id = ""
        self.retry: int | None = None
        self.comments: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._pending + self._decoder.decode(chunk)
        if self._first and text:
            text = text.removeprefix("\ufeff")
            self._first = False
        events: list[Event] = []
        start = 0
        while True:
            cr, lf = text.find("\r", start), text.find("\n", start)
            ends = [index for index in (cr, lf) if index != -1]
            if not ends:
                break
            end = min(ends)
            if text[end] == "\r":
                if end + 1 == len(text):  # CR at the end: maybe CRLF, wait for more
                    break
                step = 2 if text[end + 1] == "\n" else 1
            else:
                step = 1
            event = self._line(text[start:end])
            if event is not None:
                events.append(event)
            start = end + step
        self._pending = text[start:]
        return events

    def _line(self, line: str) -> Event | None:
        if line == "":
            if not self._data:
                self._type = ""
                return None
            event = Event(self._type or "message", "\n".join(self._data), self.last_event_id)
            self._data, self._type = [], ""
            return event
        if line.startswith(":"):
            self.comments.append(line[1:])
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\x00" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None


@dataclass
class Collected:
    status: int
    headers: dict[str, str]
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    ended: bool = False  # the server closed the stream
    body: bytes = b""  # for non-200 answers

    @property
    def ids(self) -> list[int]:
        return [int(event.last_event_id) for event in self.events]


def collect(
    url: str,
    stop_when: Callable[[Collected], bool] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Collected:
    """Read an SSE stream until `stop_when(collected)`, the stream ends, or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    parser = SseParser()
    with (
        httpx.Client(timeout=httpx.Timeout(timeout)) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        result = Collected(response.status_code, dict(response.headers))
        if response.status_code != 200:
            result.body = response.read()
            return result
        for chunk in response.iter_raw():
            result.events.extend(parser.feed(chunk))
            result.comments = parser.comments
            if (stop_when is not None and stop_when(result)) or time.monotonic() > deadline:
                return result
        result.ended = True
        return result


def fan_collect(
    url: str,
    clients: int,
    events: int,
    timeout: float = 30.0,
) -> list[list[Event]]:
    """`clients` concurrent subscribers on trio; each reads until it has `events` events."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    received: list[list[Event]] = [[] for _ in range(clients)]

    async def one(index: int) -> None:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            connection = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method="GET",
                target=target,
                headers=[("host", f"{host}:{port}"), ("accept", "text/event-stream")],
            )
            await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
            parser = SseParser()
            mine = received[index]
            while len(mine) < events:
                data = await stream.receive_some(65536)
                connection.receive_data(data)
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA or isinstance(
                        event, h11.EndOfMessage | h11.ConnectionClosed
                    ):
                        break
                    if isinstance(event, h11.Response) and event.status_code != 200:
                        raise AssertionError(f"client {index}: HTTP {event.status_code}")
                    if isinstance(event, h11.Data):
                        mine.extend(parser.feed(bytes(event.data)))
                if not data:
                    return

    async def main() -> None:
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                for index in range(clients):
                    nursery.start_soon(one, index)

    trio.run(main)
    return received


class StalledClient:
    """Subscribes with a tiny receive buffer and reads nothing until `read_all()`."""

    def __init__(self, url: str, receive_buffer: int = 4096) -> None:
        parts = urlsplit(url)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect((parts.hostname, parts.port))
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n\r\n"
        )
        self.sock.sendall(request.encode("ascii"))

    def read_all(self, timeout: float = 10.0) -> tuple[list[Event], bool]:
        """Read until the server closes the stream (or `timeout`); (events, ended)."""
        self.sock.settimeout(timeout)
        connection = h11.Connection(h11.CLIENT)
        connection.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        connection.send(h11.EndOfMessage())
        parser = SseParser()
        events: list[Event] = []
        ended = False
        deadline = time.monotonic() + timeout
        while not ended and time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                ended = True
                break
            connection.receive_data(data)
            while True:
                try:
                    event = connection.next_event()
                except h11.RemoteProtocolError:  # cut off mid-body: a disconnect
                    ended = True
                    break
                if event is h11.NEED_DATA:
                    break
                if isinstance(event, h11.Data):
                    events.extend(parser.feed(bytes(event.data)))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    ended = True
                    break
            if not data:
                ended = True
        return events, ended

    def close(self) -> None:
        self.sock.close()
