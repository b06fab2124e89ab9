#!/bin/bash
# The GPU checks of issues 14 and 15 as one short script (about 5 minutes on one H100/H200): run it on a GPU node
# (or the device machine) from the repository root, with the project installed.
#   tools/gpu_checks.sh [OUT_DIR]
# 1. tests/test_gpu.py: bf16 + megatron's distributed optimizer, overlapped DP communication, resume exact from a
#    routine (dp_reshardable) checkpoint written synchronously and asynchronously, the final reshardable save,
#    fused attention against megatron's, a whole cell through submitit, the Llama 1.3B preflight at TP=1;
# 2. tools/bench_gpu.py at 1.3B: tokens/s and MFU against plain PyTorch in the same run (target: ratio >= 1.05).
set -euo pipefail
out=${1:-${OUT:-gpu-checks}}
mkdir -p "$out" && out=$(cd "$out" && pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.txt"
(cd tools && python bench_gpu.py --presets 1.3B --json "$out/bench_gpu.json") 2>&1 | tee "$out/bench_gpu.txt"
