"""A fan of SSE subscribers in their own process, for the SSE benchmark.

`python -m benchmarks.sse_clients --url URL --clients N [--stalled K]` opens N
streaming connections on trio (plus K that never read, with a tiny receive
buffer), prints `ready` once every stream has answered, and on SIGTERM
prints one JSON line: events received, per-client minimum and maximum, and
latency percentiles from the send timestamp `"t"` in each event's data to
receipt here. Parsing is deliberately minimal (a regex over complete frames)
so that this process measures the server, not itself.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import sys
import time
from urllib.parse import urlsplit

import trio

_STAMP = re.compile(rb'"t": ?([0-9.e+-]+)')


class Fan:
    def __init__(self, url: str, clients: int) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.clients = clients
        self.counts = [0] * clients
        self.latencies: list[float] = []
        self.answered = 0
        self.all_answered = trio.Event()
        self.failures: list[str] = []

    def request(self) -> bytes:
        return (
            f"GET {self.target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode("ascii")

    async def subscriber(self, index: int) -> None:
        stream = await trio.open_tcp_stream(self.host, self.port)
        async with stream:
            await stream.send_all(self.request())
            buffer = b""
            head_done = False
            latencies = self.latencies
            while True:
                data = await stream.receive_some(262144)
                if not data:
                    self.failures.append(f"client {index}: stream closed")
                    return
                now = time.time()
                buffer += data
                if not head_done:
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    if not buffer.startswith(b"HTTP/1.1 200"):
                        self.failures.append(f"client {index}: {buffer[:40]!r}")
                        return
                    head_done = True
                    buffer = buffer[end + 4 :]
                    self.answered += 1
                    if self.answered == self.clients:
                        self.all_answered.set()
                cut = max(buffer.rfind(b"\n\n") + 2, buffer.rfind(b"\n\r\n") + 3)
                if cut < 3:
                    continue  # no complete frame yet
                complete, buffer = buffer[:cut], buffer[cut:]
                stamps = _STAMP.findall(complete)
                self.counts[index] += len(stamps)
                latencies.extend(now - float(stamp) for stamp in stamps)


def _stalled(url: str, receive_buffer: int = 4096) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((parts.hostname, parts.port))
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode("ascii"))
    return sock


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main(arguments: argparse.Namespace) -> dict:
    fan = Fan(arguments.url, arguments.clients)
    stalled = [_stalled(arguments.url) for _ in range(arguments.stalled)]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for index in range(arguments.clients):
                nursery.start_soon(fan.subscriber, index)
                if index % 50 == 49:
                    await trio.sleep(0.01)  # do not flood the listen backlog
            await fan.all_answered.wait()
            print("ready", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    for sock in stalled:
        sock.close()
    ordered = sorted(fan.latencies)
    return {
        "received": sum(fan.counts),
        "per_client_min": min(fan.counts) if fan.counts else 0,
        "per_client_max": max(fan.counts) if fan.counts else 0,
        "p50_ms": _percentile(ordered, 0.50) * 1000,
        "p99_ms": _percentile(ordered, 0.99) * 1000,
        "max_ms": (ordered[-1] * 1000) if ordered else float("nan"),
        "failures": fan.failures[:5],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sse_clients")
    parser.add_argument("--url", required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--stalled", type=int, default=0)
    summary = trio.run(main, parser.parse_args())
    print(json.dumps(summary), flush=True)
    sys.exit(0)
