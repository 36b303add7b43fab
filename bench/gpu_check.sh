#!/usr/bin/env bash
# GPU parity checks and the GPU benchmarks, in one call, on a single H100 or H200.
#
#   bash bench/gpu_check.sh            # results in $OUT (the device tool's folder) or bench/gpu-results/
#
# Needs only PyTorch (with Triton) on the machine: adakd runs from src/ through PYTHONPATH, and no network is used.
# A Liger-Kernel wheel placed beside this script (bench/liger_kernel-*.whl) is installed without dependencies for
# the comparison. Budget: under 5 minutes (each step has a timeout: 90 s, 150 s and 50 s).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-$here/gpu-results}
mkdir -p "$out"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

shopt -s nullglob
wheels=("$here"/liger_kernel-*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  python -m pip install --no-deps --no-index --quiet "${wheels[0]}" || echo "could not install ${wheels[0]}; no Liger comparison"
fi

status=0
# 1. Parity: the device against float64, forward_hidden against forward, compile, bf16, memory.
timeout 90 python "$here/gpu_check.py" --device cuda --out "$out" 2>&1 | tee "$out/gpu_check.txt" || status=1
# 2. The fused loss at the Qwen2-7B -> 1.5B shape: naive vs fused (eager, compiled) vs Liger's chunked JSD.
timeout 150 python "$here/fused_bench.py" --device cuda --compile --json "$out/fused_bench.json" 2>&1 \
  | tee "$out/fused_bench.txt" || status=1
# 3. The loss on materialised logits (8,192 tokens: 16,384 would need ~130 GB for the naive float32 temporaries).
timeout 50 python "$here/loss_bench.py" --device cuda --tokens 8192 --vocab 151936 --json "$out/loss_bench.json" 2>&1 \
  | tee "$out/loss_bench.txt" || status=1
echo "gpu_check.sh: exit $status; results in $out"
exit $status
