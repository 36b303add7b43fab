"""What the offline teacher cache costs in fidelity: a top-k teacher against the live one, k ∈ {8, 32, 128}.

    python bench/cache_fidelity.py --output outputs/cache-bench                       # demo models, ~15 min on 2 cores
    python bench/cache_fidelity.py --output outputs/cache-bench --dolly DIR/train_0   # + the GPT-2-vocabulary pair
    python bench/cache_fidelity.py --output /tmp/c --quick --skip-train               # smoke check (tests)

Two model pairs:

- the demo's models (``adakd demo``'s tasks, tokenizer, teacher and SFT warm-start student, trained here once);
- with ``--dolly PREFIX`` (MiniLLM token shards of Dolly, GPT-2 tokenizer via ``--tokenizer``): a tiny
  Qwen2-architecture teacher (hidden 256) trained by SFT on the shards and a student (hidden 128) warmed up likewise,
  on the GPT-2 vocabulary (50,304 rows), where top-k is a far smaller share of the vocabulary.

For each pair and each k, on held-out batches (the student and teacher as trained; the cache's default float16
log-probabilities, and float32 for comparison):

- Spearman correlation between the Hellinger difficulty scores from the sparse and from the dense teacher;
- Jaccard overlap of the kept sets at r = 0.5 (the top half by score);
- relative error of the AdaKD loss (RKL, fixed r = 0.5, IDTS c = 0.5) and cosine of the lm_head weight gradient.

End to end (demo models): AdaKD-RKL students trained from the live teacher and from a cache of each k, from the same
warm-start, over the same training seeds, scored with ROUGE-L (sampled, the paper's protocol), mean ± std over the
training seeds and the difference to the live teacher paired by seed. Plus ``adakd cache``'s time, the training time
per optimizer step (live vs cache) and the cache's disk bytes per supervised token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adakd  # noqa: E402
import harness  # noqa: E402
from adakd.sparse import SparseTeacher, sparse_difficulty_scores, sparse_from_logits  # noqa: E402

# --------------------------------------------------------------------------------------------------- fidelity


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), float64."""
    order = x.argsort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64)
    for value in x.unique()[(x.unique(return_counts=True)[1] > 1)]:
        tie = x == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two score vectors."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def jaccard_top(a: torch.Tensor, b: torch.Tensor, ratio: float) -> float:
    """Jaccard overlap of the top ``ratio`` share of each score vector (the kept sets of AdaKD at r = ratio)."""
    k = max(1, int(a.numel() * ratio))
    sa, sb = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    return len(sa & sb) / len(sa | sb)


def _loss_and_grad(zs_hidden, weight, teacher, labels) -> tuple[float, torch.Tensor]:
    w = weight.detach().clone().requires_grad_(True)
    loss_fn = adakd.AdaKDLoss(base="rkl", selection="fixed", ratio=0.5, c=0.5)
    loss = loss_fn(zs_hidden @ w.t(), teacher, labels)
    (grad,) = torch.autograd.grad(loss, w)
    return float(loss), grad


def batch_fidelity(hidden, weight, teacher_logits, labels, k: int, storage: torch.dtype) -> dict[str, float]:
    """The fidelity metrics of one batch: ``hidden [N, H]`` (student's last hidden states at the valid positions),
    ``weight [V_s, H]`` (its lm_head), ``teacher_logits [N, V]`` (cropped to V_s), ``labels [N]``."""
    zs = (hidden @ weight.t()).detach()
    sparse = sparse_from_logits(teacher_logits, k)
    sparse = SparseTeacher(sparse.ids, sparse.logprobs.to(storage), sparse.tail)  # as the cache stores it
    dense_scores = adakd.difficulty_scores("hellinger", zs, teacher_logits)
    sparse_scores = sparse_difficulty_scores("hellinger", zs, sparse)
    dense_loss, dense_grad = _loss_and_grad(hidden, weight, teacher_logits, labels)
    sparse_loss, sparse_grad = _loss_and_grad(hidden, weight, sparse, labels)
    cos = torch.nn.functional.cosine_similarity(dense_grad.flatten(), sparse_grad.flatten(), dim=0)
    return {
        "spearman": spearman(dense_scores, sparse_scores),
        "jaccard": jaccard_top(dense_scores, sparse_scores, 0.5),
        "loss_rel_err": abs(sparse_loss - dense_loss) / abs(dense_loss),
        "grad_cosine": float(cos),
        "tail_mass": float(sparse.tail.exp().mean()),
    }


@torch.no_grad()
def _hidden(model, batch) -> torch.Tensor:
    """The final (normalised) hidden states ``[B, T−1, H]``, shifted: position t predicts token t + 1."""
    out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state[:, :-1]


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]


def fidelity(teacher, student, examples: list[dict[str, Any]], pad_id: int, ks, batch_size: int = 8) -> list[dict]:
    """Mean and worst of :func:`batch_fidelity` over ``examples`` for each k, float16 and float32 storage."""
    from adakd.data import DistillCollator

    collate = DistillCollator(pad_id)
    teacher.eval(), student.eval()
    per: dict[tuple[int, str], list[dict[str, float]]] = {}
    weight = student.get_output_embeddings().weight.detach()
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        labels = batch["labels"][:, 1:]
        valid = labels != -100
        hidden, zt = _hidden(student, batch), _logits(teacher, batch)
        hidden, zt, y = hidden[valid].float(), zt[valid][:, : weight.shape[0]].float(), labels[valid]
        for k in ks:
            for name, storage in (("float16", torch.float16), ("float32", torch.float32)):
                per.setdefault((k, name), []).append(batch_fidelity(hidden, weight.float(), zt, y, k, storage))
    rows = []
    for (k, storage), items in per.items():
        row: dict[str, Any] = {"k": k, "storage": storage, "batches": len(items)}
        for key in items[0]:
            values = [i[key] for i in items]
            row[key] = statistics.fmean(values)
            row[key + "_worst"] = max(values) if key == "loss_rel_err" else min(values)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- caches


def make_cache(config: dict[str, Any], folder: Path, k: int, log) -> dict[str, Any]:
    """``adakd cache`` on ``config`` into ``folder``: its seconds, bytes per supervised token and positions."""
    from adakd.cli import main as cli

    folder.parent.mkdir(parents=True, exist_ok=True)
    cfg = folder.parent / f"{folder.name}.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    code = cli(["cache", str(cfg), "--output", str(folder), "--top-k", str(k), "--overwrite"])
    if code != 0:
        raise SystemExit(f"adakd cache failed for k={k} (exit {code})")
    seconds = time.perf_counter() - start
    manifest = json.loads((folder / "manifest.json").read_text())
    size = sum(s["bytes"] for s in manifest["shards"])
    log(
        f"[cache] k={k}: {manifest['positions']} positions, {size / manifest['positions']:.1f} bytes/token, "
        f"{seconds:.1f} s"
    )
    return {
        "k": k,
        "seconds": seconds,
        "positions": manifest["positions"],
        "bytes_per_token": size / manifest["positions"],
    }


def _cache_config(student: Path, teacher: Path, tok_dir: Path, data: dict[str, Any], out: Path) -> dict[str, Any]:
    return {
        "student": {"name_or_path": str(student), "tokenizer": str(tok_dir)},
        "teacher": {"name_or_path": str(teacher), "tokenizer": str(tok_dir)},
        "data": data,
        "training": {"output_dir": str(out), "use_cpu": True, "report_to": "none"},
    }


# --------------------------------------------------------------------------------------------------- demo pair


def demo_pair(args, log) -> dict[str, Any]:
    """Fidelity, caches and (unless ``--skip-train``) the end-to-end ROUGE-L comparison on the demo's models."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from adakd.demo.run import METHODS, _train
    from adakd.models import load_causal_lm
    from adakd.train import load_config
    from adakd.train.examples import training_examples
    from study import evaluate_model, prepare, study_settings

    out = Path(args.output) / "demo"
    settings = study_settings(args.quick, "mixed")
    for key in ("teacher_steps", "init_steps", "student_steps", "n_train", "n_test"):
        if getattr(args, key) is not None:
            settings = dataclasses.replace(settings, **{key: getattr(args, key)})
    shared = prepare(out, settings, log)
    teacher = load_causal_lm(str(shared["teacher"]), dtype="float32")
    student = load_causal_lm(str(shared["student-init"]), dtype="float32")
    data = {"source": "minillm_jsonl", "max_length": 128, "max_prompt_length": 96}
    held_out = dict(data, path=str(out / "shared" / "data" / "validation.jsonl"), limit=args.fidelity_examples)
    spec = _cache_config(shared["student-init"], shared["teacher"], shared["tok_dir"], held_out, out / "tmp")
    config = load_config(data=spec)
    examples, _ = training_examples(config.data, _Args(), shared["tokenizer"])
    result: dict[str, Any] = {"fidelity": fidelity(teacher, student, list(examples), shared["tokenizer"].pad_token_id,
                                                   args.ks)}  # fmt: skip
    train_data = dict(data, path=str(shared["train_file"]))
    spec = _cache_config(shared["student-init"], shared["teacher"], shared["tok_dir"], train_data, out / "tmp")
    result["caches"] = [make_cache(spec, out / "caches" / f"k{k}", k, log) for k in args.ks]
    if args.skip_train:
        return result
    runs = []
    loss = {"kd_ratio": 1.0, **METHODS["adakd-rkl"]}
    test_path = out / "shared" / "data" / "test.jsonl"
    for source in ["live"] + [f"k{k}" for k in args.ks]:
        for seed in args.train_seeds:
            name = f"{source}-seed{seed}"
            log(f"[train] AdaKD-RKL from the {source} teacher, training seed {seed}")
            cache = None if source == "live" else out / "caches" / source
            final, _, seconds, trainer = _train(
                name, out / "runs", dataclasses.replace(settings, seed=seed), shared["tok_dir"], shared["train_file"],
                steps=settings.student_steps, loss=loss, init=shared["student-init"],
                teacher=shared["teacher"] if cache is None else None, teacher_cache=cache,
            )  # fmt: skip
            sampled, spread, greedy = evaluate_model(
                final, shared["tokenizer"], shared["splits"]["test"], test_path, args.eval_seeds,
                out / "eval" / f"{name}.json",
            )  # fmt: skip
            runs.append({"source": source, "seed": seed, "rouge_sampled": sampled, "rouge_greedy": greedy,
                         "sampling_std": spread, "seconds_per_step": seconds / settings.student_steps})  # fmt: skip
    result["runs"] = runs
    return result


class _Args:
    """The few TrainingArguments fields ``training_examples`` reads, for a single process."""

    process_index = 0

    @staticmethod
    def main_process_first(desc: str = ""):
        import contextlib

        return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------- GPT-2 pair


def gpt2_pair(args, log) -> dict[str, Any]:
    """Fidelity, cache size and time per step on the GPT-2 vocabulary (Dolly token shards)."""
    from adakd.models import load_causal_lm
    from adakd.train import build_trainer, load_config
    from adakd.train.examples import training_examples

    out = Path(args.output) / "gpt2"
    vocab = 50304
    arch = {"model_type": "qwen2", "vocab_size": vocab, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True}  # fmt: skip
    sizes = {"teacher": {"hidden_size": 256, "intermediate_size": 704}, "student": {"hidden_size": 128,
             "intermediate_size": 352}}  # fmt: skip
    data = {"source": "shards", "path": args.dolly, "max_length": 256, "max_prompt_length": 128}
    models = {}
    for role, steps in (("teacher", args.gpt2_teacher_steps), ("student", args.gpt2_student_steps)):
        final = out / role / "final"
        if not (final / "config.json").is_file():
            log(f"[gpt2] {role}: SFT for {steps} steps on {args.dolly}")
            spec = {
                "student": {"config": {**arch, **sizes[role]}, "tokenizer": args.tokenizer, "seed": 0},
                "data": dict(data, limit=steps * 8),
                "loss": {"kd_ratio": 0.0, "fused": True},
                "training": {"output_dir": str(out / role), "max_steps": steps, "per_device_train_batch_size": 8,
                             "learning_rate": 2e-3, "lr_scheduler_type": "cosine", "warmup_steps": 5,
                             "save_strategy": "no", "report_to": "none", "use_cpu": True, "logging_steps": 10},
            }  # fmt: skip
            trainer = build_trainer(load_config(data=spec))
            trainer.train()
            trainer.save_model(str(final))
        models[role] = final
    teacher = load_causal_lm(str(models["teacher"]), dtype="float32")
    student = load_causal_lm(str(models["student"]), dtype="float32")
    valid = dict(data, path=args.dolly.replace("train_", "valid_"), limit=args.fidelity_examples)
    spec = _cache_config(models["student"], models["teacher"], Path(args.tokenizer), valid, out / "tmp")
    examples, _ = training_examples(load_config(data=spec).data, _Args(), _tokenizer(args.tokenizer))
    result: dict[str, Any] = {"fidelity": fidelity(teacher, student, list(examples), 50256, args.ks)}
    train = dict(data, limit=args.gpt2_cache_examples)
    spec = _cache_config(models["student"], models["teacher"], Path(args.tokenizer), train, out / "tmp")
    result["caches"] = [make_cache(spec, out / "caches" / f"k{k}", k, log) for k in args.ks]
    result["steps"] = step_times(spec, out, args, log)
    return result


def _tokenizer(path: str):
    from adakd.data import tokenizer_for

    return tokenizer_for(path)


def step_times(spec: dict[str, Any], out: Path, args, log) -> list[dict[str, Any]]:
    """Seconds per optimizer step of AdaKD-RKL (fused and logits paths) from the live teacher and from the k=32
    cache, measured after one warm-up step, side by side in this process."""
    from adakd.train import build_trainer, load_config

    rows = []
    k = 32 if 32 in args.ks else args.ks[0]
    for fused in (True, False):
        for source in ("live", f"k{k}"):
            run = json.loads(json.dumps(spec))
            run["student"] = dict(run["student"], name_or_path=str(out / "student" / "final"))
            if source != "live":
                run["teacher"] = {"cache": str(out / "caches" / source)}
            run["loss"] = {"fused": fused, "selection": "latf"}
            run["training"] = {"output_dir": str(out / "steps" / f"{source}-{fused}"), "max_steps": args.time_steps + 1,
                               "per_device_train_batch_size": 8, "save_strategy": "no", "report_to": "none",
                               "use_cpu": True, "logging_steps": 1000}  # fmt: skip
            shutil.rmtree(run["training"]["output_dir"], ignore_errors=True)
            trainer = build_trainer(load_config(data=run))
            times: list[float] = []
            trainer.add_callback(harness.step_timer(times))
            trainer.train()
            per_step = statistics.median(times[1:])
            log(f"[steps] {'fused' if fused else 'logits'} {source}: {per_step:.2f} s/step")
            rows.append({"path": "fused" if fused else "logits", "teacher": source, "seconds_per_step": per_step})
    return rows


# --------------------------------------------------------------------------------------------------- report


def summary(result: dict[str, Any]) -> str:
    """Markdown tables of everything measured."""
    from adakd.markdown import table
    from adakd.report.stats import format_difference, format_mean_std, paired_difference

    lines = []
    for pair, res in result.items():
        lines.append(f"### {pair}\n")
        fid = [[r["k"], r["storage"], f"{r['tail_mass']:.3f}", f"{r['spearman']:.4f} ({r['spearman_worst']:.4f})",
                f"{r['jaccard']:.3f} ({r['jaccard_worst']:.3f})",
                f"{100 * r['loss_rel_err']:.2f}% ({100 * r['loss_rel_err_worst']:.2f}%)",
                f"{r['grad_cosine']:.4f} ({r['grad_cosine_worst']:.4f})"] for r in res["fidelity"]]  # fmt: skip
        lines.append(table(["k", "log-probs", "mean tail mass", "Spearman (worst)", "Jaccard r=0.5 (worst)",
                            "loss rel. error (worst)", "grad cosine (worst)"], fid))  # fmt: skip
        lines.append("")
        caches = [[c["k"], c["positions"], f"{c['bytes_per_token']:.1f}", f"{c['seconds']:.1f}"] for c in res["caches"]]
        lines.append(table(["k", "positions", "bytes / token", "adakd cache (s)"], caches))
        lines.append("")
        if "steps" in res:
            steps = [[r["path"], r["teacher"], f"{r['seconds_per_step']:.2f}"] for r in res["steps"]]
            lines.append(table(["loss path", "teacher", "s / step"], steps))
            lines.append("")
        if "runs" in res:
            by: dict[str, dict[int, float]] = {}
            per_step: dict[str, list[float]] = {}
            for r in res["runs"]:
                by.setdefault(r["source"], {})[r["seed"]] = r["rouge_sampled"]
                per_step.setdefault(r["source"], []).append(r["seconds_per_step"])
            rows = [[s, format_mean_std(list(v.values())), format_difference(paired_difference(v, by["live"])),
                     f"{statistics.fmean(per_step[s]):.3f}"] for s, v in by.items()]  # fmt: skip
            lines.append(table(["teacher", "ROUGE-L sampled (mean ± std over training seeds)",
                                "− live, paired by seed [95% CI]", "s / step"], rows))  # fmt: skip
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[10, 20])
    p.add_argument("--quick", action="store_true", help="the demo's --quick sizes")
    p.add_argument("--skip-train", action="store_true", help="fidelity and caches only, no end-to-end training")
    for key in ("teacher_steps", "init_steps", "student_steps", "n_train", "n_test"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None, help="override the demo setting")
    p.add_argument("--fidelity-examples", type=int, default=64)
    p.add_argument("--dolly", default=None, help="MiniLLM token-shard prefix of the Dolly training split")
    p.add_argument("--tokenizer", default=None, help="the GPT-2 tokenizer folder (with --dolly)")
    p.add_argument("--gpt2-teacher-steps", type=int, default=150)
    p.add_argument("--gpt2-student-steps", type=int, default=60)
    p.add_argument("--gpt2-cache-examples", type=int, default=256)
    p.add_argument("--time-steps", type=int, default=4)
    p.add_argument(
        "--steps-only",
        action="store_true",
        help="with --dolly: only time the steps again, from the models and caches already in --output",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.dolly and not args.tokenizer:
        p.error("--dolly needs --tokenizer (the GPT-2 tokenizer folder)")
    torch.manual_seed(0)
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.steps_only:
        out = Path(args.output) / "gpt2"
        spec = _cache_config(out / "student" / "final", out / "teacher" / "final", Path(args.tokenizer),
                             {"source": "shards", "path": args.dolly, "max_length": 256, "max_prompt_length": 128,
                              "limit": args.gpt2_cache_examples}, out / "tmp")  # fmt: skip
        rows = step_times(spec, out, args, log)
        print(json.dumps(rows))
        return 0
    result = {"demo models": demo_pair(args, log)}
    if args.dolly:
        result["GPT-2 vocabulary, Dolly shards"] = gpt2_pair(args, log)
    text = summary(result)
    print("\n" + text)
    out = Path(args.output)
    (out / "cache_fidelity.md").write_text(text + "\n")
    (Path(args.json) if args.json else out / "cache_fidelity.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
