"""GPU parity checks for the AdaKD losses, with nothing but PyTorch installed (no pytest): run by gpu_check.sh.

    PYTHONPATH=src python bench/gpu_check.py                 # on a CUDA device
    PYTHONPATH=src python bench/gpu_check.py --device cpu    # the same checks on the CPU, small (used by the tests)

Checks, each printed with its measured error and tolerance; the exit status is 1 if any fails:

1. ``forward`` on the device (float32) against ``forward`` on the CPU in float64: the device's kernels agree;
2. ``forward_hidden`` against ``forward`` on materialised logits, float32, for several bases, selections,
   temperatures and chunk sizes, with -inf padded vocabularies and a larger teacher: loss and every gradient;
3. the same with ``impl="compile"``;
4. bfloat16: ``forward_hidden``'s error against float64 no worse than the naive bfloat16 path's;
5. memory (CUDA only): ``forward_hidden``'s extra peak memory at most 1/8 of the naive path's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import adakd

CONFIGS = [  # (name, AdaKDLoss kwargs, chunk_size)
    ("rkl-latf-default", {"base": "rkl"}, None),
    ("rkl-fixed-0.75", {"base": "rkl", "selection": "fixed", "ratio": 0.75}, 7),
    ("fkl-plain", {"base": "fkl", "selection": "all", "temperature": "fixed"}, 64),
    ("jsd-reverse", {"base": "jsd", "selection": "fixed", "ratio": 0.5, "temperature": "reverse"}, 33),
    ("abkd-fixed", {"base": "abkd", "selection": "fixed", "ratio": 0.6}, 16),
    ("akl-nmtkd", {"base": "akl", "indicator": "nmtkd", "selection": "fixed", "ratio": 0.6}, 16),
    ("tvd-ce", {"base": "tvd", "indicator": "ce", "selection": "cosine", "ratio": 0.5, "total_steps": 10}, 1000),
]


def make_inputs(n: int, h_s: int, h_t: int, v_real: int, v_s: int, v_t: int, device: str, seed: int = 0):
    """Hidden states, weights and biases on ``device`` in float32; -inf biases pad the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h_s, generator=g)
    ws = torch.randn(v_s, h_s, generator=g) * (2.0 / h_s**0.5)
    ht = torch.randn(n, h_t, generator=g)
    wt = torch.randn(v_t, h_t, generator=g) * (2.0 / h_t**0.5)
    bs = torch.randn(v_s, generator=g) * 0.3
    bt = torch.randn(v_t, generator=g) * 0.3
    bs[v_real:] = -math.inf
    bt[v_real:] = -math.inf
    labels = torch.randint(0, v_real, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.15] = -100
    return [t.to(device) for t in (hs, ws, bs, ht, wt, bt, labels)]


def logits_of(hs, ws, bs, ht, wt, bt):
    return torch.addmm(bs, hs, ws.t()), torch.addmm(bt, ht, wt.t())


def loss_and_grads(kwargs, inputs, *, fused: bool, chunk_size=None, impl="torch", dtype=None):
    hs, ws, bs, ht, wt, bt, labels = inputs
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    params = [cast(t).detach().clone().requires_grad_(True) for t in (hs, ws, bs)]
    ht, wt, bt = cast(ht), cast(wt), cast(bt)
    loss_fn = adakd.AdaKDLoss(**kwargs)
    if fused:
        loss = loss_fn.forward_hidden(
            params[0], params[1], ht, wt, labels, student_bias=params[2], teacher_bias=bt,
            chunk_size=chunk_size, impl=impl,
        )  # fmt: skip
    else:
        loss = loss_fn(*logits_of(params[0], params[1], params[2], ht, wt, bt), labels)
    grads = torch.autograd.grad(loss, params)
    return loss.detach().double().cpu(), [g.detach().double().cpu() for g in grads]


def rel_errors(a, b) -> tuple[float, float]:
    (la, ga), (lb, gb) = a, b
    loss_err = abs(la.item() - lb.item()) / max(abs(lb.item()), 1e-12)
    grad_err = max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(ga, gb, strict=True))
    return loss_err, grad_err


class Report:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def check(self, name: str, value: float, tol: float) -> None:
        ok = value <= tol and not math.isnan(value)
        self.rows.append({"check": name, "value": value, "tol": tol, "ok": ok})
        print(f"{'PASS' if ok else 'FAIL'}  {name:<58} {value:.2e} <= {tol:.1e}", flush=True)

    @property
    def failed(self) -> int:
        return sum(not r["ok"] for r in self.rows)


def run_checks(device: str, small: bool, report: Report, compile_check: bool = True) -> None:
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity means float32 products
        torch.backends.cudnn.allow_tf32 = False
    n, h_s, h_t, v_real, v_s, v_t = (45, 16, 24, 90, 96, 104) if small else (777, 256, 384, 8000, 8064, 8192)
    inputs = make_inputs(n, h_s, h_t, v_real, v_s, v_t, device)
    cpu64 = [t.cpu().double() if t.is_floating_point() else t.cpu() for t in inputs]

    for name, kwargs, chunk in CONFIGS:
        dev = loss_and_grads(kwargs, inputs, fused=False)
        ref = loss_and_grads(kwargs, cpu64, fused=False)
        le, ge = rel_errors(dev, ref)
        report.check(f"{name}: forward on {device} vs float64 CPU, loss", le, 1e-5)
        report.check(f"{name}: forward on {device} vs float64 CPU, grads", ge, 1e-4)
        fused = loss_and_grads(kwargs, inputs, fused=True, chunk_size=chunk)
        le, ge = rel_errors(fused, dev)
        report.check(f"{name}: forward_hidden vs forward (chunk {chunk}), loss", le, 1e-5)
        report.check(f"{name}: forward_hidden vs forward (chunk {chunk}), grads", ge, 1e-4)

    if compile_check:
        kwargs = {"base": "rkl", "selection": "fixed", "ratio": 0.75}
        eager = loss_and_grads(kwargs, inputs, fused=True, chunk_size=64)
        compiled = loss_and_grads(kwargs, inputs, fused=True, chunk_size=64, impl="compile")
        le, ge = rel_errors(compiled, eager)
        report.check("impl='compile' vs impl='torch', loss", le, 1e-5)
        report.check("impl='compile' vs impl='torch', grads", ge, 1e-4)

    kwargs = {"base": "rkl", "selection": "fixed", "ratio": 0.75}
    bf16_in = [t.bfloat16() if t.is_floating_point() else t for t in inputs]
    exact = loss_and_grads(
        kwargs, [t.cpu().double() if t.is_floating_point() else t.cpu() for t in bf16_in], fused=False
    )
    naive = rel_errors(loss_and_grads(kwargs, bf16_in, fused=False), exact)
    fused = rel_errors(loss_and_grads(kwargs, bf16_in, fused=True, chunk_size=64), exact)
    report.check("bf16 forward_hidden loss error minus 1.1x naive bf16's", fused[0] - 1.1 * naive[0], 1e-5)
    report.check("bf16 forward_hidden grad error minus 1.1x naive bf16's", fused[1] - 1.1 * naive[1], 1e-3)

    if device.startswith("cuda"):
        n, v, h_s, h_t = 4096, 32768, 512, 1024
        big = make_inputs(n, h_s, h_t, v, v, v + 128, device, seed=1)
        peaks = {}
        for fused_flag in (False, True):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            loss_and_grads(kwargs, big, fused=fused_flag)
            torch.cuda.synchronize()
            peaks[fused_flag] = torch.cuda.max_memory_allocated() - before
        report.check(f"extra peak memory fused/naive at {n}x{v}", peaks[True] / peaks[False], 1 / 8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="small shapes (default on the CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the impl='compile' check")
    p.add_argument("--out", default=None, help="folder for gpu_check.json")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --device cpu for the CPU variant)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"adakd {adakd.__version__}, torch {torch.__version__}, device {args.device} ({name})")
    report = Report()
    start = time.perf_counter()
    run_checks(args.device, args.small or args.device == "cpu", report, compile_check=not args.no_compile)
    print(f"{len(report.rows) - report.failed} passed, {report.failed} failed in {time.perf_counter() - start:.0f} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps({"device": name, "checks": report.rows}, indent=2))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
