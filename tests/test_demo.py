"""`outbound demo`, the README's first command, end to end against its embedded services."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


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
