"""`outbound demo`, the README's first command, end to end against its embedded services; and
`outbound demo --nodes 3`, the same as a local cluster of `outbound serve` processes."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyte
import pytest

from outbound.cli import main
from outbound.demo_view import TimelinePoint, write_chart


def test_demo_delivers_everything_and_reads_it_back(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "outbound.cli", "demo", "--events", "60", "--chart", "c.png"],
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
    assert "\x1b" not in output  # not a terminal: plain lines, no escape codes
    progress = [line for line in output.splitlines() if line.startswith("[")]
    assert 1 <= len(progress) <= 5, output  # a few plain progress lines, not one per tick
    assert all(len(line) <= 100 for line in progress), progress
    assert_explained(summary)
    assert "Chart of deliveries over time per destination: c.png" in summary
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_demo_chart_without_matplotlib_says_which_extra_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the bench extra were missing
    timeline = [TimelinePoint(0.5, {"http": 1}), TimelinePoint(1.0, {"http": 3})]
    message = write_chart(str(tmp_path / "c.png"), timeline)
    assert "--chart needs matplotlib" in message and "outbound-runtime[bench]" in message
    assert not (tmp_path / "c.png").exists()


def assert_explained(summary: str) -> None:
    """The summary names and explains its numbers, and points at a real run and the stream."""
    text = " ".join(summary.split())  # as one paragraph: sentences may wrap
    runs = re.search(r"Runs: (\d+) for (\d+) events: (\d+) posted \+ (\d+) emit listener", text)
    assert runs, text
    total, events, posted, listener = map(int, runs.groups())
    assert total == posted + listener and posted == events, text
    http = re.search(r"(\d+) requests for (\d+) sends: (\d+) retries, because", text)
    assert http, text
    requests, sends, retries = map(int, http.groups())
    assert requests == sends + retries, text
    assert "answers 503 to ~10% of first attempts on purpose" in text, text
    run_id = re.search(r"GET (http://127\.0\.0\.1:\d+)/runs/(\S+)", text)
    assert run_id, text
    assert f"{run_id.group(1)}/inspector#run={run_id.group(2)}" in text, text
    assert re.search(r"succeeded, (\d+) of \1 sends delivered", text), text  # read back
    assert "/pipelines/p_orders/sse" in text and "--keep-running" in text, text


@pytest.mark.parametrize(
    "options", [["--events", "60"], ["--nodes", "2", "--events", "40"]], ids=["one", "nodes"]
)
def test_demo_on_an_80x24_terminal_updates_in_place_and_ends_with_the_summary(
    tmp_path: Path, options: list[str]
) -> None:
    output = run_in_terminal(
        [sys.executable, "-m", "outbound.cli", "demo", *options],
        columns=80,
        rows=24,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "OUTBOUND_DATA_DIR": str(tmp_path / "data")},
    )
    # What a person sees at the end: the 80x24 screen.
    screen = pyte.Screen(80, 24)
    pyte.ByteStream(screen).feed(output)
    shown = [line.rstrip() for line in screen.display]
    while shown and not shown[-1]:
        shown.pop()
    assert shown[-1] == "Everything was delivered.", "\n".join(shown)
    on_screen = "\n".join(shown)
    assert "/inspector#run=" in on_screen and "--keep-running" in on_screen, on_screen
    # Everything it drew, on a screen wider and taller than the one it was told about: a line
    # longer than 80 columns would show past column 80 instead of wrapping, and a view that
    # scrolled instead of redrawing in place would show its header more than once.
    tall = pyte.Screen(200, 500)
    pyte.ByteStream(tall).feed(output)
    drawn = [line.rstrip() for line in tall.display]
    too_wide = [line for line in drawn if len(line) > 80]
    assert not too_wide, "\n".join(drawn)
    headers = [line for line in drawn if "accepted" in line and "retrying" in line]
    assert len(headers) == 1, "\n".join(drawn)
    live = "\n".join(drawn)
    for destination in ("http", "s3", "sql", "sse", "email", "emit"):
        assert re.search(rf"^{destination} +\d+ +\d+ +\d+ +\d+ +(\d+|-) .*100%$", live, re.M), live
    if "--nodes" in options:  # and a row per node, under its own header, drawn once too
        assert len([line for line in drawn if line.startswith("node ") and "posted" in line]) == 1
        for node_id in ("node-1", "node-2"):
            assert re.search(rf"^{node_id} +20 +\d+ +\d+ +\d+ +\d+$", live, re.M), live
    summary = live[live.index("Summary after") :]
    assert_explained(summary)


def run_in_terminal(
    command: list[str], columns: int, rows: int, cwd: Path, env: dict[str, str]
) -> bytes:
    """Run `command` on a pseudo-terminal of `columns` x `rows`; everything it wrote."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(
        command,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        cwd=cwd,
        env={**env, "TERM": "xterm-256color"},
    )
    os.close(terminal)
    output = bytearray()
    deadline = time.monotonic() + 110
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the process closed the terminal (it exited)
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=30) == 0, output.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    return bytes(output)


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
    assert_explained(summary)
    assert "\x1b" not in output  # not a terminal: plain lines


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
