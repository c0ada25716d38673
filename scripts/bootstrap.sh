#!/usr/bin/env bash
# Create .venv (once) and install Outbound with its dev extras into it.
# Shared by scripts/demo.sh and scripts/test.sh; needs only python3 (>= 3.11) and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.outbound-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # The distribution was called `outbound` before it became `outbound-runtime`:
  # its editable install would keep the old top-level names importable.
  .venv/bin/python -m pip uninstall --quiet --yes outbound >/dev/null 2>&1 || true
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  touch "$stamp"
fi
