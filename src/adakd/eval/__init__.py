"""Evaluation: ROUGE-L (MiniLLM's metric), the five evaluation sets, the protocol runner, result tables, the judge.

Sampling lives in :mod:`adakd.generation` (shared with on-policy training) and the charts in :mod:`adakd.report.plots`.
Needs the ``eval`` extra (rouge-score) and, for generation, the ``train`` extra (transformers).
"""

from .rouge import lcs_length, rouge_l
from .sets import EVAL_SETS, load_eval_set, resolve_eval_sets

__all__ = ["EVAL_SETS", "lcs_length", "load_eval_set", "resolve_eval_sets", "rouge_l"]
