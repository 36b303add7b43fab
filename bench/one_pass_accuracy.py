"""How far the one-pass approximation of forward_hidden is from the exact two-pass loss, along a training run.

    python bench/one_pass_accuracy.py                  # CPU, a few tens of seconds
    python bench/one_pass_accuracy.py --selection latf --steps 60

A small student (a linear map of the teacher's hidden states, plus its own lm_head) is trained with the exact
AdaKD loss on a stream of fresh micro-batches, so the difficulty distribution drifts as it learns. At every step
the one-pass loss is evaluated on the same micro-batch and weights, its state carried from the previous
micro-batch as in training. Reported per step, then summarised:

- loss: |one-pass − exact| / exact;
- kept set: Jaccard overlap of the kept tokens (exact: the top-k of this batch; one-pass: this batch's tokens at or
  above the previous batch's k-th score), and the kept count relative to k;
- gradient: cosine similarity of the lm_head weight gradients, and the relative difference of their norms.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

import adakd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="tokens per micro-batch")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--h-student", type=int, default=64)
    p.add_argument("--h-teacher", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--selection", default="fixed", choices=["fixed", "latf"])
    p.add_argument("--base", default="rkl")
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    v, h_s, h_t, n = args.vocab, args.h_student, args.h_teacher, args.tokens
    wt = torch.randn(v, h_t) * (3.0 / h_t**0.5)  # a peaked teacher
    proj = (torch.randn(h_t, h_s) / h_t**0.5).requires_grad_(True)
    ws = (torch.randn(v, h_s) / h_s**0.5).requires_grad_(True)
    opt = torch.optim.Adam([proj, ws], lr=args.lr)
    kwargs = {"base": args.base, "selection": args.selection}
    if args.selection == "fixed":
        kwargs["ratio"] = args.ratio
    else:
        kwargs.update(ema_decay=0.9, tolerance=0.02, min_ratio=0.3)
    exact_fn = adakd.AdaKDLoss(**kwargs)
    one_fn = adakd.AdaKDLoss(one_pass=True, **kwargs)
    one_fn.controller = exact_fn.controller  # one ratio for both, stepped on the exact loss

    rows, prev_scores = [], None
    for step in range(args.steps):
        ht = torch.randn(n, h_t)
        labels = torch.randint(0, v, (n,))
        labels[torch.rand(n) < 0.1] = -100

        hs = ht @ proj
        exact = exact_fn.forward_hidden(hs, ws, ht, wt, labels)
        (g_exact,) = torch.autograd.grad(exact, ws, retain_graph=True)
        approx = one_fn.forward_hidden(hs, ws, ht, wt, labels)
        (g_approx,) = torch.autograd.grad(approx, ws, retain_graph=True)

        with torch.no_grad():
            mask = labels != -100
            scores = adakd.difficulty_scores("hellinger", hs @ ws.t(), ht @ wt.t())[mask]
            k = adakd.adaptive.keep_count(scores.numel(), exact_fn.stats["ratio"])
            exact_set = set(scores.topk(k).indices.tolist())
            if prev_scores is not None:
                k_prev = adakd.adaptive.keep_count(prev_scores.numel(), exact_fn.stats["ratio"])
                threshold = prev_scores.topk(k_prev).values[-1]
                approx_set = set((scores >= threshold).nonzero().squeeze(1).tolist())
                jaccard = len(exact_set & approx_set) / len(exact_set | approx_set)
                cosine = torch.nn.functional.cosine_similarity(g_exact.flatten(), g_approx.flatten(), dim=0).item()
                rows.append(
                    {
                        "step": step,
                        "ratio": exact_fn.stats["ratio"],
                        "loss_exact": exact.item(),
                        "loss_one_pass": approx.item(),
                        "loss_rel_diff": abs(approx.item() - exact.item()) / exact.item(),
                        "jaccard": jaccard,
                        "kept_rel": len(approx_set) / k,
                        "grad_cosine": cosine,
                        "grad_norm_rel_diff": abs(g_approx.norm().item() / g_exact.norm().item() - 1),
                    }
                )
            prev_scores = scores

        opt.zero_grad()
        exact.backward()
        opt.step()
        exact_fn.step()  # LATF (shared with one_fn) advances on the exact loss

    print(
        f"one-pass vs exact forward_hidden: {args.steps} steps of {n} tokens, vocab {v}, hidden {h_s}/{h_t}, "
        f"base {args.base}, selection {args.selection}, torch {torch.__version__}"
    )
    print(
        f"{'step':>4} {'r':>6} {'exact':>9} {'one-pass':>9} {'Δloss':>8} {'Jaccard':>8} {'kept/k':>7} {'grad cos':>9}"
    )
    for r in rows[:: max(1, len(rows) // 10)]:
        print(
            f"{r['step']:>4} {r['ratio']:>6.3f} {r['loss_exact']:>9.4f} {r['loss_one_pass']:>9.4f} "
            f"{r['loss_rel_diff']:>8.2%} {r['jaccard']:>8.3f} {r['kept_rel']:>7.3f} {r['grad_cosine']:>9.5f}"
        )

    for key, what, worst in [
        ("loss_rel_diff", "relative loss difference", max),
        ("jaccard", "kept-set Jaccard overlap", min),
        ("kept_rel", "kept count / k (worst: farthest from 1)", lambda xs: max(xs, key=lambda x: abs(x - 1))),
        ("grad_cosine", "weight-gradient cosine", min),
        ("grad_norm_rel_diff", "weight-gradient norm, relative difference", max),
    ]:
        values = [r[key] for r in rows]
        print(f"{what:<44} mean {statistics.fmean(values):.4g}, worst {worst(values):.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(math.isfinite(r["loss_one_pass"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
