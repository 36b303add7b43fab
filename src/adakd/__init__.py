"""adakd: token-adaptive knowledge distillation for large language models (AdaKD, AAAI-26).

The public Python API. The math lives in :mod:`adakd.divergences` and :mod:`adakd.adaptive` (torch only);
:mod:`adakd.loss` composes them into :class:`AdaKDLoss`.
"""

from . import _without_numpy  # noqa: F401  (first: before anything imports torch)
from ._version import __version__
from .adaptive import INDICATORS, LATF, RatioSchedule, difficulty_scores, idts_temperatures, select_tokens
from .divergences import DIVERGENCES, divergence, hellinger_distance
from .loss import AdaKDLoss, Mix, align_vocab
from .sparse import SparseTeacher, sparse_divergence, sparse_from_logits


def rouge_l(prediction: str, references: str | list[str]) -> float:
    """ROUGE-L F-measure × 100, maximum over references: MiniLLM's metric (needs the ``eval`` extra)."""
    from .eval.rouge import rouge_l as _rouge_l

    return _rouge_l(prediction, references)


__all__ = [
    "DIVERGENCES",
    "INDICATORS",
    "LATF",
    "Mix",
    "AdaKDLoss",
    "RatioSchedule",
    "SparseTeacher",
    "__version__",
    "align_vocab",
    "difficulty_scores",
    "divergence",
    "hellinger_distance",
    "idts_temperatures",
    "rouge_l",
    "select_tokens",
    "sparse_divergence",
    "sparse_from_logits",
]
