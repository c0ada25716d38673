#!/usr/bin/env bash
# Set up (first run only) and run the Outbound demo: `scripts/demo.sh [outbound demo options]`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/outbound demo "$@"
