"""AdaKDLoss: token-adaptive distillation on materialised logits (the reference path).

Per micro-batch (``docs/ADAKD_SPEC.md``):

1. flatten the valid positions (label != -100): N tokens;
2. score each token's difficulty s_i at τ = 1 without gradient (Hellinger by default, Eq. 3);
3. keep the k = max(1, floor(N·r)) hardest tokens, r from LATF or a schedule (Eqs. 4-7);
4. give each kept token τ_i = τ_base·exp(−c·ŝ_i) over the kept tokens' median (IDTS, Eqs. 9-10);
5. loss = mean over kept tokens of τ_i² · D(p^τi, q^τi) for the base divergence D (Eq. 2).

This module imports only torch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .adaptive import LATF, RatioSchedule, idts_temperatures, keep_count, score_fn
from .divergences import compute_dtype, divergence_fn, log_probs

__all__ = ["AdaKDLoss", "align_vocab"]

SELECTIONS = ("latf", "fixed", "linear", "cosine", "all")
TEMPERATURES = ("inverse", "fixed", "reverse")
REDUCTIONS = ("mean", "sum")
STAT_KEYS = (
    "ratio",
    "valid_tokens",
    "kept_tokens",
    "tau_mean",
    "tau_min",
    "tau_max",
    "score_median",
    "score_threshold",
    "loss",
)


def align_vocab(student_logits: Tensor, teacher_logits: Tensor, vocab_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Crop the teacher's padding rows so both logits cover the student's vocabulary.

    Qwen2-7B pads its lm_head to 152,064 rows and Qwen2-1.5B to 151,936, with fewer real tokens than either:
    the extra teacher rows are padding and are dropped. A crop that would drop a real token is an error.

    Args:
        student_logits: ``[..., V_s]``.
        teacher_logits: ``[..., V_t]`` with V_t ≥ V_s and the same leading shape.
        vocab_size: the tokenizer's real vocabulary size, if known; must be ≤ V_s.

    Returns:
        ``(student_logits, teacher_logits[..., :V_s])`` (the student unchanged; the crop is a view).

    Raises:
        ValueError: the student's vocabulary is larger than the teacher's, ``vocab_size`` exceeds V_s (the crop
            would cut off real tokens), or the leading shapes differ.
    """
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must agree on every dimension but the vocabulary"
        )
    if v_s > v_t:
        raise ValueError(
            f"the student's vocabulary ({v_s}) is larger than the teacher's ({v_t}); only the teacher may "
            "carry padding rows"
        )
    if vocab_size is not None and vocab_size > v_s:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but the student logits only {v_s}: cropping the teacher "
            f"from {v_t} to {v_s} would drop real tokens"
        )
    if v_t > v_s:
        teacher_logits = teacher_logits[..., :v_s]
    return student_logits, teacher_logits


class AdaKDLoss(nn.Module):
    """The AdaKD loss (LATF token selection + IDTS temperatures) around any base divergence.

    Args:
        base: the base divergence (``adakd.DIVERGENCES``): ``fkl``, ``rkl`` (the paper's RKD), ``jsd``, ...
        base_params: its parameters, e.g. ``{"lam": 0.5}`` for ``jsd``.
        indicator: the difficulty score: ``hellinger`` | ``fkl`` | ``rkl`` | ``ce`` | ``jsd`` | ``nmtkd``.
        selection: ``latf`` (adaptive r) | ``fixed`` (r = ``ratio``) | ``linear`` | ``cosine`` (1 → ``ratio``
            over ``total_steps`` optimizer steps) | ``all`` (no selection).
        ratio: the fixed ratio, or the end ratio of ``linear``/``cosine``.
        temperature: ``inverse`` (IDTS) | ``fixed`` (τ = ``tau_base``) | ``reverse`` (τ_base·exp(+c·ŝ)).
        c: IDTS strength.
        tau_base: τ of a median-difficulty token (every token's τ with ``temperature="fixed"``).
        total_steps: the run's optimizer steps, for ``linear``/``cosine``.
        vocab_size: the tokenizer's real vocabulary size, checked by :func:`align_vocab`.
        ignore_index: the label of positions that take no loss.
        reduction: ``mean`` over kept tokens (the spec's L_t) or ``sum`` (for a caller that normalises by a
            global kept-token count).
        **latf_kwargs: :class:`adakd.LATF` arguments (``ema_decay``, ``tolerance``, ``step``, ``min_ratio``,
            ``max_ratio``, ``warmup_steps``); only with ``selection="latf"``.

    With ``selection="all"``, ``temperature="fixed"`` and ``tau_base=1`` the loss is the masked mean of the base
    divergence: plain logit KD.
    """

    def __init__(
        self,
        base: str = "rkl",
        *,
        base_params: dict[str, float] | None = None,
        indicator: str = "hellinger",
        selection: str = "latf",
        ratio: float = 1.0,
        temperature: str = "inverse",
        c: float = 0.5,
        tau_base: float = 1.0,
        total_steps: int | None = None,
        vocab_size: int | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        **latf_kwargs: Any,
    ) -> None:
        super().__init__()
        self.base = base
        self.base_params = dict(base_params or {})
        self.div = divergence_fn(base, **self.base_params)
        self.indicator = indicator
        self.score = score_fn(indicator)
        if selection not in SELECTIONS:
            raise ValueError(f"unknown selection {selection!r}; valid: {', '.join(SELECTIONS)}")
        if temperature not in TEMPERATURES:
            raise ValueError(f"unknown temperature {temperature!r}; valid: {', '.join(TEMPERATURES)}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"c must be a finite number >= 0, got {c}")
        if not (math.isfinite(tau_base) and tau_base > 0):
            raise ValueError(f"tau_base must be a positive finite number, got {tau_base}")
        if latf_kwargs and selection != "latf":
            raise ValueError(
                f"{', '.join(sorted(latf_kwargs))} only apply to selection='latf' (got selection={selection!r})"
            )
        self.selection = selection
        self.temperature = temperature
        self.c = float(c)
        self.tau_base = float(tau_base)
        self.vocab_size = vocab_size
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.controller: LATF | RatioSchedule | None
        if selection == "latf":
            valid = ("ema_decay", "tolerance", "step", "min_ratio", "max_ratio", "warmup_steps")
            unknown = sorted(set(latf_kwargs) - set(valid))
            if unknown:
                raise ValueError(f"unknown LATF argument(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
            self.controller = LATF(**latf_kwargs)
        elif selection == "all":
            self.controller = None
        else:
            self.controller = RatioSchedule(selection, ratio=ratio, total_steps=total_steps)
        self.stats: dict[str, float] = {}
        self._pending_loss = 0.0
        self._pending_count = 0

    # ----------------------------------------------------------------------------------------------------------
    @property
    def ratio(self) -> float:
        """The kept ratio r that the next forward uses."""
        return 1.0 if self.controller is None else self.controller.ratio

    def step(self, loss_value: float | None = None) -> float:
        """Advance LATF (or the schedule) once per optimizer step; returns the ratio for the next step.

        Args:
            loss_value: the step's distillation loss, averaged over gradient-accumulation micro-steps and
                data-parallel ranks. ``None`` uses the mean ``stats["loss"]`` of the forwards since the last
                step (right on a single process; under data parallelism pass the all-reduced mean).
        """
        if loss_value is None:
            if self._pending_count == 0:
                raise ValueError("AdaKDLoss.step() without a loss value needs at least one forward since the last step")
            loss_value = self._pending_loss / self._pending_count
        self._pending_loss, self._pending_count = 0.0, 0
        if self.controller is not None:
            self.controller.update(loss_value)
        return self.ratio

    def get_extra_state(self) -> dict[str, Any]:
        return {"controller": None if self.controller is None else self.controller.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        ctrl = state.get("controller") if isinstance(state, dict) else None
        if self.controller is not None:
            if ctrl is None:
                raise ValueError(f"AdaKDLoss state has no {self.selection!r} controller state")
            self.controller.load_state_dict(ctrl)

    def extra_repr(self) -> str:
        return (
            f"base={self.base!r}, base_params={self.base_params}, indicator={self.indicator!r}, "
            f"selection={self.selection!r}, ratio={self.ratio:.4g}, temperature={self.temperature!r}, "
            f"c={self.c}, tau_base={self.tau_base}"
        )

    # ----------------------------------------------------------------------------------------------------------
    def temperatures(self, kept_scores: Tensor | None) -> Tensor | float:
        """τ for the kept tokens' scores ``[k]``: a ``[k]`` tensor (IDTS) or the float τ_base."""
        if self.temperature == "fixed" or kept_scores is None:
            return self.tau_base
        return idts_temperatures(kept_scores, c=self.c, tau_base=self.tau_base, reverse=self.temperature == "reverse")

    def _record(
        self, ratio: float, n: int, k: int, tau: Tensor | float, kept_scores: Tensor | None, mean_loss: Tensor
    ) -> None:
        """Fill ``self.stats``. ``loss`` is L_t, the mean over kept tokens, whatever the reduction; the score
        statistics are NaN in plain-KD mode (``selection="all"``, ``temperature="fixed"``), which computes none."""
        if k == 0:  # nothing valid in this batch
            values = [self.tau_base] * 3 + [0.0] * 3
        else:
            loss_value = mean_loss.detach().float()
            t = tau.float() if isinstance(tau, Tensor) else torch.full_like(loss_value, tau)
            nan = torch.full_like(loss_value, math.nan)  # plain KD computes no scores
            s = kept_scores.float() if kept_scores is not None else None
            stacked = torch.stack(
                [
                    t.mean(),
                    t.min(),
                    t.max(),
                    nan if s is None else s.median(),
                    nan if s is None else s.min(),
                    loss_value,
                ]
            )
            values = stacked.tolist()  # one device sync for all the statistics
        self.stats = dict(zip(STAT_KEYS, [ratio, float(n), float(k), *values], strict=True))
        self._pending_loss += self.stats["loss"]
        self._pending_count += 1

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
        """The AdaKD loss of one micro-batch.

        Args:
            student_logits: ``[..., V_s]``; position i predicts ``labels[i]`` (the caller shifts).
            teacher_logits: ``[..., V_t]``, V_t ≥ V_s (cropped by :func:`align_vocab`). No gradient flows to it.
            labels: ``[...]`` target ids; ``ignore_index`` (-100) marks positions without loss.

        Returns:
            A float32 scalar (float64 for float64 logits). 0, with a zero gradient, when every label is masked.
        """
        student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, self.vocab_size)
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"labels {tuple(labels.shape)} must have the logits' leading shape {tuple(student_logits.shape[:-1])}"
            )
        vocab = student_logits.shape[-1]
        student = student_logits.reshape(-1, vocab)
        teacher = teacher_logits.detach().reshape(-1, vocab)
        flat_labels = labels.reshape(-1)
        dtype = compute_dtype(student, teacher)
        rows = (flat_labels != self.ignore_index).nonzero().squeeze(1)
        n = rows.numel()
        ratio = self.ratio
        if n == 0:
            # An empty sum keeps the graph (backward gives zeros), even if the logits hold -inf.
            loss = student[:0].sum().to(dtype)
            self._record(ratio, 0, 0, self.tau_base, None, loss)
            return loss

        k = n if self.controller is None else keep_count(n, ratio)
        scores = None
        if k < n or self.temperature != "fixed":
            # Plain KD (keep all, one τ) needs no scores: it skips this extra softmax pass over both vocabularies.
            with torch.no_grad():
                scores = self.score(
                    log_probs(student.detach().index_select(0, rows), 1.0, dtype),
                    log_probs(teacher.index_select(0, rows), 1.0, dtype),
                    flat_labels.index_select(0, rows),
                )
        if k < n:
            kept = scores.topk(k, sorted=False).indices
            rows, scores = rows[kept], scores[kept]
        # One gather of the rows that take loss, straight from the inputs (no intermediate copy of all valid rows).
        if n < student.shape[0] or k < n:
            student, teacher = student.index_select(0, rows), teacher.index_select(0, rows)

        tau = self.temperatures(scores)
        per_token = self.div(log_probs(student, tau, dtype), log_probs(teacher, tau, dtype))
        per_token = per_token * (tau * tau)
        loss = per_token.mean() if self.reduction == "mean" else per_token.sum()
        self._record(ratio, n, k, tau, scores, loss if self.reduction == "mean" else per_token.mean())
        return loss
