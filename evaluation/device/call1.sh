# call 1: keep the first half of the GGUF on the machine; smoke-test n2g on CUDA with a random SmolLM2-shaped model
set -o pipefail
source .gpu/env.sh
mkdir -p /root/n2g_keep && cp .gpu/gguf.part00 /root/n2g_keep/ && ls -la /root/n2g_keep
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc; free -g | head -2; lscpu | grep -E 'Model name|^CPU\(s\)'; $PY -c "import sys,torch,transformers;print(sys.version.split()[0],'torch',torch.__version__,'transformers',transformers.__version__,torch.cuda.is_available())"; } 2>&1 | tee $OUT/machine.txt
timeout 60 $PY .gpu/make_shape.py /tmp/shape 2>&1 | tail -2
timeout 60 $PY evaluation/forward.py --model /tmp/shape --device $DEV --dtype $DTYPE --shapes ${SHAPES:-1x64,64x64,512x64,4096x32} 2>&1 | grep -v Loading | tee $OUT/forward_random.txt
time timeout -s INT -k 10 75 $PY -m n2g run --model /tmp/shape --layers 0,29 --neurons 0-15 --device $DEV --dtype $DTYPE --max-excerpts ${SMOKE_EXCERPTS:-512} --out /tmp/smoke -q 2>&1 | tail -40 | tee $OUT/smoke.txt
ls /tmp/smoke | head; find /tmp/smoke -name '*.json' | wc -l
