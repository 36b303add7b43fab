"""Time to score the five evaluation sets (3,566 examples) with adakd.rouge_l, against rouge_score, in one run.

    python bench/rouge_bench.py [--data-dir ../shared/data/minillm-eval]

Each example is scored with another example's first reference as its "prediction" (realistic lengths), as one
seed of `adakd eval` would. Both implementations start cold (adakd's stem and token caches are cleared).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from adakd.eval.rouge import _stem, rouge_l, tokenize
from adakd.eval.sets import load_eval_set, resolve_eval_sets

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "minillm-eval"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("ADAKD_EVAL_DATA", str(DEFAULT)))
    args = p.parse_args(argv)
    paths = resolve_eval_sets(args.data_dir, ["dolly", "self-inst", "vicuna", "sinst", "uinst"])
    records = [r for name, path in paths.items() for r in load_eval_set(name, path).records]
    preds = [records[(i + 1) % len(records)].references[0] for i in range(len(records))]

    _stem.cache_clear()
    tokenize.cache_clear()
    start = time.perf_counter()
    ours = [rouge_l(pred, r.references) for pred, r in zip(preds, records, strict=True)]
    t_ours = time.perf_counter() - start

    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    start = time.perf_counter()
    theirs = [
        100 * max(scorer.score(target=ref, prediction=pred)["rougeL"].fmeasure for ref in r.references)
        for pred, r in zip(preds, records, strict=True)
    ]
    t_theirs = time.perf_counter() - start
    worst = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    refs = sum(len(r.references) for r in records)
    print(f"{len(records)} examples, {refs} references, sets: {', '.join(paths)}")
    print(f"adakd.rouge_l : {t_ours:6.2f} s   (target < 10 s)")
    print(f"rouge_score   : {t_theirs:6.2f} s   ({t_theirs / t_ours:.1f}x slower)")
    print(f"largest difference: {worst:.2e} ROUGE-L points")
    return 0 if worst < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
