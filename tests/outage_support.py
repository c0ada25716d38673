"""A loopback TCP proxy that can be taken down: a real network outage for a real server.

`OutageProxy(port)` listens on 127.0.0.1 and forwards every connection to
127.0.0.1:`port`. `down()` is an outage as a client sees it: the listening
socket is closed (new connections are refused) and every open connection is
cut. `up()` listens on the same port again. It runs an asyncio loop on a thread
of its own; `stop()` (or the `with` block) ends it. The servers behind it (the
HTTP sink, SMTP, S3, Postgres) keep running and never know.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Any


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OutageProxy:
    """Forward 127.0.0.1:`self.port` to 127.0.0.1:`target_port`, until `down()`."""

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self.port = port or _free_port()
        self.connections = 0  # connections accepted while up (read: a client came)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="outage-proxy")

    def __enter__(self) -> OutageProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def replace_port(self, url: str) -> str:
        """`url` of the real server, pointed at this proxy instead."""
        return url.replace(f":{self.target_port}", f":{self.port}", 1)

    def start(self) -> OutageProxy:
        self._thread.start()
        self.up()
        return self

    def up(self) -> None:
        """Listen again: the outage is over."""
        self._call(self._listen())

    def down(self) -> None:
        """Refuse new connections and cut the open ones (both ways)."""
        self._call(self._cut())

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self._cut())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._forward, "127.0.0.1", self.port, reuse_address=True
            )

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._open):
            transport = writer.transport
            if transport is not None:
                transport.abort()
        self._open.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def _forward(self, client_reader: Any, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            client_writer.transport.abort()
            return
        if self._server is None:  # taken down meanwhile
            client_writer.transport.abort()
            server_writer.transport.abort()
            return
        self._open.update((client_writer, server_writer))
        await asyncio.gather(
            self._pipe(client_reader, server_writer),
            self._pipe(server_reader, client_writer),
        )
        self._open.difference_update((client_writer, server_writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()
                else:
                    writer.close()
        # The other direction ends too once its peer closes: closing both ends here
        # keeps a half-open pair from outliving the connection.
        with contextlib.suppress(Exception):
            writer.close()
