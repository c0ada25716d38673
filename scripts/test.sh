#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite: `scripts/test.sh [pytest options]`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
