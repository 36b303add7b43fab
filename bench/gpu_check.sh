#!/usr/bin/env bash
# GPU parity checks and the GPU benchmarks, in one call, on a single H100 or H200.
#
#   bash bench/gpu_check.sh            # results in $OUT (the device tool's folder) or bench/gpu-results/
#
# Needs only PyTorch (with Triton) on the machine: adakd runs from src/ through PYTHONPATH, and no network is used.
# A Liger-Kernel wheel placed beside this script (bench/liger_kernel-*.whl) is installed without dependencies for
# the comparison. Budget: under 12 minutes (each step has a timeout: 90 s, 150 s, 50 s, 3 × 60 s, then 240 s).
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
# 4. The engines at world size 1 on the GPU, fused loss: FSDP2 and DeepSpeed ZeRO-3 (when installed) against a plain
#    run of the tiny config; the parameters after 4 steps must agree (tests/train/distributed/worker.py, as the CPU tests).
smoke="loss.fused=true loss.selection=all loss.temperature=fixed training.max_steps=4 training.save_strategy=no"
smoke="$smoke training.use_cpu=false training.ddp_backend=nccl training.disable_tqdm=true data.synthetic_size=64"
smoke="$smoke training.per_device_train_batch_size=8"
engines="single fsdp2"
python -c "import deepspeed" 2>/dev/null && engines="$engines deepspeed" || echo "deepspeed not installed: no ZeRO-3 smoke"
for engine in $engines; do
  # shellcheck disable=SC2086
  timeout 60 torchrun --nproc_per_node=1 --master_port=29650 "$root/tests/train/distributed/worker.py" --engine "$engine" \
    --out "$out/engines/$engine" training.output_dir="$out/engines/$engine/run" $smoke 2>&1 \
    | tail -n 3 | tee -a "$out/engines.txt" || status=1
done
python - "$out/engines" <<'PY' 2>&1 | tee -a "$out/engines.txt" || status=1
import sys, pathlib, torch
root = pathlib.Path(sys.argv[1])
ref = torch.load(root / "single" / "rank0.pt", weights_only=False)["params"]
for folder in sorted(p for p in root.iterdir() if p.name != "single" and (p / "rank0.pt").is_file()):
    got = torch.load(folder / "rank0.pt", weights_only=False)["params"]
    rel = max(float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)) for k in ref)
    print(f"{folder.name}: max relative parameter difference to the plain run {rel:.2e}")
    assert rel < 1e-3, folder.name
PY
# 5. Whole optimizer steps through AdaKDTrainer at the Qwen2-1.5B / 7B widths and vocabulary (2 decoder layers each,
#    bf16, synthetic instructions): plain KD, AdaKD and one-pass AdaKD on the logits and fused paths, each variant in
#    a fresh process (bench/step_bench.py).
timeout 240 python "$here/step_bench.py" --device cuda --steps 5 --warmup 2 --json "$out/step_bench.json" 2>&1 \
  | tee "$out/step_bench.txt" || status=1
echo "gpu_check.sh: exit $status; results in $out"
exit $status
