"""``adakd demo``: the whole pipeline on a laptop CPU, nothing downloaded.

1. synthetic instruction data (six task families) split into train / validation / test, and a BPE tokenizer
   trained on the training split;
2. a teacher trained from scratch by SFT, then three students of one smaller size with the same budget and seed:
   SFT, RKL KD (every token, τ = 1) and AdaKD-RKL (LATF + IDTS);
3. ROUGE-L and exact match on the test prompts over 3 sampling seeds, with ``adakd eval``'s code;
4. ``report.md`` with the table, the settings, the wall times and the plots.

Whatever it measures is reported as measured.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import Record
from .tasks import FAMILIES, make_splits

__all__ = ["DemoSettings", "run_demo"]

RUNS = ("sft", "rkl", "adakd-rkl", "latf-rkl", "idts-rkl")
LABELS = {
    "teacher": "teacher (SFT)",
    "sft": "student SFT",
    "rkl": "student RKL KD",
    "adakd-rkl": "student AdaKD-RKL",
    "latf-rkl": "ablation: RKL + LATF only",
    "idts-rkl": "ablation: RKL + IDTS only",
}


@dataclass
class DemoSettings:
    """Sizes and budgets; ``quick`` is the ≤ 2-minute variant."""

    seed: int = 0
    n_train: int = 6000
    n_val: int = 200
    n_test: int = 150
    vocab_size: int = 448
    teacher_steps: int = 1000
    init_steps: int = 200  # the students' shared SFT warm-start
    student_steps: int = 350  # then each objective, from the same warm-start
    batch_size: int = 32
    lr: float = 3e-3
    eval_seeds: tuple[int, ...] = (10, 20, 30)
    teacher: dict[str, Any] = field(
        default_factory=lambda: dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)
    )
    student: dict[str, Any] = field(
        default_factory=lambda: dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    )

    @classmethod
    def for_run(cls, quick: bool, seed: int) -> DemoSettings:
        if not quick:
            return cls(seed=seed)
        return cls(seed=seed, n_train=3000, n_test=60, teacher_steps=500, init_steps=100, student_steps=150)


def _write_jsonl(path: Path, records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({"prompt": r.prompt, "output": r.response}) + "\n")


def train_tokenizer(records: list[Record], vocab_size: int, folder: Path):
    """A byte-level BPE trained on the training prompts and answers, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((r.prompt + r.response for r in records), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def _model_config(sizes: dict[str, Any], vocab: int) -> dict[str, Any]:
    return {
        "model_type": "qwen2",
        "vocab_size": vocab,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        **sizes,
    }


def _train(
    name: str,
    out: Path,
    s: DemoSettings,
    tok_dir: Path,
    data: Path,
    *,
    steps: int,
    loss: dict[str, Any],
    sizes: dict[str, Any] | None = None,
    init: Path | None = None,
    teacher: Path | None = None,
):
    """Train one model through the library's own trainer, from an inline config (``sizes``) or a saved model
    (``init``); returns (final dir, metrics rows, seconds, trainer)."""
    from transformers.trainer_callback import ProgressCallback

    from ..train import build_trainer, load_config

    vocab = 64 * math.ceil((s.vocab_size + 1) / 64)
    model: dict[str, Any] = {"tokenizer": str(tok_dir), "seed": s.seed}
    if init is not None:
        model["name_or_path"] = str(init)
    else:
        model["config"] = _model_config(sizes or {}, vocab)
    spec: dict[str, Any] = {
        "student": model,
        "data": {"source": "minillm_jsonl", "path": str(data), "max_length": 128, "max_prompt_length": 96},
        "loss": loss,
        "training": {
            "output_dir": str(out / name),
            "max_steps": steps,
            "per_device_train_batch_size": s.batch_size,
            "learning_rate": s.lr,
            "lr_scheduler_type": "cosine",
            "warmup_steps": max(1, steps // 20),
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "logging_steps": 5,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "seed": s.seed,
            "dataloader_num_workers": 0,
        },
    }
    if teacher is not None:
        spec["teacher"] = {"name_or_path": str(teacher), "tokenizer": str(tok_dir)}
    config = load_config(data=spec)
    trainer = build_trainer(config)

    class _Bar(ProgressCallback):  # the bar, without printing every log dict under it
        def on_log(self, *args, **kwargs):
            return None

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_Bar())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    final = out / name / "final"
    trainer.save_model(str(final))
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return final, [r for r in rows if "loss" in r], seconds, trainer


def _exact_match(pred_file: Path) -> float:
    rows = [json.loads(line) for line in pred_file.read_text().splitlines()]
    return 100.0 * statistics.fmean(r["prediction"].strip() == r["references"][0].strip() for r in rows)


def _family_of(prompt: str) -> str:
    for name, marker in (
        ("arithmetic", "Add "),
        ("sorting", "Sort these numbers"),
        ("reversal", "Reverse the order"),
        ("uppercase", "uppercase"),
        ("lookup", "capital of"),
        ("date-format", "DD/MM/YYYY"),
    ):
        if marker in prompt:
            return name
    return "other"


@torch.no_grad()
def _difficulty_sample(teacher, student, tokenizer, records: list[Record], ratio: float):
    """Per-token Hellinger difficulty, the kept mask at ``ratio`` and IDTS τ on validation answers."""
    from .. import AdaKDLoss, align_vocab, difficulty_scores
    from ..adaptive import idts_from_median, keep_count
    from ..data import DistillCollator, build_examples

    examples, _ = build_examples(records, tokenizer, max_length=128, max_prompt_length=96)
    batch = DistillCollator(tokenizer.pad_token_id)(examples)
    labels = batch["labels"][:, 1:]
    zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    zs, zt = align_vocab(zs, zt)
    mask = labels != -100
    scores = difficulty_scores("hellinger", zs, zt)[mask]
    k = keep_count(scores.numel(), ratio)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    kept[scores.topk(k).indices] = True
    # Kept tokens get their IDTS τ; dropped ones are shown at the τ they would have had (never used in training).
    median = scores[kept].median()
    taus = idts_from_median(scores, median, c=AdaKDLoss().c)
    return scores, taus, kept, median.item()


def run_demo(output: str | Path, quick: bool = False, seed: int = 0, log=print) -> dict[str, Any]:
    """Run the demo into ``output``; returns the results (also in ``output/demo.json``)."""
    from transformers import AutoModelForCausalLM

    from .. import AdaKDLoss
    from ..eval.generate import GenerationConfig, HFBackend
    from ..eval.run import evaluate, predictions_dir
    from ..eval.sets import EvalSet
    from ..eval.tables import bar_chart
    from ..report.plots import plot_losses, plot_ratio, plot_tau_vs_difficulty

    s = DemoSettings.for_run(quick, seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    splits = make_splits(s.n_train, s.n_val, s.n_test, seed=s.seed)
    for split, records in splits.items():
        _write_jsonl(out / "data" / f"{split}.jsonl", records)
    tok_dir = out / "tokenizer"
    tokenizer = train_tokenizer(splits["train"], s.vocab_size, tok_dir)
    log(f"[demo] data: {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; tokenizer: {len(tokenizer)} tokens")

    train_file = out / "data" / "train.jsonl"
    runs_dir = out / "runs"
    log(f"[demo] teacher: SFT for {s.teacher_steps} steps")
    teacher_dir, teacher_rows, times["teacher"], _ = _train(
        "teacher", runs_dir, s, tok_dir, train_file, steps=s.teacher_steps, loss={"kd_ratio": 0.0}, sizes=s.teacher
    )
    log(f"[demo] students: a shared SFT warm-start of {s.init_steps} steps")
    init_dir, _, times["student warm-start"], _ = _train(
        "student-init", runs_dir, s, tok_dir, train_file, steps=s.init_steps, loss={"kd_ratio": 0.0}, sizes=s.student
    )
    losses = {
        "sft": {"kd_ratio": 0.0},
        "rkl": {"base": "rkl", "selection": "all", "temperature": "fixed", "kd_ratio": 1.0},
        "adakd-rkl": {"base": "rkl", "selection": "latf", "temperature": "inverse", "kd_ratio": 1.0},
        "latf-rkl": {"base": "rkl", "selection": "latf", "temperature": "fixed", "kd_ratio": 1.0},
        "idts-rkl": {"base": "rkl", "selection": "all", "temperature": "inverse", "kd_ratio": 1.0},
    }
    finals, metrics = {"teacher": teacher_dir}, {"teacher": teacher_rows}
    adakd_trainer = None
    for name in RUNS:
        log(f"[demo] student {name}: {s.student_steps} steps from the warm-start")
        finals[name], metrics[name], times[name], trainer = _train(
            name, runs_dir, s, tok_dir, train_file, steps=s.student_steps, loss=losses[name], init=init_dir,
            teacher=None if name == "sft" else teacher_dir,
        )  # fmt: skip
        if name == "adakd-rkl":
            adakd_trainer = trainer

    log(f"[demo] evaluating on {len(splits['test'])} test prompts x {len(s.eval_seeds)} seeds")
    test = EvalSet("test", out / "data" / "test.jsonl", splits["test"])
    config = GenerationConfig(max_length=128, max_prompt_length=96, batch_size=48)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for name, folder in finals.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        res = evaluate(
            HFBackend(model, tokenizer), [test], list(s.eval_seeds), config, out / "eval" / f"{name}.json",
            LABELS[name], show_progress=False,
        )  # fmt: skip
        pred = predictions_dir(out / "eval" / f"{name}.json")
        em = [_exact_match(pred / f"test.seed{seed_}.jsonl") for seed_ in s.eval_seeds]
        res["exact_match"] = {"mean": statistics.fmean(em), "std": statistics.pstdev(em)}
        families: dict[str, list[float]] = {}
        for seed_ in s.eval_seeds:
            for row in map(json.loads, (pred / f"test.seed{seed_}.jsonl").read_text().splitlines()):
                families.setdefault(_family_of(row["prompt"]), []).append(row["rougeL"])
        res["families"] = {k: statistics.fmean(v) for k, v in sorted(families.items())}
        results[name] = res
    times["evaluation"] = time.perf_counter() - start

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    ordered = [results[k] for k in ("teacher", *RUNS)]
    bar_chart(ordered, [LABELS[k] for k in ("teacher", *RUNS)], plots / "rouge.png")
    plot_ratio({LABELS[k]: metrics[k] for k in ("adakd-rkl", "latf-rkl")}, plots / "ratio.png")
    plot_losses({LABELS[k]: metrics[k] for k in RUNS}, plots / "losses.png")
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student_model = AutoModelForCausalLM.from_pretrained(finals["adakd-rkl"], dtype=torch.float32).eval()
    final_ratio = adakd_trainer.loss_fn.ratio if adakd_trainer is not None else 1.0
    scores, taus, kept, median = _difficulty_sample(
        teacher_model, student_model, tokenizer, splits["validation"][:64], final_ratio
    )
    plot_tau_vs_difficulty(
        scores, taus, kept, plots / "tau_vs_difficulty.png", ratio=final_ratio, median=median, c=AdaKDLoss().c
    )
    times["total"] = time.perf_counter() - t_all

    summary = {
        "settings": {k: v for k, v in s.__dict__.items()},
        "families": list(FAMILIES),
        "results": {
            k: {"rougeL": v["average"], "exact_match": v["exact_match"], "families": v["families"]}
            for k, v in results.items()
        },
        "final_ratio": final_ratio,
        "seconds": times,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    report = _write_report(out, s, results, times, final_ratio, len(tokenizer), quick)
    log("\n" + table(results))
    log(f"\n[demo] report: {report}  ({times['total']:.0f} s in all)")
    return summary


def table(results: dict[str, Any]) -> str:
    lines = ["| model | ROUGE-L | exact match (%) |", "|---|---|---|"]
    for name, r in results.items():
        avg, em = r["average"], r["exact_match"]
        lines.append(f"| {LABELS[name]} | {avg['mean']:.2f} ± {avg['std']:.2f} | {em['mean']:.1f} ± {em['std']:.1f} |")
    return "\n".join(lines)


def _write_report(out: Path, s: DemoSettings, results, times, final_ratio: float, vocab: int, quick: bool) -> Path:
    fam_names = list(next(iter(results.values()))["families"])
    fam_rows = ["| model | " + " | ".join(fam_names) + " |", "|---|" + "---|" * len(fam_names)]
    for name, r in results.items():
        fam_rows.append(f"| {LABELS[name]} | " + " | ".join(f"{r['families'][f]:.1f}" for f in fam_names) + " |")
    lines = [
        "# adakd demo report",
        "",
        f"{'Quick run' if quick else 'Full run'}, seed {s.seed}, {times['total']:.0f} s in all on this machine's CPU.",
        "",
        "## Results on the test prompts",
        "",
        f"ROUGE-L (× 100) and exact match, mean ± std over the sampling seeds {', '.join(map(str, s.eval_seeds))} "
        f"(temperature 1.0, top-p 1.0, top-k off), {s.n_test} test prompts never seen in training (but for the "
        "20-entry capital lookup table).",
        "",
        table(results),
        "",
        "ROUGE-L by task family (mean over seeds):",
        "",
        *fam_rows,
        "",
        "![ROUGE-L](plots/rouge.png)",
        "",
        "## What AdaKD did",
        "",
        f"The LATF kept ratio over training (final r = {final_ratio:.3f}); every step keeps the hardest r of the "
        "valid tokens, by Hellinger distance between teacher and student:",
        "",
        "![ratio](plots/ratio.png)",
        "",
        "Per-token difficulty against the IDTS temperature on validation answers (final AdaKD student): hard tokens "
        "get τ < 1 (sharper targets), easy ones τ > 1; the tokens below the threshold are not trained on.",
        "",
        "![tau](plots/tau_vs_difficulty.png)",
        "",
        "Training losses (the KD losses are divergences, the SFT loss a cross-entropy: compare shapes, not levels):",
        "",
        "![losses](plots/losses.png)",
        "",
        "## Settings",
        "",
        f"- data: {s.n_train} train / {s.n_val} validation / {s.n_test} test examples, families: "
        f"{', '.join(FAMILIES)}; MiniLLM prompt template",
        f"- tokenizer: byte-level BPE trained on the training split, {vocab} tokens",
        f"- teacher: Qwen2 architecture {s.teacher}, trained from scratch by SFT for {s.teacher_steps} steps",
        "- ablations: RKL with LATF only (selection by difficulty, τ = 1) and RKL with IDTS only (every token, "
        "per-token τ), to show which half of AdaKD does what at this scale",
        f"- students: Qwen2 architecture {s.student}: one shared SFT warm-start of {s.init_steps} steps from random "
        f"weights (reverse KL from a random student barely moves in a CPU budget), then {s.student_steps} steps of "
        "each objective from it, with the same seed and data order: SFT (cross-entropy), RKL KD (every token, "
        "τ = 1), AdaKD-RKL (Hellinger difficulty, LATF with the paper's defaults and a 5% warm-up, IDTS c = 0.5)",
        f"- learning rate {s.lr} for every run,"
        f" batch {s.batch_size} sequences, cosine schedule with 5% warm-up, AdamW, weight decay 0.01, clip 1.0",
        "",
        "## Wall times (s)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in times.items()],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
