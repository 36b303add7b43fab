"""Scoring the demo's models: ROUGE-L and exact match on the test prompts with ``adakd eval``'s code, sampled and
greedy, by task kind and family; and the per-token difficulty, kept mask and IDTS τ behind the report's figure."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import Record
from ..models import load_causal_lm
from .tasks import FAMILIES, SOFT_FAMILIES, TaskRecord

__all__ = ["difficulty_sample", "score_model"]


def score_model(
    folder: Path, tokenizer: Any, test: list[TaskRecord], test_path: Path, eval_seeds: Sequence[int], out_json: Path
) -> dict[str, Any]:
    """Score one saved model on the test prompts: sampled over ``eval_seeds`` and greedy, with ``adakd eval``'s
    code. Returns, per decoding, ROUGE-L and exact match (an answer equal to any valid one) over all prompts and
    per task kind (``all``, ``exact``, ``soft``), the spread over sampling seeds, and ROUGE-L per family.

    The predictions and their scores are written next to ``out_json`` (``adakd eval``'s layout), sampled and greedy.
    """
    from ..eval.run import evaluate, predictions_dir
    from ..eval.sets import EvalSet
    from ..generation import GenerationConfig, HFBackend

    model = load_causal_lm(str(folder), dtype="float32")
    backend = HFBackend(model, tokenizer)
    sets = [EvalSet("test", test_path, test)]
    common = dict(max_length=128, max_prompt_length=96, batch_size=48)
    greedy_json = out_json.with_name(out_json.stem + "-greedy.json")
    evaluate(backend, sets, list(eval_seeds), GenerationConfig(**common), out_json, "", show_progress=False)
    evaluate(backend, sets, [0], GenerationConfig(**common, greedy=True), greedy_json, "", show_progress=False)

    family = {r.prompt: (r.family, r.kind) for r in test}  # test prompts are distinct

    def read(json_path: Path, seed: int) -> list[dict[str, Any]]:
        path = predictions_dir(json_path) / f"test.seed{seed}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def by_kind(rows: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
        rouge: dict[str, list[float]] = {"all": []}
        exact: dict[str, list[float]] = {"all": []}
        for row in rows:
            hit = 100.0 * any(row["prediction"].strip() == ref.strip() for ref in row["references"])
            for key in ("all", family[row["prompt"]][1]):
                rouge.setdefault(key, []).append(row["rougeL"])
                exact.setdefault(key, []).append(hit)
        return {k: statistics.fmean(v) for k, v in rouge.items()}, {k: statistics.fmean(v) for k, v in exact.items()}

    sampled_rows = [read(out_json, seed) for seed in eval_seeds]
    sampled = [by_kind(rows) for rows in sampled_rows]
    greedy_rouge, greedy_exact = by_kind(read(greedy_json, 0))
    kinds = list(sampled[0][0])
    families: dict[str, list[float]] = {}
    for row in (row for rows in sampled_rows for row in rows):
        families.setdefault(family[row["prompt"]][0], []).append(row["rougeL"])
    return {
        "sampled": {k: statistics.fmean(r[k] for r, _ in sampled) for k in kinds},
        "sampling_std": {k: statistics.stdev(r[k] for r, _ in sampled) if len(sampled) > 1 else 0.0 for k in kinds},
        "greedy": greedy_rouge,
        "exact_match_sampled": {k: statistics.fmean(e[k] for _, e in sampled) for k in kinds},
        "exact_match_greedy": greedy_exact,
        # single-answer families first, in the tasks module's order
        "families": {k: statistics.fmean(families[k]) for k in (*FAMILIES, *SOFT_FAMILIES) if k in families},
    }


@torch.no_grad()
def difficulty_sample(
    teacher: Any, student: Any, tokenizer: Any, records: list[Record], loss_fn: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Per-token Hellinger difficulty, the kept mask and the IDTS τ on validation answers, by the run's own loss
    settings (its final ratio, c and τ_base) and the loss's own rule (:func:`adakd.select_tokens`).

    Returns:
        ``(scores [N], taus [N], kept [N] bool, median)`` over the N answer tokens; dropped tokens get the τ they
        would have had.
    """
    from ..adaptive import difficulty_scores, idts_from_median, select_tokens
    from ..data import DistillCollator, build_examples
    from ..shapes import align_vocab

    examples, _ = build_examples(records, tokenizer, max_length=128, max_prompt_length=96)
    batch = DistillCollator(tokenizer.pad_token_id)(examples)
    labels = batch["labels"][:, 1:]
    zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    zs, zt = align_vocab(zs, zt)
    scores = difficulty_scores(loss_fn.indicator, zs, zt)[labels != -100]
    sel = select_tokens(scores, loss_fn.ratio, c=loss_fn.c, tau_base=loss_fn.tau_base)
    # Dropped tokens are shown at the τ they would have had (never used in training).
    taus = idts_from_median(scores, sel.median, c=loss_fn.c, tau_base=loss_fn.tau_base)
    return scores, taus, sel.kept, sel.median.item()
