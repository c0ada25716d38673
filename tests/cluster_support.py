"""Helpers for the cluster tests (tests/test_cluster.py): node processes and posting events.

Owns `Node` (one `outbound serve --app cluster_app:rt` process, started with
its own environment, ready when `GET /healthz` answers 200, killed with a real
SIGKILL or stopped with SIGTERM), `Nodes` (a test's nodes, every one ended by
`close()`), `EventPoster` (posts events round-robin to the nodes' APIs from a
thread, counting only 202s as acknowledged), `post_round_robin` (the same, in
the caller's thread, every post must be a 202), `StreamReader` (one SSE
subscriber reading from a thread), `PausableProxy` (a node's way to NATS that
a test can hold) and `ClusterCase` (one test's cluster name,
HTTP sink path and SQL table: what arrived there, read with
tests/journal_support.py's readers, and which node ran what). Knows the
runtime only through its public contract (the CLI, the HTTP API, `OUTBOUND_*`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from journal_support import Arrivals, SwitchableResponder, child_env, http_arrivals, sql_arrivals
from sql_support import Db
from sse_support import Event, SseParser

TESTS_DIR = Path(__file__).parent
SERVING = re.compile(r"outbound: serving on (http://\S+)")
SSE_SUBSCRIBERS = re.compile(r"^outbound_sse_subscribers(?:\{[^}]*\})? (\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class NodePlan:
    """What one node is: its name, its cluster, and where its journal and database are."""

    node_id: str
    cluster: str
    journal: str  # nats://127.0.0.1:PORT, or "off"
    database_url: str
    data_dir: Path
    ack_wait: float = 3.0  # OUTBOUND_JOURNAL_ACK_WAIT
    replicas: int = 1  # OUTBOUND_JOURNAL_REPLICAS (3 against a three-server NATS cluster)
    settings: dict[str, Any] = field(default_factory=dict)  # more OUTBOUND_* (name: value)

    def env(self) -> dict[str, str]:
        """The node's environment: its `OUTBOUND_*` settings, none inherited, tests/ importable."""
        env = child_env(
            {"database_url": self.database_url},
            self.journal,
            self.data_dir,
            cluster=self.cluster,
            node_id=self.node_id,
            journal_ack_wait=self.ack_wait,
            journal_replicas=self.replicas,
            **self.settings,
        )
        env["PYTHONPATH"] = os.pathsep.join(
            [str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env["PYTHONUNBUFFERED"] = "1"
        return env


class Node:
    """One `outbound serve` process on a free loopback port; output in `log_path`."""

    def __init__(self, plan: NodePlan, log_path: Path) -> None:
        self.plan = plan
        self.node_id = plan.node_id
        self.log_path = log_path
        self.url = ""
        self.killed_at: float | None = None  # time.time() of the SIGKILL
        self.terminated = False
        self._api: httpx.Client | None = None
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "outbound.cli", "serve", "--app", "cluster_app:rt"]
                + ["--host", "127.0.0.1", "--port", "0"],
                env=plan.env(),
                cwd=TESTS_DIR,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest is not also the node's signal
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> Node:
        """Wait until the node says where it serves and its `GET /healthz` answers 200."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.process.poll()
            assert exited is None, f"{self.node_id} exited ({exited}) at start:\n{self.log()}"
            assert time.monotonic() < deadline, f"{self.node_id} not ready:\n{self.log()[-3000:]}"
            if not self.url:
                found = SERVING.search(self.log())
                self.url = found.group(1) if found else ""
            if self.url:
                with contextlib.suppress(httpx.HTTPError):
                    if self.api.get("/healthz", timeout=2).status_code == 200:
                        return self
            time.sleep(0.05)

    def events_url(self, workflow_id: str) -> str:
        """`POST` here to trigger `workflow_id` (URL-encoded: any character is safe)."""
        return f"{self.url}/workflows/{urllib.parse.quote(workflow_id, safe='')}/events"

    @property
    def api(self) -> httpx.Client:
        """A client of the node's API, kept (one per call would cost a TLS context each),
        safe to share between threads; closed by `close()`."""
        if self._api is None:
            self._api = httpx.Client(base_url=self.url, timeout=15)
        return self._api

    def sse_url(self, workflow_id: str) -> str:
        """`GET` here to subscribe to `workflow_id`'s SSE stream."""
        return f"{self.url}/pipelines/{urllib.parse.quote(workflow_id, safe='')}/sse"

    def sse_subscribers(self) -> int:
        """The node's connected SSE subscribers, from its `GET /metrics`."""
        text = self.api.get("/metrics").text
        found = SSE_SUBSCRIBERS.search(text)
        assert found, f"no outbound_sse_subscribers in {self.node_id}'s metrics"
        return int(float(found.group(1)))

    @property
    def alive(self) -> bool:
        return self.process.poll() is None and self.killed_at is None

    def kill_9(self) -> None:
        """SIGKILL: no handler, no drain; what a kill -9 or an OOM kill does."""
        self.killed_at = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> None:
        """SIGTERM, once: the node stops serving and drains (a second one would end the drain)."""
        if self.process.poll() is None and not self.terminated:
            self.terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        """`terminate()` (every delivery final) and wait; return the exit code."""
        self.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.node_id} did not stop:\n{self.log()[-3000:]}") from None

    def close(self) -> None:
        """Kill the node if it still runs (a failing test must not leave it behind)."""
        if self._api is not None:
            self._api.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Nodes:
    """The nodes of one test; use as a context manager: every node is killed on exit."""

    def __init__(self, plans: list[NodePlan], log_dir: Path) -> None:
        self.nodes: list[Node] = []
        try:
            for plan in plans:
                self.nodes.append(Node(plan, log_dir / f"{plan.node_id}.log"))
            for node in self.nodes:
                node.wait_ready()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getitem__(self, node_id: str) -> Node:
        return next(node for node in self.nodes if node.node_id == node_id)

    def stop_alive(self) -> None:
        """SIGTERM the nodes still up, together, and check each exited 0 (drained)."""
        alive = [node for node in self.nodes if node.alive]
        for node in alive:
            node.terminate()  # all at once: they drain side by side
        codes = {node.node_id: node.stop() for node in alive}
        assert set(codes.values()) <= {0}, f"exit codes {codes}"

    def logs(self) -> str:
        return "\n".join(f"--- {node.node_id}\n{node.log()[-3000:]}" for node in self.nodes)

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@dataclass
class PostResults:
    """What the poster saw: the numbers answered 202 (acknowledged), by node, and the rest."""

    acknowledged: dict[int, str] = field(default_factory=dict)  # seq -> node that answered
    run_ids: dict[int, str] = field(default_factory=dict)  # seq -> the 202's run_id
    acknowledged_at: dict[int, float] = field(default_factory=dict)  # seq -> time.time()
    refused: dict[int, str] = field(default_factory=dict)  # seq -> status or error

    def per_node(self) -> Counter[str]:
        return Counter(self.acknowledged.values())


class EventPoster:
    """Posts `total` events round-robin to the nodes still alive, from a thread.

    A node that `kill_9` marked is skipped from then on; a post in flight when it
    dies fails and is not acknowledged. `acknowledged_count` lets a test act
    mid-stream; `join()` waits for the thread (the test must call it).
    """

    def __init__(
        self,
        nodes: list[Node],
        workflow_id: str,
        total: int,
        make_event: Callable[[int], dict[str, Any]],
        pace: float = 0.0,
    ) -> None:
        self.nodes = nodes
        self.workflow_id = workflow_id
        self.total = total
        self.make_event = make_event
        self.pace = pace
        self.results = PostResults()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._post_all, name="test-event-poster")

    def _post_all(self) -> None:
        with httpx.Client(timeout=15) as client:
            for seq in range(self.total):
                alive = [node for node in self.nodes if node.alive]
                node = alive[seq % len(alive)]
                body = self.make_event(seq)
                try:
                    response = client.post(node.events_url(self.workflow_id), json=body)
                except httpx.HTTPError as error:
                    outcome = f"{type(error).__name__}: {error}"
                else:
                    outcome = str(response.status_code)
                with self._lock:
                    if outcome == "202":
                        self.results.acknowledged[seq] = node.node_id
                        self.results.run_ids[seq] = response.json()["run_id"]
                        self.results.acknowledged_at[seq] = time.time()
                    else:
                        self.results.refused[seq] = f"{node.node_id}: {outcome}"
                if self.pace:
                    time.sleep(self.pace)

    def start(self) -> EventPoster:
        self._thread.start()
        return self

    @property
    def acknowledged_count(self) -> int:
        with self._lock:
            return len(self.results.acknowledged)

    @property
    def posting(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = 120.0) -> PostResults:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still posting after {timeout} s"
        return self.results


def post_round_robin(
    nodes: list[Node], workflow_id: str, events: dict[int, dict[str, Any]]
) -> dict[int, str]:
    """POST each event (by its number, in order) to the next node; each must answer 202.
    Returns the run ids by number."""
    run_ids: dict[int, str] = {}
    with httpx.Client(timeout=15) as client:
        for index, (seq, event) in enumerate(events.items()):
            node = nodes[index % len(nodes)]
            response = client.post(node.events_url(workflow_id), json=event)
            assert response.status_code == 202, f"{node.node_id}: {response.text}"
            run_ids[seq] = response.json()["run_id"]
    return run_ids


class StreamReader:
    """One SSE subscriber, reading `url` from a thread into `events` until `close()`.

    The thread looks at `close()` after each chunk it reads, so the nodes must
    send keepalives often (`OUTBOUND_SSE_KEEPALIVE` well under a second).
    """

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.status: int | None = None
        self.ended = False  # the server closed the stream
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._read, name="test-sse-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        parser = SseParser()
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(10.0)) as client,
                client.stream("GET", self.url, headers=self.headers) as response,
            ):
                self.status = response.status_code
                if response.status_code != 200:
                    return
                for chunk in response.iter_raw():
                    events = parser.feed(chunk)
                    with self._lock:
                        self._events.extend(events)
                    if self._closing.is_set():
                        return
                self.ended = True
        except Exception as error:  # shown by wait_for
            self.error = error

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Event]:
        """Wait until at least `count` events arrived; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events
            if len(events) >= count:
                return events
            trouble = self.error or self.ended or self.status not in (None, 200)
            assert not trouble, f"{self.url}: status {self.status}, error {self.error!r}"
            assert time.monotonic() < deadline, (
                f"{len(events)} of {count} events from {self.url} after {timeout} s: {events[-3:]}"
            )
            time.sleep(0.02)

    def close(self) -> list[Event]:
        """Disconnect (at the next chunk); return the events read."""
        self._closing.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), f"{self.url}: the reader did not stop"
        return self.events


class PausableProxy:
    """A TCP proxy on loopback to the server at `target_url` (nats://host:port) whose
    server-to-client direction can be held: a node connected through it hears nothing from
    NATS after `pause()` (what arrives waits in the proxy) while all else it does goes on,
    until `resume()`. `close()` ends every connection and thread."""

    def __init__(self, target_url: str) -> None:
        parts = urllib.parse.urlsplit(target_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 4222)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"{parts.scheme}://127.0.0.1:{self._listener.getsockname()[1]}"
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="test-proxy", daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _address = self._listener.accept()
                server = socket.create_connection(self._target)
            except OSError:  # closed
                return
            with self._lock:
                self._sockets += [client, server]
                if self._closed:
                    return
            self._start(self._pump, client, server, None)
            self._start(self._pump, server, client, self._flowing)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, flowing: threading.Event | None) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if flowing is not None:
                    flowing.wait()
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, threads = list(self._sockets), list(self._threads)
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(5)


@dataclass
class ClusterCase:
    """One test's cluster and destinations: its cluster name on the shared nats-server, the
    HTTP sink path and SQL table its runs send to, and the readers of what arrived there."""

    journal: str
    cluster: str
    database_url: str
    db: Db
    responder: SwitchableResponder
    sink_url: str
    path: str
    table: str
    work_dir: Path

    def start_nodes(
        self, count: int, first: int = 1, journal: str | None = None, **settings: Any
    ) -> Nodes:
        """`count` ready nodes `node-1` .. `node-N` (from `node-<first>` on), each with a data
        dir of its own; `journal`: another URL of the case's NATS (a `PausableProxy`'s);
        `settings`: more `OUTBOUND_*` of every node, by lower-case name (`sse_history=5`)."""
        plans = [
            NodePlan(
                f"node-{n}",
                self.cluster,
                journal or self.journal,
                self.database_url,
                self.work_dir / f"node-{n}",
                settings=settings,
            )
            for n in range(first, first + count)
        ]
        return Nodes(plans, self.work_dir)

    def event(self, seq: int, delay: float = 0.0) -> dict[str, Any]:
        """The body of one event: cluster_app's workflows send `seq` on to this case's sink and
        table, after `delay` s."""
        return {"seq": seq, "url": self.sink_url + self.path, "table": self.table, "delay": delay}

    def arrivals(self) -> tuple[Arrivals, Arrivals]:
        """What the HTTP sink and the SQL table received, by `seq`."""
        return http_arrivals(self.responder, self.path), sql_arrivals(self.db, self.table)

    def wait_for_delivery(
        self, acknowledged: set[int], timeout: float, describe: Callable[[], str]
    ) -> float:
        """Poll until every acknowledged number arrived at both; return when (time.time())."""
        deadline = time.monotonic() + timeout
        while True:
            http, sql = self.arrivals()
            missing = {"http": http.missing(acknowledged), "sql": sql.missing(acknowledged)}
            if not any(missing.values()):
                return time.time()
            assert time.monotonic() < deadline, (
                f"not delivered after {timeout} s: http {missing['http'][:20]} "
                f"({len(missing['http'])}), sql {missing['sql'][:20]} ({len(missing['sql'])})\n"
                + describe()
            )
            time.sleep(0.25)

    def runs_per_node(self) -> Counter[str]:
        """How many distinct events each node ran, from the `node` of each HTTP request."""
        bodies = [request.json() for request in self.responder.delivered_to(self.path)]
        return Counter(node for _seq, node in {(body["seq"], body["node"]) for body in bodies})
