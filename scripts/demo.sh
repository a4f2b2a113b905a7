#!/usr/bin/env bash
# Set up, then distil a handful of neurons of the embedded SmolLM2 on the embedded corpus and print their scores.
# Extra arguments are passed to `n2g run` (e.g. --layers 0,5,10 --neurons 0-15).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/n2g run --layers 0,5 --neurons 0-3 --max-excerpts 512 --out graphs/demo "$@"
