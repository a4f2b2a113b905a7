# sourced by both calls: installs gguf, sets paths
DEV=${DEV:-cuda}; DTYPE=${DTYPE:-bfloat16}; OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PY=${PY:-python3}
if [ -n "$VENV_LOCAL" ]; then export PYTHONPATH=$PWD; else
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site:$PWD/.gpu/py311
fi
export PYTHONUNBUFFERED=1 N2G_CACHE=/tmp/n2gcache TOKENIZERS_PARALLELISM=false
