"""Time and extra peak memory of AdaKDLoss against plain logit KD, measured side by side in one run.

    python bench/loss_bench.py                                  # CPU, and CUDA when present
    python bench/loss_bench.py --tokens 16384 --vocab 151936 --device cuda --dtype bfloat16

Each variant runs forward + backward on the same random logits ``[tokens, vocab]`` (10% of the labels masked).
See bench/harness.py for how time and memory are measured. Ratios are against ``plain-kd`` of the same device in
the same run; record results with the machine in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adakd  # noqa: E402
import harness  # noqa: E402

VARIANTS = {
    "plain-kd": "masked mean of the base divergence (adakd.divergence), τ = 1",
    "adakd-all": "AdaKDLoss(selection='all', temperature='fixed'): plain KD through the module",
    "adakd": "AdaKDLoss(selection='fixed', ratio=R, temperature='inverse'): scores, top-k, IDTS",
}


def make_loss(variant: str, args: argparse.Namespace):
    if variant == "plain-kd":

        def plain(s, t, y):
            mask = y != -100
            return adakd.divergence(args.base, s[mask], t[mask]).mean()

        return plain
    if variant == "adakd-all":
        return adakd.AdaKDLoss(args.base, selection="all", temperature="fixed")
    return adakd.AdaKDLoss(args.base, selection="fixed", ratio=args.ratio, temperature="inverse")


def run_variant(variant: str, args: argparse.Namespace, device: str) -> dict:
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    # Drawn directly in the target dtype so that building the inputs leaves no large temporaries behind.
    s = torch.randn(args.tokens, args.vocab, generator=g, device=device, dtype=dtype).mul_(2.0).requires_grad_(True)
    t = torch.randn(args.tokens, args.vocab, generator=g, device=device, dtype=dtype).mul_(2.0)
    y = torch.randint(0, args.vocab, (args.tokens,), generator=g, device=device)
    y[torch.rand(args.tokens, generator=g, device=device) < 0.1] = -100
    loss_fn = make_loss(variant, args)

    def once() -> None:
        loss_fn(s, t, y).backward()
        s.grad = None

    return {
        "variant": variant,
        "device": device,
        **harness.measure(once, device, args.repeats, args.warmup, args.measure),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--base", default="rkl")
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cpu, plus cuda when present)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--measure", default="both", choices=["both", "memory", "time"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:  # one CPU measurement in a fresh process
        print(json.dumps(run_variant(args.worker, args, "cpu")))
        return 0

    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}; valid: {', '.join(VARIANTS)}")
    results = []
    requested_dtype = args.dtype
    for device in devices:
        args.dtype = requested_dtype or ("bfloat16" if device == "cuda" else "float32")
        print(
            f"\n{device} ({harness.device_name(device)}), {args.dtype}, tokens={args.tokens}, vocab={args.vocab}, "
            f"base={args.base}, ratio={args.ratio}, torch {torch.__version__}"
        )
        rows = []
        for variant in variants:
            if device == "cpu":
                flags = ["--worker", variant]
                for key in ("tokens", "vocab", "base", "ratio", "repeats", "warmup", "dtype"):
                    flags += [f"--{key}", str(getattr(args, key))]
                row = harness.cpu_row(__file__, flags)
            else:
                row = harness.cuda_row(lambda v=variant, d=device: run_variant(v, args, d), variant)
            row.update(dtype=args.dtype, device_name=harness.device_name(device))
            rows.append(row)
        harness.print_table(rows, "plain-kd", VARIANTS)
        results += rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
