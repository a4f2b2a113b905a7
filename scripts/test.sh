#!/usr/bin/env bash
# Set up (including test needs), then run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export N2G_CACHE="${N2G_CACHE:-$PWD/.cache/n2g}"
exec .venv/bin/python -m pytest -q "$@"
