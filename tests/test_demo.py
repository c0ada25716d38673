"""`outbound demo`, the README's first command, end to end against its embedded services; and
`outbound demo --nodes 3`, the same as a local cluster of `outbound serve` processes."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from outbound.cli import main


def test_demo_delivers_everything_and_reads_it_back(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "outbound.cli", "demo", "--events", "60"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # dead letters, if any, land here, not in the checkout
        env={"PATH": "/usr/bin:/bin", "OUTBOUND_DATA_DIR": str(tmp_path / "data")},
    )
    output = finished.stdout
    assert finished.returncode == 0, output + finished.stderr
    assert "/pipelines/p_orders/sse" in output
    summary = output[output.index("Summary after") :]
    for destination in ("http", "s3", "sql", "email", "sse", "emit"):
        line = next(line for line in summary.splitlines() if line.strip().startswith(destination))
        sent, found = line.split()[1:3]
        assert int(sent) == int(found) > 0, line
    assert "Everything was delivered." in summary


def test_demo_nodes_runs_a_local_cluster_and_one_sse_client_sees_every_node(
    tmp_path: Path,
) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "outbound.cli", "demo", "--nodes", "3", "--events", "36"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "OUTBOUND_DATA_DIR": str(tmp_path / "data")},
    )
    output = finished.stdout
    assert finished.returncode == 0, output + finished.stderr
    assert "Everything was delivered." in output
    per_node = output[output.index("events posted round-robin") :].splitlines()
    rows = {line.split()[0]: line.split() for line in per_node if line.strip().startswith("node-")}
    assert sorted(rows) == ["node-1", "node-2", "node-3"], output
    for node_id, (_, posted, runs, *_delivered) in rows.items():
        assert int(posted) == 12, (node_id, output)  # round-robin
        assert int(runs) > 0, (node_id, output)  # every node ran some
    summary = output[output.index("Summary after") :]
    sse = next(line for line in summary.splitlines() if line.strip().startswith("sse"))
    assert sse.split()[1:3] == ["36", "36"], sse
    assert "from 3 nodes" in sse, sse  # one subscriber, on node-1, sees every node's events


def test_demo_nodes_must_be_a_positive_count(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "-2", "three", "99"):
        with pytest.raises(SystemExit) as exited:
            main(["demo", "--nodes", bad])
        assert exited.value.code == 2
        error = capsys.readouterr().err
        assert "--nodes must be a whole number from 1 to" in error, error
        assert repr(bad) in error, error


def test_demo_nodes_stops_every_node_and_nats_on_ctrl_c(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        demo = subprocess.Popen(
            [sys.executable, "-m", "outbound.cli", "demo", "--nodes", "2", "--duration", "60"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "OUTBOUND_DATA_DIR": str(data_dir)},
            # As at a terminal: Ctrl-C raises KeyboardInterrupt even if this runner ignores it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        output = wait_for_line(log_path, "SSE stream on node-1", demo, timeout=60)
        addresses = re.findall(r"(?:http|nats)://(127\.0\.0\.1):(\d+)", output)
        assert len(addresses) >= 3, output  # NATS and both nodes
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 130, log_path.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert "Interrupted: every node and the NATS server are stopped." in log_path.read_text()
    for host, port in addresses:  # nothing serves there any more
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=2).close()
    assert not list(data_dir.iterdir())  # the run's directory is removed


def wait_for_line(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> str:
    """The output so far, once it holds `text` (the process must still run)."""
    deadline = time.monotonic() + timeout
    while True:
        output = path.read_text(errors="replace")
        if text in output:
            return output
        assert process.poll() is None, output
        assert time.monotonic() < deadline, output
        time.sleep(0.1)
