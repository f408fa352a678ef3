#!/usr/bin/env bash
# CUDA checks of the memory strategies, for a machine with one GPU (torch, timm and pytest installed).
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh      # run from the repository root
#
# Writes at most 8 files into $OUT: env.txt, pytest_cuda.log, memory_fp32.{log,json},
# memory_bf16.{log,json}, max_batch.{log,json}. Each part has its own time limit (about 6 minutes
# in all) and a failing part does not stop the next one.
set -u
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, note the exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* (limit ${limit}s)" > "$OUT/$name.log"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit status $rc after $((SECONDS - start)) s" >> "$OUT/$name.log"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1
    git log --oneline -1 2>/dev/null
} > "$OUT/env.txt"

part pytest_cuda 60 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/memory/test_memory_cuda.py

# DenseNet-121, batch 64, 224x224: normal, torchvision's two modes and every strategy (fp32, then bf16 autocast).
part memory_fp32 60 "$PY" benchmarks/memory.py --device cuda --batch-size 64 --modes all --steps 5 --out "$WORK/fp32"
cp "$WORK/fp32/profile.json" "$OUT/memory_fp32.json" 2>/dev/null
part memory_bf16 60 "$PY" benchmarks/memory.py --device cuda --batch-size 64 --modes all --steps 5 --autocast bfloat16 --out "$WORK/bf16"
cp "$WORK/bf16/profile.json" "$OUT/memory_bf16.json" 2>/dev/null

# Largest batch per mode within 70 GiB (fits an H100 and an H200 alike), doubling from 64 up to 2048 then bisecting.
# The JSON is rewritten as each mode finishes, so a search cut short keeps the modes it finished.
part max_batch 250 "$PY" benchmarks/memory.py --device cuda --batch-size 64 --no-reference --steps 1 \
    --modes none,fused_lean,fused,torchvision_memory_efficient --max-batch 70GiB --max-batch-limit 2048 --out "$WORK/mb"
cp "$WORK/mb/max_batch.json" "$OUT/max_batch.json" 2>/dev/null
rm -rf "$WORK"
ls -l "$OUT"
