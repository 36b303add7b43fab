"""Time and extra peak memory of AdaKDLoss against plain logit KD, measured side by side in one run.

    python bench/loss_bench.py                                  # CPU, and CUDA when present
    python bench/loss_bench.py --tokens 16384 --vocab 151936 --device cuda --dtype bfloat16

Each variant runs forward + backward on the same random logits ``[tokens, vocab]`` (10% of the labels masked).
Times are the median of ``--repeats`` runs after ``--warmup`` runs. Extra peak memory is what the loss needs
beyond its inputs: on CUDA ``max_memory_allocated`` minus the allocation before the call; on CPU each variant runs
in a fresh subprocess and reports the growth of its peak resident set (``ru_maxrss``) over the peak reached while
building the inputs, so variants cannot see each other's freed memory. Ratios are against ``plain-kd`` of the
same device in the same run; record results with the machine in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import adakd

VARIANTS = {
    # name: (description, factory(args) -> loss(student, teacher, labels))
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


def make_inputs(args: argparse.Namespace, device: str):
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    # Drawn directly in the target dtype so that building the inputs leaves no large temporaries behind.
    s = torch.randn(args.tokens, args.vocab, generator=g, device=device, dtype=dtype).mul_(2.0)
    t = torch.randn(args.tokens, args.vocab, generator=g, device=device, dtype=dtype).mul_(2.0)
    y = torch.randint(0, args.vocab, (args.tokens,), generator=g, device=device)
    y[torch.rand(args.tokens, generator=g, device=device) < 0.1] = -100
    return s.requires_grad_(True), t, y


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(variant: str, args: argparse.Namespace, device: str) -> dict:
    """Measure one variant in this process (call in a fresh process on CPU)."""
    s, t, y = make_inputs(args, device)
    loss_fn = make_loss(variant, args)
    cuda = device.startswith("cuda")

    def once() -> None:
        loss = loss_fn(s, t, y)
        loss.backward()
        s.grad = None

    # The peak is measured on the first call, before anything else runs in this process.
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        once()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
    else:
        before = _peak_rss_bytes()
        once()
        extra = _peak_rss_bytes() - before
    for _ in range(args.warmup):
        once()
    times = []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        once()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"variant": variant, "device": device, "ms": 1e3 * statistics.median(times), "extra_bytes": extra}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


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
    args = p.parse_args(argv)

    if args.worker:  # one CPU measurement in a fresh process
        args.dtype = args.dtype or "float32"
        print(json.dumps(run_variant(args.worker, args, "cpu")))
        return 0

    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}; valid: {', '.join(VARIANTS)}")
    results = []
    for device in devices:
        dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
        print(
            f"\n{device} ({device_name(device)}), {dtype}, tokens={args.tokens}, vocab={args.vocab}, "
            f"base={args.base}, ratio={args.ratio}, torch {torch.__version__}"
        )
        rows = []
        for variant in variants:
            if device == "cpu":
                cmd = [sys.executable, __file__, "--worker", variant, "--dtype", dtype]
                for key in ("tokens", "vocab", "base", "ratio", "repeats", "warmup"):
                    cmd += [f"--{key}", str(getattr(args, key))]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
            else:
                args.dtype = dtype
                row = run_variant(variant, args, device)
                torch.cuda.empty_cache()
            row.update(dtype=dtype, device_name=device_name(device))
            rows.append(row)
        base = next((r for r in rows if r["variant"] == "plain-kd"), rows[0])
        print(f"{'variant':<11} {'time (ms)':>10} {'extra peak (MB)':>16} {'time ×':>8} {'memory ×':>9}  what")
        for r in rows:
            r["time_ratio"] = r["ms"] / base["ms"]
            r["memory_ratio"] = r["extra_bytes"] / max(base["extra_bytes"], 1)
            print(
                f"{r['variant']:<11} {r['ms']:>10.1f} {r['extra_bytes'] / 2**20:>16.0f} {r['time_ratio']:>8.2f} "
                f"{r['memory_ratio']:>9.2f}  {VARIANTS[r['variant']]}"
            )
        results += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
