"""The demo's tables, its reading of them, its plots and ``report.md``: pure formatting of measured results."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..files import write_text
from ..markdown import table
from ..report.stats import format_difference, format_mean_std, paired_difference
from .tasks import FAMILIES, SOFT_FAMILIES

BASELINE = "rkl"
LABELS = {
    "teacher": "teacher (SFT)",
    "warm-start": "student warm-start (SFT, before KD)",
    "sft": "student, SFT continued",
    "rkl": "student RKL KD",
    "adakd-rkl": "student AdaKD-RKL",
    "latf-rkl": "ablation: RKL + LATF only",
    "idts-rkl": "ablation: RKL + IDTS only",
    "adakd-rkl-no-tau-weight": "ablation: AdaKD-RKL, tau_weight none",
}
KINDS = {"exact": "single-answer tasks", "soft": "several-answer tasks"}


def _kinds(results: dict[str, Any]) -> list[str]:
    """The task kinds the results cover, in :data:`KINDS` order."""
    first = next(iter(results["teacher"].values()))
    return [k for k in KINDS if k in first["sampled"]]


def comparisons(results: dict[str, Any], train_seeds: tuple[int, ...]) -> dict[str, Any]:
    """Each trained method − RKL, paired by training seed, per task kind and decoding (``{}`` with fewer than two
    training seeds: no comparison is claimed from one)."""
    if len(train_seeds) < 2:
        return {}
    out: dict[str, Any] = {}
    for name in results:
        if name in ("teacher", "warm-start", BASELINE):
            continue
        out[name] = {}
        for kind in _kinds(results):
            for decoding in ("sampled", "greedy"):
                mine = {s_: r[decoding][kind] for s_, r in results[name].items()}
                base = {s_: r[decoding][kind] for s_, r in results[BASELINE].items()}
                out[name][f"{kind}/{decoding}"] = paired_difference(mine, base)
    return out


def scores_table(results: dict[str, Any]) -> str:
    """ROUGE-L per model, task kind and decoding: mean ± std over training seeds (one value for one model)."""
    kinds = _kinds(results)
    cols = [f"{KINDS[k]}, {d}" for k in kinds for d in ("sampled", "greedy")]
    rows = []
    for name, by_seed in results.items():
        seeds = "–" if None in by_seed else str(len(by_seed))
        cells = [format_mean_std([r[d][k] for r in by_seed.values()]) for k in kinds for d in ("sampled", "greedy")]
        rows.append([LABELS[name], seeds, *cells])
    return table(["model", "training seeds", *cols], rows)


def comparison_table(comparison: dict[str, Any]) -> str:
    """Paired differences to RKL with their 95% intervals (``*``: the interval excludes 0)."""
    keys = list(next(iter(comparison.values())))
    cols = [f"{KINDS[k.split('/')[0]]}, {k.split('/')[1]} [95%]" for k in keys]
    rows = [[LABELS[name], *(format_difference(diffs[k]) for k in keys)] for name, diffs in comparison.items()]
    return table(["− RKL, paired by training seed", *cols], rows)


def reading(comparison: dict[str, Any]) -> list[str]:
    """One sentence per task kind on AdaKD-RKL − RKL, generated from the intervals: a difference is claimed only
    when its interval excludes 0."""
    sentences = []
    diffs = comparison.get("adakd-rkl", {})
    kinds = list(dict.fromkeys(k.split("/")[0] for k in diffs))
    for kind in kinds:
        parts = []
        for decoding in ("sampled", "greedy"):
            d = diffs[f"{kind}/{decoding}"]
            interval = f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
            if d["low"] > 0:
                parts.append(f"above RKL {decoding} ({interval})")
            elif d["high"] < 0:
                parts.append(f"below RKL {decoding} ({interval})")
            else:
                parts.append(f"not distinguishable from RKL {decoding} ({interval} contains 0)")
        sentences.append(f"On the {KINDS[kind]}, AdaKD-RKL is {parts[0]} and {parts[1]}.")
    return sentences


def _noise(results: dict[str, Any], kind: str) -> float:
    """The std over sampling seeds of one model, averaged over every model: the decoding noise of ``kind``."""
    return statistics.fmean(r["sampling_std"][kind] for by_seed in results.values() for r in by_seed.values())


def plot_scores(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: sampled ROUGE-L per model and task kind, error bars the std over training seeds."""
    from ..report.figures import figure, save

    kinds = _kinds(results)
    names = list(results)
    fig, ax = figure(9.5, 0.9 + 0.45 * len(names) * len(kinds), layout="tight")
    height = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        means, errs = [], []
        for name in names:
            values = [r["sampled"][kind] for r in results[name].values()]
            means.append(statistics.fmean(values))
            errs.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ys = [i + (j - (len(kinds) - 1) / 2) * height for i in range(len(names))]
        ax.barh(ys, means, height=height, xerr=errs, capsize=3, label=KINDS[kind])
    ax.set_yticks(range(len(names)), [LABELS[n] for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("ROUGE-L, sampled (error bars: std over training seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    save(fig, path)


def plot_comparison(comparison: dict[str, Any], path: Path) -> None:
    """The paired differences to RKL with their 95% intervals, one row per method."""
    from ..report.stats import plot_differences

    rows = [
        (LABELS[name], {f"{KINDS[k.split('/')[0]]}, {k.split('/')[1]}": d for k, d in diffs.items()})
        for name, diffs in comparison.items()
    ]
    plot_differences(rows, path, "ROUGE-L − RKL, paired by training seed (bars: 95% t interval)")


def write_report(
    out: Path,
    s: Any,
    results: dict[str, Any],
    comparison: dict[str, Any],
    times: dict[str, float],
    final_ratios: dict[str, float],
    vocab: int,
    quick: bool,
) -> Path:
    """Write ``out/report.md`` and return its path: the scores, the comparison (or why there is none), what AdaKD
    did, the settings and the wall times; the figures are the ones :func:`adakd.demo.run.run_demo` drew into
    ``out/plots``.

    Args:
        out: the demo's folder.
        s: its :class:`adakd.demo.run.DemoSettings`.
        results: scores by model and training seed (:func:`adakd.demo.scoring.score_model`).
        comparison: :func:`comparisons` of ``results`` (``{}``: none is claimed).
        times: wall seconds by stage.
        final_ratios: the AdaKD students' final LATF ratio by training seed.
        vocab: the tokenizer's size.
        quick: a ``--quick`` smoke check.
    """
    noise = ", ".join(f"{KINDS[k]} {_noise(results, k):.2f}" for k in _kinds(results))
    lines = [
        "# adakd demo report",
        "",
        f"{'Quick run (a smoke check)' if quick else 'Full run'}, data seed {s.seed}, training seeds "
        f"{', '.join(map(str, s.train_seeds))}; {times['total']:.0f} s in all on this machine's CPU.",
        "",
        "## Results on the test prompts",
        "",
        f"ROUGE-L (× 100) on {s.n_test} test prompts never seen in training (but for the two 20-entry tables), "
        f"sampled (temperature 1, mean over the sampling seeds {', '.join(map(str, s.eval_seeds))}) and greedy; "
        "mean ± std over training seeds. The several-answer tasks are scored against every valid answer.",
        "",
        scores_table(results),
        "",
        f"Decoding noise, apart: the std over sampling seeds of one trained model, averaged over models: {noise} "
        "ROUGE-L points. It measures the sampler, not training.",
        "",
        *_verdict_lines(comparison, len(s.train_seeds), quick),
        "![ROUGE-L](plots/rouge.png)",
        "",
        "ROUGE-L by task family (sampled, mean over sampling and training seeds):",
        "",
        _families_table(results),
        "",
        *_adakd_lines(final_ratios),
        *_settings_lines(s, vocab),
        "## Wall times (s)",
        "",
        table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in times.items()]),
        "",
    ]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path


def _families_table(results: dict[str, Any]) -> str:
    """Sampled ROUGE-L per model and task family, averaged over sampling and training seeds."""
    names = list(next(iter(results["teacher"].values()))["families"])
    rows = [
        [LABELS[name], *(f"{statistics.fmean(r['families'][f] for r in by_seed.values()):.1f}" for f in names)]
        for name, by_seed in results.items()
    ]
    return table(["model", *names], rows)


def _verdict_lines(comparison: dict[str, Any], n_seeds: int, quick: bool) -> list[str]:
    """The comparison section: paired differences and their reading, or why no comparison is claimed."""
    if not comparison:
        return [
            "## No comparison",
            "",
            f"{'A smoke check' if quick else 'One training seed'}: every method was trained once, so a difference "
            "between them cannot be told from the spread over training seeds, and none is claimed. Run the full "
            "demo (three training seeds) for a comparison.",
            "",
        ]
    return [
        "## AdaKD-RKL against RKL",
        "",
        f"Differences to RKL, paired by training seed ({n_seeds} seeds, same warm-start), with a 95% t interval; "
        "`*` marks an interval that excludes 0. Only those are differences this run can resolve.",
        "",
        comparison_table(comparison),
        "",
        *reading(comparison),
        "",
        "![paired differences](plots/paired.png)",
        "",
    ]


def _adakd_lines(final_ratios: dict[str, float]) -> list[str]:
    """The section on what AdaKD did: the LATF ratio, τ against difficulty, the training losses."""
    return [
        "## What AdaKD did",
        "",
        "The LATF kept ratio over training, per training seed (final r: "
        f"{', '.join(f'{v:.3f}' for v in final_ratios.values())}); every step keeps the hardest r of the valid "
        "tokens, by Hellinger distance between teacher and student:",
        "",
        "![ratio](plots/ratio.png)",
        "",
        "Per-token difficulty against the IDTS temperature on validation answers (the AdaKD student of the first "
        "training seed): hard tokens get τ < 1 (sharper targets), easy ones τ > 1; the tokens below the threshold "
        "are not trained on.",
        "",
        "![tau](plots/tau_vs_difficulty.png)",
        "",
        "Training losses of the first training seed (the KD losses are divergences, the SFT loss a cross-entropy: "
        "compare shapes, not levels):",
        "",
        "![losses](plots/losses.png)",
        "",
    ]


def _settings_lines(s: Any, vocab: int) -> list[str]:
    """The report's settings section."""
    return [
        "## Settings",
        "",
        f"- data: {s.n_train} train / {s.n_val} validation / {s.n_test} test examples; single-answer families: "
        f"{', '.join(FAMILIES)}; several-answer families (answers in known proportions): "
        f"{', '.join(SOFT_FAMILIES)}; MiniLLM prompt template",
        f"- tokenizer: byte-level BPE trained on the training split, {vocab} tokens",
        f"- teacher: Qwen2 architecture {s.teacher}, trained from scratch by SFT for {s.teacher_steps} steps",
        f"- students: Qwen2 architecture {s.student}: one shared SFT warm-start of {s.init_steps} steps from random "
        f"weights (so that they start close to the teacher), then {s.student_steps} steps of each objective from "
        "it, once per training seed (data order): RKL KD (every token, τ = 1) and AdaKD-RKL (Hellinger difficulty, "
        "LATF with its defaults, IDTS c = 0.5, τ_base = 1, τ² weight)",
        f"- learning rate {s.lr} for every run,"
        f" batch {s.batch_size} sequences, cosine schedule with 5% warm-up, AdamW, weight decay 0.01, clip 1.0",
        "",
    ]


def plot_all(
    plots: Path, s, methods, *, results, comparison, metrics, finals, loss_fns, teacher_dir, tokenizer, splits
):
    """The demo report's figures: scores, paired differences, the LATF ratio, the losses and τ against difficulty (the
    first training seed's AdaKD student, by its own loss settings)."""

    from ..models import load_causal_lm
    from ..report.plots import plot_losses, plot_ratio, plot_tau_vs_difficulty
    from .scoring import difficulty_sample

    first = s.train_seeds[0]
    plot_scores(results, plots / "rouge.png")
    if comparison:
        plot_comparison(comparison, plots / "paired.png")
    plot_ratio({f"AdaKD-RKL, training seed {k}": v for k, v in metrics["adakd-rkl"].items()}, plots / "ratio.png")
    plot_losses({LABELS[k]: metrics[k][first] for k in methods}, plots / "losses.png")
    teacher_model = load_causal_lm(str(teacher_dir), dtype="float32").eval()
    student_model = load_causal_lm(str(finals["adakd-rkl"][first]), dtype="float32").eval()
    loss_fn = loss_fns[first]
    scores, taus, kept, median = difficulty_sample(
        teacher_model, student_model, tokenizer, splits["validation"][:64], loss_fn
    )
    plot_tau_vs_difficulty(
        scores,
        taus,
        kept,
        plots / "tau_vs_difficulty.png",
        ratio=loss_fn.ratio,
        median=median,
        c=loss_fn.c,
        tau_base=loss_fn.tau_base,
    )
