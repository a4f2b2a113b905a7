#!/usr/bin/env bash
# Builds .gpu/ (ignored by git) for the device checks in this folder: the device machine takes at most
# 64 MiB of working tree per call, so the packaged SmolLM2 GGUF (94 MiB) travels in two halves (call1
# keeps the first on the machine, call2 brings the second and rejoins them); the gguf wheel (missing
# there), Python 3.11's pydoc_data (the embedded corpus as it is here; the machine has 3.12's) and the
# model's config and tokenizer (for a random SmolLM2-shaped model built there).
set -euo pipefail
cd "$(dirname "$0")/../.."
gd=$(git rev-parse --git-common-dir); mkdir -p "$gd/info"
grep -qx '/.gpu/' "$gd/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$gd/info/exclude"
rm -rf .gpu && mkdir -p .gpu/py311 .gpu/shape
cp evaluation/device/*.sh evaluation/device/make_shape.py .gpu/
cp -r "$(.venv/bin/python -c 'import pydoc_data, os; print(os.path.dirname(pydoc_data.__file__))')" .gpu/py311/
rm -rf .gpu/py311/pydoc_data/__pycache__
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .gpu "gguf==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
G=$(.venv/bin/python -c 'from n2g.models import default_gguf_path; print(default_gguf_path())')
split -b 56000000 -d "$G" .gpu/gguf.part
sha256sum "$G" > .gpu/gguf.sha256
C=$(.venv/bin/python -c 'from n2g.models import _gguf_cache_path, default_gguf_path; print(_gguf_cache_path(default_gguf_path()))')
[ -f "$C/config.json" ] || .venv/bin/n2g info -q > /dev/null  # de-quantise once to get config and tokenizer
cp "$C"/config.json "$C"/tokenizer.json "$C"/tokenizer_config.json .gpu/shape/
du -sh .gpu/*
