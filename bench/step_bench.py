"""Whole optimizer steps through AdaKDTrainer: plain KD, AdaKD and one-pass AdaKD, on the logits and fused paths.

    python bench/step_bench.py --data DIR/train_0 --tokenizer DIR/gpt2    # CPU: Dolly token shards, GPT-2 vocabulary
    python bench/step_bench.py --device cuda --data DIR/train_0 --tokenizer DIR/gpt2   # GPU: the Qwen2 shape

What one step is here: ``AdaKDTrainer``'s own training step (student forward and backward, the teacher's forward,
the loss, the optimizer), built by ``adakd.train.build_trainer`` from a config, as ``adakd train`` runs it. Each
variant runs in a fresh process. Its time per optimizer step is the median over ``--steps`` steps after ``--warmup``
steps, then the median over ``--rounds`` interleaved rounds of all the variants. Its peak memory is the growth of
the peak resident set over the whole training call (CPU, with the allocator setting of ``bench/harness.py``, in a
separate process) or of CUDA's allocator peak. Ratios are to plain KD on the fused path.

Shapes. CPU (the default): Qwen2-architecture student hidden 128 / teacher hidden 256, two layers each, GPT-2's
vocabulary (50,304 rows), batches of 8 Dolly sequences from MiniLLM token shards (``--data``, ``--tokenizer``).
GPU (``--device cuda``): Qwen2-1.5B's and Qwen2-7B's hidden sizes, heads and vocabulary (151,936), with
``--layers`` decoder layers each (default 2: the loss paths differ in the output layer, which keeps its real
size), bfloat16. Without ``--data`` the built-in synthetic instructions and byte tokenizer are used.

``--compare OLD_SRC`` times the same variants under another checkout of adakd too (``PYTHONPATH=OLD_SRC`` in its
workers; e.g. a ``git worktree`` of the commit before a change): each round runs every variant under both, one
right after the other, and the table gives each variant's median time under each and the median over rounds of
the per-round ratio (this code / the other), so a refactoring is proven not to slow any step.

The matrix-work floor printed for AdaKD is what its extra logit products alone would cost: plain KD's measured
step plus the exact path's additional products (pass 1 scores every token, pass 2 repeats the kept tokens'
products) at the measured throughput of plain KD's own output-layer products.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

VARIANTS = {  # name -> (loss section, fused)
    "plain-kd/logits": ({"selection": "all", "temperature": "fixed"}, False),
    "plain-kd/fused": ({"selection": "all", "temperature": "fixed"}, True),
    "adakd/logits": ({}, False),
    "adakd/fused": ({}, True),
    "adakd-one-pass/fused": ({"one_pass": True}, True),
    "adakd-ce0.5/fused": ({"kd_ratio": 0.5}, True),
}
DESCRIPTIONS = {
    "plain-kd/logits": "selection all, fixed τ; materialised logits",
    "plain-kd/fused": "selection all, fixed τ; forward_hidden",
    "adakd/logits": "LATF + IDTS; materialised logits",
    "adakd/fused": "LATF + IDTS; forward_hidden, exact (two passes)",
    "adakd-one-pass/fused": "LATF + IDTS; forward_hidden(one_pass=True), approximate",
    "adakd-ce0.5/fused": "as adakd/fused with kd_ratio 0.5: CE rides in the fused passes",
}
SHAPES = {
    "cpu": {
        "vocab": 50304,
        "student": {"hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 4, "num_key_value_heads": 2},
        "teacher": {"hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4, "num_key_value_heads": 2},
        "dtype": "float32",
    },
    "cuda": {
        "vocab": 151936,
        "student": {"hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
                    "num_key_value_heads": 2},
        "teacher": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                    "num_key_value_heads": 4},
        "dtype": "bfloat16",
    },
}  # fmt: skip


def config_spec(variant: str, args: argparse.Namespace, device: str, out: str) -> dict:
    """The run's config (YAML values) for one variant."""
    shape = SHAPES["cuda" if device.startswith("cuda") else "cpu"]
    loss, fused = VARIANTS[variant]

    def model(sizes: dict, seed: int) -> dict:
        config = {"model_type": "qwen2", "vocab_size": shape["vocab"], "num_hidden_layers": args.layers,
                  "max_position_embeddings": 1024, "tie_word_embeddings": True, **sizes}  # fmt: skip
        return {"config": config, "tokenizer": args.tokenizer or "byte", "seed": seed, "dtype": shape["dtype"]}

    steps = args.warmup + args.steps
    if args.data:
        data = {"source": "shards", "path": args.data, "limit": steps * args.batch_size,
                "max_length": args.max_length, "max_prompt_length": args.max_length // 2}  # fmt: skip
    else:
        data = {"source": "synthetic", "synthetic_size": steps * args.batch_size}
    return {
        "student": model(shape["student"], 0),
        "teacher": model(shape["teacher"], 1),
        "data": data,
        "loss": {"base": "rkl", "fused": fused, **loss},
        "training": {
            "output_dir": out, "max_steps": steps, "per_device_train_batch_size": args.batch_size,
            "learning_rate": 1e-4, "save_strategy": "no", "report_to": "none", "logging_steps": 10_000,
            "disable_tqdm": True, "use_cpu": not device.startswith("cuda"), "dataloader_num_workers": 0, "seed": 0,
            "bf16": device.startswith("cuda"),
        },
    }  # fmt: skip


def run_variant(variant: str, args: argparse.Namespace, device: str) -> dict:
    """Train one variant; its median step time (and, per ``--measure``, its extra peak memory)."""
    from transformers import TrainerCallback

    from adakd.train import build_trainer, load_config

    out = tempfile.mkdtemp(prefix="adakd-step-bench-")
    try:
        trainer = build_trainer(load_config(data=config_spec(variant, args, device, out)))
        times: list[float] = []

        kept: list[tuple[int, int]] = []

        class KeptTokens(TrainerCallback):
            def on_step_end(self, *a, **k):
                report = trainer.loss_fn.last_report
                kept.append((report.valid_tokens, report.kept_tokens))

        trainer.add_callback(harness.step_timer(times, device))
        trainer.add_callback(KeptTokens())
        row = {"variant": variant, "device": device}
        if args.measure == "memory":
            row["extra_bytes"] = harness.extra_peak_bytes(lambda: trainer.train(), device)
            return row
        if device.startswith("cuda"):
            row["extra_bytes"] = harness.extra_peak_bytes(lambda: trainer.train(), device)
        else:
            trainer.train()
        row["ms"] = 1e3 * statistics.median(times[args.warmup :])
        row["valid_tokens"] = statistics.fmean(n for n, _ in kept[args.warmup :])
        row["kept_tokens"] = statistics.fmean(k for _, k in kept[args.warmup :])
        return row
    finally:
        shutil.rmtree(out, ignore_errors=True)


def head_floor(rows: dict[str, dict], device: str) -> float | None:
    """The step time (ms) AdaKD's exact path would take if its only extra cost were its additional output-layer
    products (see the module docstring), or None without the rows it needs."""
    plain, ada = rows.get("plain-kd/fused"), rows.get("adakd/fused")
    if plain is None or ada is None:
        return None
    shape = SHAPES["cuda" if device.startswith("cuda") else "cpu"]
    h_s, h_t, v = shape["student"]["hidden_size"], shape["teacher"]["hidden_size"], shape["vocab"]
    n, r = round(ada["valid_tokens"]), ada["kept_tokens"] / ada["valid_tokens"]
    t = _product_seconds(n, h_s, h_t, v, device)
    # Plain KD: student and teacher logits and the student's two backward products, once per valid token. AdaKD:
    # pass 1 (student and teacher logits) for every valid token, pass 2 (all four) for the kept share r.
    extra = t["student"] + t["teacher"] - (1 - r) * (t["student"] + t["teacher"] + t["backward"])
    return plain["ms"] + 1e3 * extra


def _product_seconds(n: int, h_s: int, h_t: int, vocab: int, device: str) -> dict[str, float]:
    """Seconds of one step's output-layer products at ``n`` tokens on this device: the student's and the teacher's
    logits ([n, H] @ [H, V]) and the student's two backward products (into its hidden states and its weight)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    def seconds(fn) -> float:
        fn()
        harness._sync(device)
        start = time.perf_counter()
        for _ in range(3):
            fn()
        harness._sync(device)
        return (time.perf_counter() - start) / 3

    hs, ht = (torch.randn(n, h, device=device, dtype=dtype) for h in (h_s, h_t))
    ws, wt = (torch.randn(vocab, h, device=device, dtype=dtype) for h in (h_s, h_t))
    g = torch.randn(n, vocab, device=device, dtype=dtype)
    return {
        "student": seconds(lambda: hs @ ws.t()),
        "teacher": seconds(lambda: ht @ wt.t()),
        "backward": seconds(lambda: g @ ws) + seconds(lambda: g.t() @ hs),
    }


def _worker_flags(variant: str, args: argparse.Namespace, device: str) -> list[str]:
    flags = [
        "--worker",
        variant,
        "--device",
        device,
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--layers",
        str(args.layers),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--measure",
        "time",
    ]
    if args.data:
        flags += ["--data", args.data, "--tokenizer", args.tokenizer]
    return flags


def compare(args: argparse.Namespace, device: str) -> int:
    """``--compare``: each variant under this code and under ``args.compare``'s, back to back in every round."""
    old_src = str(Path(args.compare).resolve())
    if not (Path(old_src) / "adakd" / "__init__.py").is_file():
        raise SystemExit(f"step_bench: error: --compare {args.compare}: no adakd package there")
    new_src = str(Path(__file__).resolve().parent.parent / "src")
    times: dict[str, dict[str, list[float]]] = {v: {"old": [], "new": []} for v in args.variants}
    for round_ in range(args.rounds):
        for variant in args.variants:
            order = ("old", "new") if round_ % 2 == 0 else ("new", "old")  # alternate who goes first
            for code in order:
                env = {"PYTHONPATH": old_src if code == "old" else new_src}
                row = harness.run_isolated(__file__, _worker_flags(variant, args, device), env=env)
                times[variant][code].append(row["ms"])
            ratio = times[variant]["new"][-1] / times[variant]["old"][-1]
            print(
                f"  round {round_ + 1}, {variant}: old {times[variant]['old'][-1] / 1e3:.3f} s, new "
                f"{times[variant]['new'][-1] / 1e3:.3f} s, new/old {ratio:.3f}",
                flush=True,
            )
    rows = []
    for variant in args.variants:
        old, new = times[variant]["old"], times[variant]["new"]
        ratios = [n / o for n, o in zip(new, old, strict=True)]
        rows.append(
            {
                "variant": variant,
                "old_ms": statistics.median(old),
                "new_ms": statistics.median(new),
                "ratio": statistics.median(ratios),
                "round_ratios": ratios,
            }
        )
    base_old = next((r["old_ms"] for r in rows if r["variant"] == "plain-kd/fused"), rows[0]["old_ms"])
    base_new = next((r["new_ms"] for r in rows if r["variant"] == "plain-kd/fused"), rows[0]["new_ms"])
    print(f"old: {old_src}\nnew: {new_src}")
    print(
        "| variant | old s/step | old × plain fused | new s/step | new × plain fused | new / old (median of rounds) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {DESCRIPTIONS[r['variant']]} | {r['old_ms'] / 1e3:.3f} | {r['old_ms'] / base_old:.2f} | "
            f"{r['new_ms'] / 1e3:.3f} | {r['new_ms'] / base_new:.2f} | {r['ratio']:.3f} "
            f"({', '.join(f'{x:.3f}' for x in r['round_ratios'])}) |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--data", default=os.environ.get("ADAKD_DOLLY_SHARDS"), help="MiniLLM token-shard prefix")
    p.add_argument("--tokenizer", default=os.environ.get("ADAKD_GPT2_TOKENIZER"), help="the shards' tokenizer")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the time is their median")
    p.add_argument("--json", default=None)
    p.add_argument("--compare", default=None, metavar="OLD_SRC", help="also time each variant under this adakd src")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--measure", default="both", choices=["both", "memory", "time"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if bool(args.data) != bool(args.tokenizer):
        p.error("--data and --tokenizer go together (the shards' token ids need their tokenizer)")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        print(json.dumps(run_variant(args.worker, args, device)))
        return 0

    shape = SHAPES["cuda" if device.startswith("cuda") else "cpu"]
    print(
        f"{device} ({harness.device_name(device)}), torch {torch.__version__}; vocabulary {shape['vocab']}, hidden "
        f"{shape['student']['hidden_size']}/{shape['teacher']['hidden_size']}, {args.layers} layers, "
        f"{shape['dtype']}; batch {args.batch_size} × ≤{args.max_length} tokens of "
        f"{args.data or 'synthetic instructions'}; median of {args.steps} steps after {args.warmup}"
    )
    if args.compare:
        return compare(args, device)
    rows = {}
    # Rounds interleave the variants (A B C, A B C, ...): a machine whose speed drifts over minutes (a shared VM)
    # then slows every variant alike, and the median over rounds drops a round that caught a slow spell.
    for round_ in range(args.rounds):
        for variant in args.variants:
            flags = ["--worker", variant, "--device", device, "--batch-size", str(args.batch_size), "--max-length",
                     str(args.max_length), "--layers", str(args.layers), "--steps", str(args.steps), "--warmup",
                     str(args.warmup)]  # fmt: skip
            if args.data:
                flags += ["--data", args.data, "--tokenizer", args.tokenizer]
            if device != "cpu":
                row = harness.run_isolated(__file__, flags)
            elif round_ == 0:
                row = harness.cpu_row(__file__, flags)
            else:
                row = {**rows[variant], **harness.run_isolated(__file__, [*flags, "--measure", "time"])}
            row.update(device_name=harness.device_name(device))
            rows.setdefault(variant, row).setdefault("round_ms", []).append(row["ms"])
            print(f"  round {round_ + 1}, {variant}: {row['ms'] / 1e3:.2f} s/step, extra peak "
                  f"{row['extra_bytes'] / 2**30:.2f} GB", flush=True)  # fmt: skip
    rows = list(rows.values())
    for row in rows:
        row["ms"] = statistics.median(row["round_ms"])
    harness.print_table(rows, "plain-kd/fused", DESCRIPTIONS)
    by_name = {r["variant"]: r for r in rows}
    floor = head_floor(by_name, device)
    if floor is not None and "adakd/fused" in by_name:
        base = by_name["plain-kd/fused"]["ms"]
        measured = by_name["adakd/fused"]["ms"]
        print(
            f"AdaKD exact (fused): {measured / base:.2f}x plain KD; its matrix-work floor {floor / base:.2f}x "
            f"(plain KD + the extra output-layer products at the measured throughput); "
            f"{measured / floor - 1:+.0%} above it"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
