#!/usr/bin/env bash
# One prepared GPU session (about 8 minutes on one H100): the device, the fused low-rank kernels
# compiled and checked on CUDA, then the attention benchmark. Everything lands in
# bench/results/<gpu name>/. Run from anywhere: bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr '[:upper:] ' '[:lower:]-' | tr -cd 'a-z0-9._-')
OUT="bench/results/${GPU_NAME}"
mkdir -p "$OUT"
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, go on after a failure
    local name=$1 limit=$2
    shift 2
    echo "== ${name} (limit ${limit} s)"
    if ! timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/${name}.txt"; then
        echo "== ${name} FAILED (see $OUT/${name}.txt)"
        failed=1
    fi
}

step nvidia-smi 15 nvidia-smi
step versions 25 python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
# compiled kernels against the float64 references (CUDA variant of the tests; no interpreter), and a
# LoRA block compiled with the backend on the GPU against its float64 CPU low-rank path
step kernel_tests 150 env -u TRITON_INTERPRET python -m pytest -q -k cuda tests/ops/test_lowrank_triton.py --durations=10
step model_test 120 env -u TRITON_INTERPRET python -m pytest -q tests/models/test_cuda.py
# bf16, B = 1, H = 16, d = 64: SDPA (flash) against the fused kernels, forward + backward, peak
# memory and the guard's cost (its cond predicate is read on the host)
step attention 240 python bench/attention.py --device cuda --dtype bfloat16 --heads 16 \
    --lengths 2048 4096 8192 16384 32768 65536 --causal both --repeats 5 --out "$OUT"
# the chunked scan path on the GPU (host-side loop), for comparison
step attention_scan 120 python bench/attention.py --device cuda --dtype bfloat16 --heads 16 \
    --lengths 2048 8192 32768 --causal true --repeats 3 --lowrank-kernels scan --out "$OUT/scan"

echo "== results in $OUT"
exit "$failed"
