# call 2: the real SmolLM2 (GGUF rejoined from both calls) on the GPU: forward throughput, whole layers fitted
# (RUN_LAYERS, default 0,15,29: 4,608 neurons, about 3 min by the projection; cut at RUN_T seconds), speed engines
set -o pipefail
source .gpu/env.sh
G=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf; mkdir -p /tmp/gguf
cat ${KEEP:-/root/n2g_keep}/gguf.part00 .gpu/gguf.part01 > $G && (cd /tmp/gguf && sha256sum $G | tee /dev/stderr | cut -c1-64 | diff - <(cut -c1-64 $OLDPWD/.gpu/gguf.sha256)) || { echo "GGUF rejoin failed"; ls -la ${KEEP:-/root/n2g_keep} /tmp; exit 3; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; } 2>&1 | tee $OUT/machine2.txt
echo "== forward"; timeout 120 $PY evaluation/forward.py --model $G --device $DEV --dtype $DTYPE --shapes ${SHAPES:-1x64,64x64,512x64,4096x32,16384x64} 2>&1 | grep -v Loading | tee $OUT/forward.txt
echo "== run"; date -u +%s > /tmp/t0
time timeout -s INT -k 20 ${RUN_T:-300} $PY -m n2g run --model $G --layers ${RUN_LAYERS:-0,15,29} --neurons ${RUN_NEURONS:-all} --device $DEV --dtype $DTYPE --out /tmp/run 2>&1 | tr '\r' '\n' | grep -v -E 'it/s\]$|s/it\]$' > $OUT/run.log; echo "exit $?"
echo "elapsed $(( $(date -u +%s) - $(cat /tmp/t0) )) s"; tail -25 $OUT/run.log
echo "neuron results: $(find /tmp/run -name 'result.json' | wc -l) result.json, $(find /tmp/run -name '*.json' | wc -l) json"; du -sh /tmp/run /tmp/run/* 2>/dev/null | head; ls /tmp/run
echo "== speed"; timeout 130 $PY evaluation/speed.py --model $G --device $DEV --dtype $DTYPE ${SPEED_ARGS:---per-layer 2 --max-excerpts 512} 2>&1 | grep -v Loading | tee $OUT/speed.txt
echo "== report"; time timeout -k 5 ${REPORT_T:-45} $PY -m n2g report /tmp/run -q 2>&1 | tail -5
