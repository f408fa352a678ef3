#!/usr/bin/env bash
# CUDA checks of the memory strategies, for a machine with one GPU (torch, timm, triton and pytest installed).
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh                 # run from the repository root
#   OUT=/tmp/gpu_out PARTS="max_batch" bash benchmarks/gpu_check.sh   # only some parts
#
# Parts, in order (each with its own time limit; a failing part does not stop the next one):
#   pytest_cuda       tests/memory/test_memory_cuda.py: every strategy against normal mode in float64, autocast,
#                     the Triton kernels against the torch path, the compiled strategies against eager normal mode
#   fp32_b64 fp32_b256 bf16_b64 bf16_b256
#                     DenseNet-121, 224x224: normal mode, torchvision's memory_efficient=True, fused, fused_lean
#   compiled_b64 compiled_b256
#                     torch.compile rows: normal mode compiled, with activation_memory_budget 0.5 / 0.3 / 0.1,
#                     and the fused strategies compiled (fp32)
#   max_batch         largest batch per mode within 70 GiB
# The default parts (all but compiled_b256 and max_batch) take at most 10 minutes; the other two are a
# second run (PARTS="compiled_b256 max_batch"), at most 10 minutes. Each writes NAME.log (and NAME.json) into $OUT,
# with env.txt; a benchmark prints and saves each mode's row as it is measured, so a part stopped at its time
# limit keeps the modes it finished. The kernel path can be compared with DENSENET_ZOO_KERNELS=torch.
set -u
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
PARTS=${PARTS:-"pytest_cuda fp32_b64 fp32_b256 bf16_b64 bf16_b256 compiled_b64"}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, note the exit status
    local name=$1 limit=$2
    shift 2
    case " $PARTS " in *" $name "*) ;; *) return ;; esac
    echo "== $name: $* (limit ${limit}s)" > "$OUT/$name.log"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit status $rc after $((SECONDS - start)) s" >> "$OUT/$name.log"
    cp "$WORK/$name/profile.json" "$OUT/$name.json" 2>/dev/null
    cp "$WORK/$name/max_batch.json" "$OUT/$name.json" 2>/dev/null
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1
    git log --oneline -1 2>/dev/null
} > "$OUT/env.txt"

part pytest_cuda 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/memory/test_memory_cuda.py

EAGER=none,torchvision_memory_efficient,fused,fused_lean
for batch in 64 256; do
    part "fp32_b$batch" 45 "$PY" benchmarks/memory.py --device cuda --batch-size "$batch" --modes "$EAGER" --no-reference \
        --steps 5 --out "$WORK/fp32_b$batch"
done
for batch in 64 256; do
    part "bf16_b$batch" 45 "$PY" benchmarks/memory.py --device cuda --batch-size "$batch" --modes "$EAGER" --no-reference \
        --steps 5 --autocast bfloat16 --out "$WORK/bf16_b$batch"
done
# One compile per mode, with a cold cache (normal mode's took 4 minutes on a 2-core CPU, the fused ones under 20 s):
# ours right after the compiled baseline, then the budgets, so that a part stopped at its limit keeps ours (the rows
# are saved as they are measured).
COMPILED=none:compile,fused:compile,fused_lean:compile,fused_lean,none:compile=0.5,none:compile=0.1,none:compile=0.3
for batch in 64 256; do
    part "compiled_b$batch" 260 "$PY" benchmarks/memory.py --device cuda --batch-size "$batch" --modes "$COMPILED" \
        --no-reference --steps 5 --out "$WORK/compiled_b$batch"
done

# Largest batch per mode within 70 GiB (fits an H100 and an H200 alike), from 64 up to 4096 (the target is 4x normal
# mode's 573), to 32 images: about four probes per mode where memory follows a line.
# The JSON is rewritten as each mode finishes, so a search cut short keeps the modes it finished.
part max_batch 300 "$PY" benchmarks/memory.py --device cuda --batch-size 64 --no-reference --steps 1 \
    --modes none,fused_lean,fused,torchvision_memory_efficient --max-batch 70GiB --max-batch-limit 4096 \
    --max-batch-resolution 32 --out "$WORK/max_batch"
rm -rf "$WORK"
ls -l "$OUT"
