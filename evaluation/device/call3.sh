# call 3: the scan and the start of a whole-model run after the scale fixes, on a random SmolLM2-shaped model (the real GGUF needs two calls)
set -o pipefail
source .gpu/env.sh
timeout 40 $PY .gpu/make_shape.py /tmp/shape 2>&1 | tail -1
date -u +%s > /tmp/t0
timeout -s INT -k 10 ${RUN_T:-100} $PY -m n2g run --model /tmp/shape --layers all --neurons all --device $DEV --dtype $DTYPE --out /tmp/run 2>&1 | tr '\r' '\n' | grep -v -E 'it/s\]$' > $OUT/run3.log
echo "elapsed $(( $(date -u +%s) - $(cat /tmp/t0) )) s"; grep -v "^fit layer" $OUT/run3.log | tail -12; grep "^fit layer" $OUT/run3.log | tail -3
echo "neuron results: $(find /tmp/run -name 'result.json' | wc -l)"; free -g | head -2
