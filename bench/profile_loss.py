"""Where the time of the exact fused AdaKD loss goes, against plain fused KD: a profile and the matrix-work floor.

    python bench/profile_loss.py                       # 476 tokens (a batch of 8 Dolly answers), V 50,304, H 128/256
    python bench/profile_loss.py --tokens 1700 --profile

``forward_hidden`` forward + backward for plain KD (``selection: all``, fixed τ) and AdaKD (LATF at its starting
ratio 1, IDTS), then the output-layer products alone at the same shapes: the student's and teacher's logits and the
student's two backward products. The floor is plain KD's time plus AdaKD's extra products (pass 1's student and
teacher logits for every token); the rest of AdaKD's extra time is the scores, the selection and the per-token
temperatures. ``--profile`` prints ``torch.profiler``'s table of each, by operator.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import adakd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=476)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--h-student", type=int, default=128)
    p.add_argument("--h-teacher", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    n, v = args.tokens, args.vocab
    hs = torch.randn(n, args.h_student).requires_grad_(True)
    ws = (torch.randn(v, args.h_student) * (2 / args.h_student**0.5)).requires_grad_(True)
    ht = torch.randn(n, args.h_teacher)
    wt = torch.randn(v, args.h_teacher) * (2 / args.h_teacher**0.5)
    labels = torch.randint(0, v, (n,))

    def run(name: str, **kwargs) -> float:
        loss_fn = adakd.AdaKDLoss("rkl", reduction="sum", **kwargs)

        def once() -> None:
            loss_fn.forward_hidden(hs, ws, ht, wt, labels).backward()
            hs.grad = ws.grad = None

        once()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                once()
            print(f"\n{name}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return statistics.median(times)

    def product(a: torch.Tensor, b: torch.Tensor) -> float:
        a @ b
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        return (time.perf_counter() - start) / 3

    plain = run("plain KD", selection="all", temperature="fixed")
    ada = run("AdaKD", selection="latf")
    student, teacher = product(hs.detach(), ws.detach().t()), product(ht, wt.t())
    grad = torch.randn(n, v)
    backward = product(grad, ws.detach()) + product(grad.t(), hs.detach())
    floor = plain + student + teacher
    print(
        f"{n} tokens, V {v}, H {args.h_student}/{args.h_teacher}: plain KD {1e3 * plain:.0f} ms, AdaKD "
        f"{1e3 * ada:.0f} ms ({ada / plain:.2f}x); products: student {1e3 * student:.0f}, teacher {1e3 * teacher:.0f}, "
        f"backward {1e3 * backward:.0f} ms; floor {floor / plain:.2f}x; AdaKD is {ada / floor - 1:+.0%} above it"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
