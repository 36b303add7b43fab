"""The paper's evaluation protocol: generate for every set and seed, score ROUGE-L, aggregate, save.

Per set and seed, ROUGE-L is the mean over examples of the best-reference F-measure × 100; a set's figure is the
mean ± std over seeds (population std, ddof = 0), and the average row is the mean ± std over seeds of the
per-seed average over sets.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from ..files import write_json, write_jsonl
from ..generation import GenerationConfig
from .rouge import rouge_l
from .sets import ChatTemplate, EvalSet, chat_prompts, end_of_turn_ids

__all__ = ["evaluate", "format_table", "mean_std", "predictions_dir"]


def mean_std(values: list[float]) -> dict[str, float]:
    """``{"mean", "std"}`` of ``values`` (population std, ddof = 0, as the paper's tables; 0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def predictions_dir(output: str | Path) -> Path:
    """Where the per-seed predictions of ``results.json`` go: ``results.predictions/``."""
    output = Path(output)
    return output.with_name(output.stem + ".predictions")


def evaluate(
    backend,
    sets: list[EvalSet],
    seeds: list[int],
    config: GenerationConfig,
    output: str | Path,
    model_name: str,
    show_progress: bool = True,
    chat_template: ChatTemplate | None = None,
) -> dict[str, Any]:
    """Generate and score every set for every seed; write predictions and ``output``; return the results dict.

    Args:
        backend: a :mod:`adakd.generation` backend (``generate(prompts, seed, config, progress) -> list[str]``).
        sets: the evaluation sets (:func:`adakd.eval.sets.load_eval_set`).
        seeds: one generation pass per seed and set.
        config: the decoding settings; its ``stats`` accumulate the generated tokens and time.
        output: the results JSON; the predictions go to :func:`predictions_dir` (``<set>.seed<seed>.jsonl``).
        model_name: recorded as the results' ``model``.
        show_progress: a tqdm bar over all examples × seeds.
        chat_template: None: each record's ``prompt`` as it is (MiniLLM's Alpaca text). Else each record becomes one
            user turn rendered with this template and the generation prompt (:func:`adakd.eval.sets.chat_prompts`),
            and answers also end at the template's end of turn (:func:`adakd.eval.sets.end_of_turn_ids`).

    Returns:
        ``{"model", "datasets": {name: {"n", "path", "rougeL": {"mean", "std", "per_seed"}}}, "average",
        "generation"}``, as written to ``output`` (ROUGE-L × 100). ``generation.chat_template`` records the
        rendering: null (the raw prompts), ``"tokenizer"`` (the tokenizer's own template), or a template's name or
        file; ``generation.stop_tokens`` the tokens that ended an answer; ``generation.backend`` what generated them
        (``hf``, ``vllm``, ``vllm-server``, the last with ``generation.server``: its URL and served model).

    Raises:
        InputError: with ``chat_template``, a record that cannot be one user turn (naming its file and line).
    """
    from tqdm.auto import tqdm

    tokenizer = backend.tokenizer
    stops = [] if chat_template is None else end_of_turn_ids(tokenizer, chat_template)
    # Every set's prompts first: a record that cannot be a chat turn stops the run before any generation.
    all_prompts = [
        [r.prompt for r in s.records] if chat_template is None else chat_prompts(s, tokenizer, chat_template)
        for s in sets
    ]
    pred_dir = predictions_dir(output)
    total = sum(len(s.records) for s in sets) * len(seeds)
    per_seed_avg: dict[int, list[float]] = {seed: [] for seed in seeds}
    results: dict[str, Any] = {"model": model_name, "datasets": {}}
    start = time.perf_counter()
    scoring_seconds = 0.0
    with tqdm(total=total, desc="generating", unit="ex", disable=not show_progress) as progress:
        for s, prompts in zip(sets, all_prompts, strict=True):
            per_seed: dict[str, float] = {}
            for seed in seeds:
                progress.set_postfix_str(f"{s.name} seed {seed}")
                texts = backend.generate(prompts, seed, config, progress=progress, stop_token_ids=stops)
                t0 = time.perf_counter()
                scores = [rouge_l(t, r.references) for t, r in zip(texts, s.records, strict=True)]
                scoring_seconds += time.perf_counter() - t0
                per_seed[str(seed)] = statistics.fmean(scores) if scores else 0.0
                per_seed_avg[seed].append(per_seed[str(seed)])
                rows = _prediction_rows(s, texts, scores, prompts if chat_template is not None else None)
                write_jsonl(pred_dir / f"{s.name}.seed{seed}.jsonl", rows)  # atomic: never half a file
            results["datasets"][s.name] = {
                "n": len(s.records),
                "path": str(s.path),
                "rougeL": {**mean_std(list(per_seed.values())), "per_seed": per_seed},
            }
    averages = [statistics.fmean(v) for v in per_seed_avg.values() if v]
    results["average"] = mean_std(averages) if averages else {"mean": 0.0, "std": 0.0}
    results["generation"] = {
        "backend": getattr(backend, "name", type(backend).__name__),
        **({"server": backend.served} if hasattr(backend, "served") else {}),
        **_generation_settings(config, seeds, chat_template),
        "stop_tokens": tokenizer.convert_ids_to_tokens(
            list(dict.fromkeys(i for i in (tokenizer.eos_token_id, *stops) if i is not None))
        ),
        **_throughput(config.stats),
        "wall_seconds": time.perf_counter() - start,
        "scoring_seconds": scoring_seconds,
    }
    write_json(output, results)
    return results


def _prediction_rows(
    s: EvalSet, texts: list[str], scores: list[float], chat_prompts: list[str] | None
) -> list[dict[str, Any]]:
    """One set's predictions file for one seed: a row per record. ``"prompt"`` stays the record's own (adakd judge
    pairs two files' answers by it); with a chat template, ``"chat_prompt"`` is the text the model continued."""
    rows = [
        {"index": i, "prompt": r.prompt, "prediction": t, "references": list(r.references), "rougeL": sc}
        for i, (r, t, sc) in enumerate(zip(s.records, texts, scores, strict=True))
    ]
    if chat_prompts is not None:
        for row, text in zip(rows, chat_prompts, strict=True):
            row["chat_prompt"] = text
    return rows


def _generation_settings(
    config: GenerationConfig, seeds: list[int], chat_template: ChatTemplate | None
) -> dict[str, Any]:
    """The decoding settings the results record (``generation``'s first keys)."""
    return {
        "seeds": seeds,
        "greedy": config.greedy,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "batch_size": config.batch_size,
        "chat_template": None if chat_template is None else chat_template.source,
    }


def _throughput(gen: dict[str, Any]) -> dict[str, Any]:
    """Every decoded token (answers and the tokens that ended them) per second spent in the backend's generate."""
    return {
        "generated_tokens": int(gen["tokens"]),
        "answer_tokens": int(gen.get("answer_tokens", 0)),
        "generation_seconds": gen["seconds"],
        "tokens_per_second": gen["tokens"] / gen["seconds"] if gen["seconds"] else 0.0,
    }


def format_table(results: dict[str, Any]) -> str:
    """A markdown table: ROUGE-L mean ± std per set, then the average."""
    from ..markdown import table

    rows = [
        [name, d["n"], f"{d['rougeL']['mean']:.2f} ± {d['rougeL']['std']:.2f}"]
        for name, d in results["datasets"].items()
    ]
    avg = results["average"]
    rows.append(["average", "", f"{avg['mean']:.2f} ± {avg['std']:.2f}"])
    return table(["set", "n", "ROUGE-L"], rows)
