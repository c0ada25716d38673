"""Shared fixtures: real servers on loopback and runtimes that are always stopped."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_support import ClusterCase
from journal_support import Child, ChildPlan, SwitchableResponder, kill_nats_servers_using
from sql_support import Db

from outbound import Config, Runtime
from outbound.actors.ids import new_id
from outbound.embedded import HttpSink, Responder, S3Server


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "outbound-data"


@pytest.fixture
def make_runtime(data_dir: Path) -> Iterator[Callable[..., Runtime]]:
    """`make_runtime(**config)` -> a started Runtime, stopped (drained briefly) at teardown."""
    made: list[Runtime] = []

    def make(start: bool = True, **overrides: Any) -> Runtime:
        overrides.setdefault("data_dir", data_dir)
        overrides.setdefault("retry_base", 0.01)
        overrides.setdefault("retry_cap", 0.2)
        runtime = Runtime(Config(**overrides))
        made.append(runtime)
        if start:
            runtime.start()
        return runtime

    yield make
    for runtime in made:
        runtime.stop(drain=True, timeout=5)


@pytest.fixture
def make_sink() -> Iterator[Callable[..., HttpSink]]:
    """`make_sink(responder=None)` -> a started HttpSink on 127.0.0.1, stopped at teardown."""
    sinks: list[HttpSink] = []

    def make(responder: Responder | None = None, **kwargs: Any) -> HttpSink:
        sink = HttpSink(responder, **kwargs).start()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.stop()


@pytest.fixture
def sink(make_sink: Callable[..., HttpSink]) -> HttpSink:
    return make_sink()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real Postgres for the whole session: `OUTBOUND_DATABASE_URL` if set, else embedded.

    Shared by every test: tests use their own table names.
    """
    import os

    from outbound.embedded import EmbeddedPostgres

    url = os.environ.get("OUTBOUND_DATABASE_URL")
    if url:
        yield url
        return
    with EmbeddedPostgres() as server:
        yield server.url


@pytest.fixture
def db(postgres_url: str) -> Db:
    """The test's own connection to the test Postgres (tests/sql_support.py)."""
    return Db(postgres_url)


@pytest.fixture
def table() -> str:
    """A table name no other test uses."""
    return f"t_{new_id()[:16]}"


@pytest.fixture
def make_sql_runtime(
    make_runtime: Callable[..., Runtime], postgres_url: str
) -> Callable[..., Runtime]:
    """A started runtime loading into (and querying) the test Postgres, with a `load`
    workflow sending `event["rows"]` to `event["table"]` (`sql_support.load`)."""

    def make(**overrides: Any) -> Runtime:
        overrides.setdefault("database_url", postgres_url)
        overrides.setdefault("batch_max_age", 0.2)
        rt = make_runtime(start=False, **overrides)

        @rt.workflow("load")
        def load(event: dict[str, Any], ctx: Any) -> None:
            for payload in event["rows"]:
                ctx.send.sql(table=event["table"], payload=payload)

        return rt.start()

    return make


@pytest.fixture
def s3_server() -> Iterator[S3Server]:
    """A real S3-protocol server (moto) on 127.0.0.1, stopped at teardown."""
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_client(s3_server: S3Server) -> Iterator[Any]:
    """boto3, an independent client, to read what the S3 destination wrote."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
    yield client
    client.close()


@pytest.fixture
def make_api() -> Iterator[Callable[..., Any]]:
    """`make_api(runtime, **kwargs)` -> its HTTP API served by hypercorn (trio) on 127.0.0.1.

    The server runs on the runtime's trio loop; it is stopped at teardown.
    """
    from outbound.api import ApiServer

    servers: list[ApiServer] = []

    def make(runtime: Runtime, **kwargs: Any) -> ApiServer:
        server = ApiServer(runtime, **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """`start(plan, env, label)` -> a Child; every child, and any nats-server it left, is
    killed at teardown (after the test has made its own assertions about them)."""
    started: list[Child] = []

    def start(plan: ChildPlan, env: dict[str, str], label: str) -> Child:
        child = Child(plan, env, tmp_path / f"{label}.log")
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()
    kill_nats_servers_using(tmp_path)


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every test must stop the threads it started (runtimes, loops, servers)."""
    before = set(threading.enumerate())
    yield
    leaked = [
        thread
        for thread in threading.enumerate()
        if thread not in before and thread.is_alive() and not thread.name.startswith("asyncio_")
    ]
    for thread in leaked:
        thread.join(timeout=5)
    still = [thread.name for thread in leaked if thread.is_alive()]
    assert not still, f"threads left running after the test: {still}"


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real nats-server with JetStream on 127.0.0.1, shared by a module's tests
    (each test journals under a cluster name of its own: `journal_cluster`)."""
    from nats_support import NatsServer

    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


@pytest.fixture
def journal_cluster() -> str:
    """A cluster name of this test's own: its journal streams are `<NAME>_SENDS`, ..."""
    return f"t{new_id()[:12]}"


@pytest.fixture
def make_case(
    postgres_url: str,
    db: Db,
    make_sink: Callable[..., HttpSink],
    journal_cluster: str,
    table: str,
    tmp_path: Path,
) -> Callable[[str], ClusterCase]:
    """`make_case(journal_url)`: a cluster test's case (tests/cluster_support.py) on the
    NATS at `journal_url`: its cluster name, HTTP sink and SQL table."""

    def make(journal: str) -> ClusterCase:
        responder = SwitchableResponder()
        sink_url = make_sink(responder).url
        return ClusterCase(
            journal,
            journal_cluster,
            postgres_url,
            db,
            responder,
            sink_url,
            "/hook",
            table,
            tmp_path,
        )

    return make


@pytest.fixture
def case(nats_server: Any, make_case: Callable[[str], ClusterCase]) -> ClusterCase:
    """A cluster test's case on the module's nats-server (nodes: `case.start_nodes(n)`)."""
    return make_case(nats_server.url)
