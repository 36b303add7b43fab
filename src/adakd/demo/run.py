"""``adakd demo``: the whole pipeline on a laptop CPU, nothing downloaded, and a comparison that means something.

1. synthetic instruction data from two kinds of task families (``exact``: one right answer; ``soft``: several
   valid answers in known proportions, scored against all of them), split into train / validation / test, and a
   BPE tokenizer trained on the training split;
2. a teacher trained from scratch by SFT, and one long shared SFT warm-start of a smaller student, so that every
   student starts close to the teacher (the regime of the paper's pre-trained students);
3. RKL and AdaKD-RKL continued from that same warm-start once per *training seed* (``--ablations``: also SFT,
   LATF only, IDTS only and AdaKD-RKL without the τ² weight);
4. ROUGE-L and exact match on the test prompts, sampled (the paper's protocol) and greedy, with ``adakd eval``'s
   code; per method the mean ± std over training seeds, and AdaKD − RKL paired by training seed with a 95% t
   interval; the spread over sampling seeds (decoding noise) apart;
5. ``report.md`` with the tables, a reading generated from the intervals, the settings, the wall times and plots.

Whatever it measures is reported as measured; with one training seed (``--quick``) it is a smoke check and no
comparison is claimed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import Record
from ..errors import InputError
from ..files import write_jsonl, write_text
from .report import comparison_table, comparisons, plot_all, scores_table, write_report
from .scoring import score_model
from .tasks import FAMILIES, SOFT_FAMILIES, TaskRecord, make_splits

__all__ = ["ABLATIONS", "COMPARED", "METHODS", "DemoSettings", "run_demo"]

# Each method's loss section (YAML values), shared with bench/study.py.
METHODS: dict[str, dict[str, Any]] = {
    "sft": {"kd_ratio": 0.0},
    "rkl": {"base": "rkl", "selection": "all", "temperature": "fixed"},
    "adakd-rkl": {"base": "rkl", "selection": "latf", "temperature": "inverse"},
    "latf-rkl": {"base": "rkl", "selection": "latf", "temperature": "fixed"},
    "idts-rkl": {"base": "rkl", "selection": "all", "temperature": "inverse"},
    "adakd-rkl-no-tau-weight": {"base": "rkl", "selection": "latf", "temperature": "inverse", "tau_weight": "none"},
}
COMPARED = ("rkl", "adakd-rkl")  # the comparison every full run makes
ABLATIONS = ("sft", "latf-rkl", "idts-rkl", "adakd-rkl-no-tau-weight")  # with --ablations


@dataclass
class DemoSettings:
    """Sizes and budgets. ``seed`` fixes the data, the tokenizer, the teacher and the warm-start; each student
    run then uses one of ``train_seeds`` (data order and the loss's state), all from the same warm-start."""

    seed: int = 0
    tasks: str = "mixed"
    n_train: int = 8000
    n_val: int = 200
    n_test: int = 300
    vocab_size: int = 448
    teacher_steps: int = 1000
    init_steps: int = 800  # the students' shared SFT warm-start: long, so they start close to the teacher
    student_steps: int = 300  # then each objective, from the same warm-start
    batch_size: int = 32
    lr: float = 3e-3
    train_seeds: tuple[int, ...] = (0, 1, 2)
    eval_seeds: tuple[int, ...] = (10, 20)
    teacher: dict[str, Any] = field(
        default_factory=lambda: dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)
    )
    student: dict[str, Any] = field(
        default_factory=lambda: dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    )

    @classmethod
    def for_run(cls, quick: bool, seed: int) -> DemoSettings:
        """The full run, or the ``--quick`` smoke check (one training seed, smaller budgets)."""
        if not quick:
            return cls(seed=seed)
        return cls(
            seed=seed,
            n_train=3000,
            n_test=90,
            teacher_steps=500,
            init_steps=300,
            student_steps=150,
            train_seeds=(0,),
            eval_seeds=(10,),
        )


def _write_jsonl(path: Path, records: list[Record]) -> None:
    write_jsonl(path, ({"prompt": r.prompt, "output": r.response} for r in records))


def train_tokenizer(records: list[Record], vocab_size: int, folder: Path) -> Any:
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
    teacher_cache: Path | None = None,
):
    """Train one model through the library's own trainer, from an inline config (``sizes``) or a saved model
    (``init``), distilling from ``teacher`` (a saved model) or ``teacher_cache`` (an ``adakd cache`` folder);
    returns (final dir, metrics rows, seconds, trainer)."""
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
            "logging_steps": min(5, steps),
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "seed": s.seed,
            "dataloader_num_workers": 0,
        },
    }
    if teacher is not None:
        spec["teacher"] = {"name_or_path": str(teacher), "tokenizer": str(tok_dir)}
    if teacher_cache is not None:
        spec["teacher"] = {"cache": str(teacher_cache)}
    config = load_config(data=spec)
    # The demo (and the study) own their run folders: a rerun, or a run cut short before, starts over instead of
    # appending to the earlier run's metrics.
    shutil.rmtree(out / name, ignore_errors=True)
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


def run_demo(
    output: str | Path,
    quick: bool = False,
    seed: int = 0,
    log: Callable[[str], Any] = print,
    *,
    train_seeds: tuple[int, ...] | None = None,
    ablations: bool = False,
    settings: DemoSettings | None = None,
) -> dict[str, Any]:
    """Run the demo into ``output``; returns the results (also in ``output/demo.json``).

    ``train_seeds`` overrides the settings' training seeds (at least two for a comparison); ``ablations`` adds the
    SFT, LATF-only, IDTS-only and no-τ²-weight students; ``settings`` replaces the sizes of ``quick``/``seed``.

    Raises:
        InputError: repeated ``train_seeds``, or an ``output`` that cannot be created.
    """
    s = _settings(settings, quick, seed, train_seeds)
    methods = COMPARED + (ABLATIONS if ablations else ())
    out = Path(output)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    splits, tok_dir, tokenizer = _data(out, s, log)

    train_file = out / "data" / "train.jsonl"
    runs_dir = out / "runs"
    teacher_dir, init_dir = _base_models(runs_dir, s, tok_dir, train_file, times, log)
    finals, metrics, loss_fns = _train_students(
        s,
        methods,
        runs_dir,
        tok_dir=tok_dir,
        train_file=train_file,
        init_dir=init_dir,
        teacher_dir=teacher_dir,
        times=times,
        log=log,
    )

    n_models = 2 + sum(len(v) for v in finals.values())
    log(f"[demo] evaluating {n_models} models on {len(splits['test'])} test prompts, sampled and greedy")
    start = time.perf_counter()
    models = {"teacher": {None: teacher_dir}, "warm-start": {None: init_dir}, **finals}
    results = _score_all(out, s, tokenizer, splits["test"], models)
    times["evaluation"] = time.perf_counter() - start

    start = time.perf_counter()
    comparison = comparisons(results, s.train_seeds)
    plot_all(
        out / "plots",
        s,
        methods,
        results=results,
        comparison=comparison,
        metrics=metrics,
        finals=finals,
        loss_fns=loss_fns,
        teacher_dir=teacher_dir,
        tokenizer=tokenizer,
        splits=splits,
    )
    times["plots"] = time.perf_counter() - start
    times["total"] = time.perf_counter() - t_all

    return _finish(
        out,
        s,
        methods,
        quick=quick,
        results=results,
        comparison=comparison,
        times=times,
        loss_fns=loss_fns,
        vocab=len(tokenizer),
        log=log,
    )


def _data(out: Path, s: DemoSettings, log: Callable[[str], Any]) -> tuple[dict[str, list[Record]], Path, Any]:
    """The task splits (written as JSONL under ``out/data``) and the tokenizer trained on the training split."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission
        raise InputError(f"--output {out}: cannot create the folder ({e.strerror or e})") from e
    splits = make_splits(s.n_train, s.n_val, s.n_test, seed=s.seed, tasks=s.tasks)
    for split, records in splits.items():
        _write_jsonl(out / "data" / f"{split}.jsonl", records)
    tok_dir = out / "tokenizer"
    tokenizer = train_tokenizer(splits["train"], s.vocab_size, tok_dir)
    log(f"[demo] data: {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; tokenizer: {len(tokenizer)} tokens")
    return splits, tok_dir, tokenizer


def _base_models(
    runs_dir: Path, s: DemoSettings, tok_dir: Path, train_file: Path, times: dict, log
) -> tuple[Path, Path]:
    """The teacher (SFT) and the students' shared SFT warm-start: their ``final/`` folders."""
    log(f"[demo] teacher: SFT for {s.teacher_steps} steps")
    teacher_dir, _, times["teacher"], _ = _train(
        "teacher", runs_dir, s, tok_dir, train_file, steps=s.teacher_steps, loss={"kd_ratio": 0.0}, sizes=s.teacher
    )
    log(f"[demo] students: a shared SFT warm-start of {s.init_steps} steps")
    init_dir, _, times["student warm-start"], _ = _train(
        "warm-start", runs_dir, s, tok_dir, train_file, steps=s.init_steps, loss={"kd_ratio": 0.0}, sizes=s.student
    )
    return teacher_dir, init_dir


def _finish(out: Path, s: DemoSettings, methods, *, quick, results, comparison, times, loss_fns, vocab, log):
    """``demo.json`` and the report; the summary."""
    summary = {
        "settings": dataclasses.asdict(s),
        "quick": quick,
        "methods": list(methods),
        "families": {"exact": list(FAMILIES), "soft": list(SOFT_FAMILIES)},
        # Trained students by training seed; the teacher and the warm-start are single models ("model").
        "results": {k: {"model" if k_ is None else str(k_): r for k_, r in v.items()} for k, v in results.items()},
        "comparison": comparison,
        "final_ratios": {str(k): v.ratio for k, v in loss_fns.items()},
        "seconds": times,
    }
    write_text(out / "demo.json", json.dumps(summary, indent=2, default=str))
    report = write_report(out, s, results, comparison, times, summary["final_ratios"], vocab, quick)
    log("\n" + scores_table(results))
    if comparison:
        log("\n" + comparison_table(comparison))
    log(f"\n[demo] report: {report}  ({times['total']:.0f} s in all)")
    return summary


def _settings(
    settings: DemoSettings | None, quick: bool, seed: int, train_seeds: tuple[int, ...] | None
) -> DemoSettings:
    """The run's settings: ``settings``, else those of ``quick``/``seed``, with ``train_seeds`` (``--train-seeds``)
    in place of their training seeds when given.

    Raises:
        InputError: ``train_seeds`` empty or repeated.
    """
    s = settings if settings is not None else DemoSettings.for_run(quick, seed)
    if train_seeds is None:
        return s
    if not train_seeds or len(set(train_seeds)) != len(train_seeds):
        raise InputError(f"--train-seeds: expected distinct seeds, got {' '.join(map(str, train_seeds)) or 'none'}")
    return dataclasses.replace(s, train_seeds=tuple(train_seeds))


def _score_all(
    out: Path, s: DemoSettings, tokenizer: Any, test: list[TaskRecord], models: dict[str, dict[int | None, Path]]
) -> dict[str, dict[int | None, dict[str, Any]]]:
    """:func:`score_model` for every saved model, by name and training seed (None: a single model); the predictions
    go to ``out/eval``."""
    test_path = out / "data" / "test.jsonl"
    results: dict[str, dict[int | None, dict[str, Any]]] = {}
    for name, by_seed in models.items():
        results[name] = {}
        for seed, folder in by_seed.items():
            stem = name if seed is None else f"{name}-seed{seed}"
            out_json = out / "eval" / f"{stem}.json"
            results[name][seed] = score_model(folder, tokenizer, test, test_path, s.eval_seeds, out_json)
    return results


def _train_students(s, methods, runs_dir, *, tok_dir, train_file, init_dir, teacher_dir, times, log):
    """Every method from the shared warm-start, once per training seed: (final folders, metrics rows, the AdaKD
    runs' loss modules), each by method and seed."""
    finals: dict[str, dict[int, Path]] = {}
    metrics: dict[str, dict[int, list[dict[str, Any]]]] = {}
    loss_fns: dict[int, Any] = {}
    for name in methods:
        start = time.perf_counter()
        for train_seed in s.train_seeds:
            log(f"[demo] student {name}, training seed {train_seed}: {s.student_steps} steps from the warm-start")
            loss = {"kd_ratio": 1.0, **METHODS[name]}
            final, rows, _, trainer = _train(
                f"{name}-seed{train_seed}",
                runs_dir,
                dataclasses.replace(s, seed=train_seed),
                tok_dir,
                train_file,
                steps=s.student_steps,
                loss=loss,
                init=init_dir,
                teacher=None if loss["kd_ratio"] == 0 else teacher_dir,
            )
            finals.setdefault(name, {})[train_seed] = final
            metrics.setdefault(name, {})[train_seed] = rows
            if name == "adakd-rkl":
                loss_fns[train_seed] = trainer.loss_fn
        times[name] = time.perf_counter() - start
    return finals, metrics, loss_fns
