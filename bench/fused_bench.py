"""The fused, chunked AdaKD loss (forward_hidden) against the naive one, side by side in one run.

    python bench/fused_bench.py                      # CPU target shape: 4,096 tokens, V 32,768, H 512/1,024, fp32
    python bench/fused_bench.py --device cuda        # GPU target shape: 16,384 tokens, Qwen2-7B -> 1.5B, bf16

Every variant computes the distillation loss from the final hidden states, forward + backward, including the
lm_head matrix products (the student's with gradients into its hidden states and weight), at ratio r:

- ``naive``: logits = hidden @ weightᵀ materialised for both models, then ``AdaKDLoss.forward``;
- ``fused``: ``AdaKDLoss.forward_hidden`` (two chunked passes, ``impl="torch"``);
- ``fused-compile``: the same with ``impl="compile"`` (``--compile``);
- ``fused-one-pass``: ``forward_hidden(one_pass=True)``, the approximation that takes the score threshold and the
  IDTS median from the previous micro-batch (here the same batch again: the unmeasured first call runs the exact
  passes and leaves the state), so every logit product is done once (``--compile`` applies to it too);
- ``liger-jsd``: Liger-Kernel's chunked fused-linear JSD (plain KD, β = 1, torch.compile), when installed.

The teacher has 128 padding rows more than the student (cropped), as Qwen2-7B has over Qwen2-1.5B.
See bench/harness.py for how time and memory are measured; record results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adakd  # noqa: E402
import harness  # noqa: E402

DESCRIPTIONS = {
    "naive": "materialised logits + AdaKDLoss.forward",
    "fused": "AdaKDLoss.forward_hidden, impl='torch'",
    "fused-compile": "AdaKDLoss.forward_hidden, impl='compile'",
    "fused-one-pass": "forward_hidden(one_pass=True): previous batch's threshold and median (approximate)",
    "liger-jsd": "Liger chunked fused-linear JSD (plain KD, beta=1, compiled)",
}
PRESETS = {  # device type -> (tokens, vocab, student hidden, teacher hidden, dtype)
    "cpu": (4096, 32768, 512, 1024, "float32"),
    "cuda": (16384, 151936, 1536, 3584, "bfloat16"),
}
TEACHER_PADDING = 128


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def liger_available() -> bool:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception:
        return False
    return True


def run_variant(variant: str, args: argparse.Namespace, device: str) -> dict:
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).mul_(scale)

    # Logits with a standard deviation of about 2, like a trained model's.
    hs = randn(args.tokens, args.h_student).requires_grad_(True)
    ws = randn(args.vocab, args.h_student, scale=2.0 / args.h_student**0.5).requires_grad_(True)
    ht = randn(args.tokens, args.h_teacher)
    wt = randn(args.vocab + TEACHER_PADDING, args.h_teacher, scale=2.0 / args.h_teacher**0.5)
    y = torch.randint(0, args.vocab, (args.tokens,), generator=g, device=device)
    y[torch.rand(args.tokens, generator=g, device=device) < 0.1] = -100
    loss_fn = adakd.AdaKDLoss(args.base, selection="fixed", ratio=args.ratio)

    if variant == "naive":

        def loss() -> torch.Tensor:
            with torch.no_grad():
                zt = ht @ wt.t()
            return loss_fn(hs @ ws.t(), zt, y)

    elif variant in ("fused", "fused-compile", "fused-one-pass"):
        impl = "compile" if variant == "fused-compile" or (variant == "fused-one-pass" and args.compile) else "torch"
        one_pass = variant == "fused-one-pass"

        def loss() -> torch.Tensor:
            return loss_fn.forward_hidden(hs, ws, ht, wt, y, chunk_size=args.chunk_size, impl=impl, one_pass=one_pass)

    elif variant == "liger-jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=True)
        wt_cropped = wt[: args.vocab]

        def loss() -> torch.Tensor:
            return liger(hs, ws, ht, wt_cropped, y)

    else:
        raise ValueError(f"unknown variant {variant!r}")

    def once() -> None:
        loss().backward()
        hs.grad = None
        ws.grad = None

    row = {
        "variant": variant,
        "device": device,
        **harness.measure(once, device, args.repeats, args.warmup, args.measure),
    }
    if variant != "liger-jsd":
        row["kept_tokens"] = loss_fn.stats["kept_tokens"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present, else cpu)")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None, help="the student's vocabulary")
    p.add_argument("--h-student", type=int, default=None)
    p.add_argument("--h-teacher", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--base", default="rkl")
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time impl='compile'")
    p.add_argument("--no-liger", action="store_true", help="skip Liger-Kernel even when installed")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--measure", default="both", choices=["both", "memory", "time"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS["cuda" if device.startswith("cuda") else "cpu"]
    for key, value in zip(("tokens", "vocab", "h_student", "h_teacher", "dtype"), preset, strict=True):
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.worker:
        print(json.dumps(run_variant(args.worker, args, "cpu")))
        return 0

    variants = ["naive", "fused"] + (["fused-compile"] if args.compile else []) + ["fused-one-pass"]
    if not args.no_liger and liger_available():
        variants.append("liger-jsd")
    print(
        f"{device} ({harness.device_name(device)}), {args.dtype}, tokens={args.tokens}, vocab={args.vocab} "
        f"(teacher +{TEACHER_PADDING}), hidden {args.h_student}/{args.h_teacher}, base={args.base}, "
        f"ratio={args.ratio}, chunk={args.chunk_size or 'default'}, torch {torch.__version__}"
        + ("" if args.compile else " (fused-one-pass eager)")
    )
    rows = []
    for variant in variants:
        if device == "cpu":
            flags = ["--worker", variant, "--device", "cpu"]
            for key in ("tokens", "vocab", "h_student", "h_teacher", "dtype", "base", "ratio", "repeats", "warmup"):
                flags += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            if args.chunk_size:
                flags += ["--chunk-size", str(args.chunk_size)]
            row = harness.cpu_row(__file__, flags)
        else:
            row = harness.cuda_row(lambda v=variant, d=device: run_variant(v, args, d), variant)
        row.update(dtype=args.dtype, device_name=harness.device_name(device))
        rows.append(row)
    harness.print_table(rows, "naive", DESCRIPTIONS)
    by_name = {r["variant"]: r for r in rows}
    fused, naive, liger = by_name["fused"], by_name["naive"], by_name.get("liger-jsd")
    print(
        f"fused vs naive: time {ratio(fused['ms'], naive['ms']):.2f}x (target <= 1.5x), extra memory "
        f"{ratio(fused['extra_bytes'], naive['extra_bytes']):.3f}x (target <= 0.125x)"
    )
    if liger:
        print(f"fused vs Liger chunked JSD: time {ratio(fused['ms'], liger['ms']):.2f}x (GPU target <= 1.5x)")
        one = by_name["fused-one-pass"]
        print(f"fused-one-pass vs Liger chunked JSD: time {ratio(one['ms'], liger['ms']):.2f}x (moonshot: <= 1x)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
