"""The AdaKD study: methods × settings × training seeds on the demo's tasks, resumable, with paired differences.

    python bench/study.py --output outputs/study
    python bench/study.py --output outputs/study --sweep            # also LATF only, c, tau_base, r schedules
    python bench/study.py --output outputs/study --method adakd-c1=adakd-rkl:c=1.0 --seeds 0 1 2 3
    python bench/study.py --output outputs/study --summary-only

What it measures. A teacher is trained from scratch by SFT and one student is warmed up by SFT (both once, in
``OUTPUT/shared``). Every method then continues from that same warm-start, once per *training* seed (data order,
dropout), and is scored with ROUGE-L on the test prompts by sampling (the paper's protocol, over ``--eval-seeds``)
and by greedy decoding. A method differs from the baseline only when its paired difference (same training seed,
same warm-start) has an interval that excludes 0; the spread over sampling seeds is reported beside it, since it
measures something else (decoding noise of one trained model).

Resumable: each finished (method, seed) run appends one JSON row to ``OUTPUT/results.jsonl``; a rerun skips the rows
already there and the shared models already trained. The summary (``OUTPUT/study.md``, ``OUTPUT/study.png``) is
rewritten from all rows at the end, or alone with ``--summary-only``.

A method is ``LABEL=PRESET[:key=value,...]`` (loss overrides, YAML values), e.g. ``nw=adakd-rkl:tau_weight=none``,
or a bare preset name. Presets: see ``PRESETS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from adakd.demo.run import METHODS as PRESETS  # noqa: E402  (one definition of each method's loss section)
from adakd.markdown import table  # noqa: E402
from adakd.report.stats import format_difference, format_mean_std, paired_difference, plot_differences  # noqa: E402

DEFAULT_METHODS = [
    "rkl",
    "adakd-rkl",
    "idts-rkl",
    "adakd-rkl-no-tau-weight=adakd-rkl:tau_weight=none",
    "adakd-rkl-grad-through-tau=adakd-rkl:detach_tau=false",
]
# --sweep: LATF alone, the IDTS strength c, the base temperature and the kept-ratio schedule, one at a time.
SWEEP_METHODS = [
    "latf-rkl",
    "adakd-rkl-c0.25=adakd-rkl:c=0.25",
    "adakd-rkl-c1.0=adakd-rkl:c=1.0",
    "adakd-rkl-tau-base0.5=adakd-rkl:tau_base=0.5",
    "adakd-rkl-tau-base2=adakd-rkl:tau_base=2.0",
    "adakd-rkl-fixed-r0.5=adakd-rkl:selection=fixed,ratio=0.5",
    "adakd-rkl-cosine-r0.5=adakd-rkl:selection=cosine,ratio=0.5",
]
TEACHER = "teacher"  # the row of the shared teacher, scored once


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``LABEL=PRESET[:key=value,...]`` or ``PRESET`` → (label, loss section)."""
    import yaml

    label, _, spec = text.partition("=")
    spec = spec or label
    preset, _, extra = spec.partition(":")
    if preset not in PRESETS:
        raise ValueError(f"--method {text}: unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    loss = dict(PRESETS[preset])
    for item in filter(None, extra.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--method {text}: {item!r} is not key=value")
        loss[key] = yaml.safe_load(value)
    return label, loss


# ------------------------------------------------------------------------------------------------------ runs
def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``results.jsonl``; a line cut by an interruption (the last one) is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _append(path: Path, row: dict[str, Any]) -> None:
    """Append one row; a line cut by an earlier interruption is closed first, so it stays a line of its own (which
    :func:`read_rows` skips) instead of swallowing this row."""
    cut = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(row) + "\n")
        f.flush()


def prepare(out: Path, settings, log) -> dict[str, Any]:
    """Data, tokenizer, teacher and the students' warm-start, each made once and reused by later runs."""
    from adakd.demo.run import _train, _write_jsonl, train_tokenizer
    from adakd.demo.tasks import make_splits

    shared = out / "shared"
    splits = make_splits(settings.n_train, settings.n_val, settings.n_test, seed=settings.seed, tasks=settings.tasks)
    for split, records in splits.items():
        _write_jsonl(shared / "data" / f"{split}.jsonl", records)
    tok_dir = shared / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer(splits["train"], settings.vocab_size, tok_dir)
    train_file = shared / "data" / "train.jsonl"
    models: dict[str, Path] = {}
    for name, steps, sizes in (
        ("teacher", settings.teacher_steps, settings.teacher),
        ("student-init", settings.init_steps, settings.student),
    ):
        final = shared / name / "final"
        if not (final / "config.json").is_file():
            log(f"[study] {name}: SFT for {steps} steps")
            _train(name, shared, settings, tok_dir, train_file, steps=steps, loss={"kd_ratio": 0.0}, sizes=sizes)
        models[name] = final
    return {"splits": splits, "tokenizer": tokenizer, "tok_dir": tok_dir, "train_file": train_file, **models}


def evaluate_model(folder: Path, tokenizer, test_records, test_path: Path, eval_seeds, out_json: Path):
    """(mean ROUGE-L over the sampling seeds, their std, greedy ROUGE-L), over every test prompt."""
    from adakd.demo.run import score_model

    scores = score_model(folder, tokenizer, test_records, test_path, eval_seeds, out_json)
    return scores["sampled"]["all"], scores["sampling_std"]["all"], scores["greedy"]["all"]


def method_specs(args: argparse.Namespace) -> list[str]:
    """``--method`` as given (or the default methods), then the sweep with ``--sweep``; each label once."""
    specs = list(args.method or DEFAULT_METHODS) + (SWEEP_METHODS if args.sweep else [])
    return list(dict.fromkeys(specs))


def study_settings(quick: bool, tasks: str):
    """The study's sizes: the demo's models on one task set with the budgets of the tables in docs/study.md
    (n_train 6000, n_test 150, warm-start 800, 350 steps per method), or the demo's --quick sizes."""
    from adakd.demo.run import DemoSettings

    base = DemoSettings.for_run(quick, seed=0)
    if quick:
        return dataclasses.replace(base, tasks=tasks)
    return dataclasses.replace(base, tasks=tasks, n_train=6000, n_test=150, init_steps=800, student_steps=350)


def run_study(args: argparse.Namespace, log=print) -> list[dict[str, Any]]:
    from adakd.demo.run import _train

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = study_settings(args.quick, args.tasks)
    for key in ("teacher_steps", "init_steps", "student_steps", "n_train", "n_test"):
        if getattr(args, key) is not None:
            settings = dataclasses.replace(settings, **{key: getattr(args, key)})
    methods = [parse_method(m) for m in method_specs(args)]
    results_path = out / "results.jsonl"
    done = {(r["method"], r["seed"]) for r in read_rows(results_path)}
    todo = [(label, loss, seed) for label, loss in methods for seed in args.seeds if (label, seed) not in done]
    log(f"[study] {len(methods)} methods x {len(args.seeds)} seeds: {len(todo)} runs to do, {len(done)} done")
    if not todo:
        return read_rows(results_path)
    shared = prepare(out, settings, log)
    test_path = out / "shared" / "data" / "test.jsonl"
    if not any(r["method"] == TEACHER for r in read_rows(results_path)):
        # The teacher is one model (no training seed): the ceiling every student is read against.
        log("[study] scoring the teacher")
        sampled, spread, greedy = evaluate_model(
            shared["teacher"], shared["tokenizer"], shared["splits"]["test"], test_path, args.eval_seeds,
            out / "eval" / "teacher.json",
        )  # fmt: skip
        _append(
            results_path,
            {
                "method": TEACHER, "seed": None, "loss": None, "rouge_sampled": sampled, "sampling_std": spread,
                "rouge_greedy": greedy, "teacher_steps": settings.teacher_steps, "init_steps": settings.init_steps,
                "student_steps": 0, "tasks": args.tasks,
            },
        )  # fmt: skip
    for i, (label, loss, seed) in enumerate(todo, 1):
        log(f"[study] run {i}/{len(todo)}: {label}, training seed {seed}")
        run_settings = dataclasses.replace(settings, seed=seed)
        name = f"{label}-seed{seed}"
        start = time.perf_counter()
        final, rows, seconds, trainer = _train(
            name, out / "runs", run_settings, shared["tok_dir"], shared["train_file"], steps=settings.student_steps,
            loss={"kd_ratio": 1.0, **loss}, init=shared["student-init"],
            teacher=None if loss.get("kd_ratio", 1.0) == 0 else shared["teacher"],
        )  # fmt: skip
        sampled, spread, greedy = evaluate_model(
            final, shared["tokenizer"], shared["splits"]["test"], test_path, args.eval_seeds,
            out / "eval" / f"{name}.json",
        )  # fmt: skip
        _append(
            results_path,
            {
                "method": label, "seed": seed, "loss": loss, "rouge_sampled": sampled, "sampling_std": spread,
                "rouge_greedy": greedy, "final_ratio": trainer.loss_fn.ratio, "train_seconds": seconds,
                "seconds": time.perf_counter() - start, "student_steps": settings.student_steps,
                "init_steps": settings.init_steps, "teacher_steps": settings.teacher_steps, "tasks": args.tasks,
            },
        )  # fmt: skip
    return read_rows(results_path)


# --------------------------------------------------------------------------------------------------- summary
def paired(rows: list[dict[str, Any]], method: str, baseline: str, key: str) -> dict[str, float] | None:
    """The paired difference method − baseline over the training seeds both have (see
    :func:`adakd.report.stats.paired_difference`); None without a pair."""
    by_seed = {m: {r["seed"]: r[key] for r in rows if r["method"] == m} for m in (method, baseline)}
    return paired_difference(by_seed[method], by_seed[baseline])


def summary_table(rows: list[dict[str, Any]], baseline: str) -> str:
    """A markdown table: per method, ROUGE-L (sampled, greedy) mean ± std over training seeds, the paired
    difference to ``baseline`` with its 95% interval (``*``: the interval excludes 0), and the sampling noise."""
    methods = sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: m != TEACHER)
    header = [
        "method", "training seeds", "ROUGE-L, sampled", "ROUGE-L, greedy", f"− {baseline}, sampled [95%]",
        f"− {baseline}, greedy [95%]", "sampling spread",
    ]  # fmt: skip
    body = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        sampled = format_mean_std([r["rouge_sampled"] for r in mine])
        greedy = format_mean_std([r["rouge_greedy"] for r in mine])
        noise = statistics.fmean(r["sampling_std"] for r in mine)
        d_s = None if m == baseline else paired(rows, m, baseline, "rouge_sampled")
        d_g = None if m == baseline else paired(rows, m, baseline, "rouge_greedy")
        if m == TEACHER:
            sampled, greedy = f"{mine[0]['rouge_sampled']:.2f}", f"{mine[0]['rouge_greedy']:.2f}"
            d_s = d_g = None
        seeds = "– (one model)" if m == TEACHER else len(mine)
        body.append([m, seeds, sampled, greedy, format_difference(d_s), format_difference(d_g), f"{noise:.2f}"])
    return table(header, body)


def plot(rows: list[dict[str, Any]], baseline: str, path: Path) -> None:
    """The paired differences to the baseline with their 95% intervals, sampled and greedy side by side."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in (baseline, TEACHER)]
    entries = [
        (m, {decoding: paired(rows, m, baseline, f"rouge_{decoding}") for decoding in ("sampled", "greedy")})
        for m in methods
    ]
    plot_differences(entries, path, f"ROUGE-L − {baseline} (paired by training seed; bars: 95% interval)")


def write_summary(out: Path, rows: list[dict[str, Any]], baseline: str) -> Path:
    table = summary_table(rows, baseline)
    plot(rows, baseline, out / "study.png")
    steps = {
        (r["teacher_steps"], r["init_steps"], r["student_steps"], r.get("tasks", "exact"))
        for r in rows
        if r["method"] != TEACHER
    }
    text = (
        "# AdaKD study\n\n"
        f"Runs: {len(rows)}; (teacher, warm-start, student steps, tasks): {', '.join(map(str, sorted(steps)))}.\n"
        "Mean ± sample std over training seeds; differences are paired by training seed, with a 95% t interval "
        "(`*`: it excludes 0); the sampling spread is the mean std over sampling seeds of one trained model.\n\n"
        f"{table}\n\n![paired differences](study.png)\n"
    )
    path = out / "study.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", required=True, help="the study folder (results.jsonl, shared models, study.md)")
    p.add_argument("--method", action="append", help="LABEL=PRESET[:key=value,...]; repeat (default: the ablations)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[10, 20], help="sampling seeds (default 10 20)")
    p.add_argument(
        "--tasks",
        choices=("exact", "soft", "mixed"),
        default="exact",
        help="the demo's single-answer tasks, tasks with several valid answers in known proportions, or both",
    )
    p.add_argument(
        "--sweep", action="store_true", help="also run LATF only and the sweep of c, tau_base and the ratio schedule"
    )
    p.add_argument("--baseline", default="rkl", help="the method the paired differences are taken against")
    p.add_argument("--quick", action="store_true", help="the demo's --quick sizes (a smoke check, not a result)")
    for key in ("teacher_steps", "init_steps", "student_steps", "n_train", "n_test"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, dest=key, help=f"override {key}")
    p.add_argument("--summary-only", action="store_true", help="only rewrite study.md / study.png from results.jsonl")
    args = p.parse_args(argv)
    try:
        for m in method_specs(args):
            parse_method(m)
    except ValueError as e:
        print(f"study: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    rows = read_rows(out / "results.jsonl") if args.summary_only else run_study(args)
    if not rows:
        print(f"study: error: {out / 'results.jsonl'}: no results yet", file=sys.stderr)
        return 2
    path = write_summary(out, rows, args.baseline)
    print(summary_table(rows, args.baseline))
    print(f"\n[study] {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
