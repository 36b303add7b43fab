"""AdaKDLoss: token-adaptive distillation on materialised logits (the reference path).

Per micro-batch (``docs/method.md``):

1. flatten the valid positions (label != -100): N tokens;
2. score each token's difficulty s_i at τ = 1 without gradient (Hellinger by default, Eq. 3);
3. keep the k = max(1, floor(N·r)) hardest tokens, r from LATF or a schedule (Eqs. 4-7);
4. give each kept token τ_i = τ_base·exp(−c·ŝ_i) over the kept tokens' median (IDTS, Eqs. 9-10);
5. loss = mean over kept tokens of τ_i² · D(p^τi, q^τi) for the base divergence D (Eq. 2).

This module imports only torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .adaptive import keep_count, score_fn, select_tokens
from .divergences import compute_dtype, divergence_fn
from .errors import NonFiniteLossError, OptionError
from .fused import (
    CrossEntropyPart,
    FusedKeptLoss,
    FusedKeptLossTauGrad,
    FusedOnePassLoss,
    chunk_loss_fn,
    chunked_scores,
    default_chunk_size,
    fused_cross_entropy,
)
from .labels import IGNORE_INDEX
from .loss_options import C_MAX, build_controller, check_options
from .loss_report import LossReport, Mix, make_report
from .shapes import align_vocab, check_hidden_inputs, check_student_inputs, check_vocab_sizes
from .sparse import FULL_STUDENT_INDICATORS, SparseTeacher, check_sparse, logit_scorer, pair_log_probs

__all__ = [
    "C_MAX",
    "AdaKDLoss",
    "LossReport",
    "Mix",
    "NonFiniteLossError",
    "SparseTeacher",
    "align_vocab",
    "check_vocab_sizes",
]


class AdaKDLoss(nn.Module):
    """The AdaKD loss (LATF token selection + IDTS temperatures) around any base divergence.

    Args:
        base: the base divergence (``adakd.DIVERGENCES``): ``fkl``, ``rkl`` (the paper's RKD), ``jsd``, ...
        base_params: its parameters, e.g. ``{"lam": 0.5}`` for ``jsd``.
        indicator: the difficulty score: ``hellinger`` | ``fkl`` | ``rkl`` | ``ce`` | ``jsd`` | ``nmtkd``.
        selection: ``latf`` (adaptive r) | ``fixed`` (r = ``ratio``) | ``linear`` | ``cosine`` (1 → ``ratio``
            over ``total_steps`` optimizer steps) | ``all`` (no selection).
        ratio: the fixed ratio, or the end ratio of ``linear``/``cosine`` (default 1). Not with ``latf``, which
            starts at its ``max_ratio`` (r_0 = r_max) and moves by itself.
        temperature: ``inverse`` (IDTS) | ``fixed`` (τ = ``tau_base``) | ``reverse`` (τ_base·exp(+c·ŝ)).
        c: IDTS strength.
        tau_base: τ of a median-difficulty token (every token's τ with ``temperature="fixed"``).
        total_steps: the run's optimizer steps, for ``linear``/``cosine``.
        vocab_size: the tokenizer's real vocabulary size, checked by :func:`align_vocab`.
        ignore_index: the label of positions that take no loss.
        reduction: ``mean`` over kept tokens (L_t of docs/method.md) or ``sum`` (for a caller that normalises by a
            global kept-token count).
        impl: the default implementation of :meth:`forward_hidden`: ``torch`` or ``compile``.
        one_pass: the default of :meth:`forward_hidden`'s approximate one-pass mode.
        tau_weight: ``squared`` (each kept token's loss times τ_i², Eq. 2 and the authors' code) or ``none``
            (no factor: the objective whose gradients the paper's Eqs. 11–17 analyse).
        detach_tau: ``True`` (the paper: τ_i carries no gradient) or ``False`` (the authors' released code: the
            gradient also flows through τ_i, i.e. through the kept tokens' scores and their median). The kept set
            is a selection and carries no gradient either way. Not with ``one_pass``.
        **latf_kwargs: :class:`adakd.LATF` arguments (``ema_decay``, ``tolerance``, ``step_size``, ``min_ratio``,
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
        ratio: float | None = None,
        temperature: str = "inverse",
        c: float = 0.5,
        tau_base: float = 1.0,
        total_steps: int | None = None,
        vocab_size: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        impl: str = "torch",
        one_pass: bool = False,
        tau_weight: str = "squared",
        detach_tau: bool = True,
        **latf_kwargs: Any,
    ) -> None:
        super().__init__()
        check_options(
            selection=selection, temperature=temperature, reduction=reduction, impl=impl, c=c,
            tau_weight=tau_weight, detach_tau=detach_tau, one_pass=one_pass, tau_base=tau_base, ratio=ratio,
            latf_kwargs=latf_kwargs,
        )  # fmt: skip
        self.base = base
        self.base_params = dict(base_params or {})
        self.div = divergence_fn(base, **self.base_params)
        self.indicator = indicator
        self.score = score_fn(indicator)
        self.selection = selection
        self.temperature = temperature
        self.c = float(c)
        self.tau_base = float(tau_base)
        self.vocab_size = vocab_size
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.controller = build_controller(selection, ratio, total_steps, latf_kwargs)
        self.impl = impl
        self.one_pass = bool(one_pass)
        self.tau_weight = tau_weight
        self.detach_tau = detach_tau
        # Gradients through τ need scores computed with gradient, by an indicator that keeps its inputs intact.
        self.tau_has_grad = not detach_tau and temperature != "fixed"
        self.score_with_grad = score_fn(indicator, differentiable=True)
        self._prev_scores: Tensor | None = None  # the last micro-batch's scores, for the one-pass mode
        self._chunk_fns: dict[tuple[torch.dtype, str], Any] = {}
        self.last_report: LossReport | None = None
        self._pending = (0.0, 0)  # (Σ L_t, count) of the training forwards since the last step
        self._forwards = 0  # every training forward since the last step, batches without a valid token included

    # ----------------------------------------------------------------------------------------------------------
    @property
    def ratio(self) -> float:
        """The kept ratio r that the next forward uses."""
        return 1.0 if self.controller is None else self.controller.ratio

    def step(self, loss_value: float | None = None) -> float:
        """Advance LATF (or the schedule) once per optimizer step; returns the ratio for the next step.

        Args:
            loss_value: the step's distillation loss, averaged over gradient-accumulation micro-steps and
                data-parallel ranks. ``None`` uses the mean L_t of the training-mode forwards since the last
                step (:meth:`pending`; right on a single process; under data parallelism pass the all-reduced
                mean).
        """
        if loss_value is None:
            if self._forwards == 0 and self._pending[1] == 0:
                raise ValueError("AdaKDLoss.step() without a loss value needs at least one forward since the last step")
            if self._pending[1] == 0:
                # Only batches whose labels were all ignored: no L_t to move the ratio on, so it stays; the step
                # still counts as done (a loop that skips nothing must not fail on such a batch).
                self._pending, self._forwards = (0.0, 0), 0
                return self.ratio
            loss_value = self._pending[0] / self._pending[1]
        self._pending, self._forwards = (0.0, 0), 0
        if self.controller is not None:
            self.controller.update(loss_value)
        return self.ratio

    @property
    def stats(self) -> dict[str, float]:
        """The last forward's statistics (:meth:`LossReport.as_dict`); ``{}`` before any forward."""
        return {} if self.last_report is None else self.last_report.as_dict()

    def pending(self) -> tuple[float, int]:
        """(Σ L_t, count) over the forwards in training mode since the last :meth:`step` (a trainer all-reduces
        these across ranks and passes the mean to :meth:`step`). Forwards in eval mode (``loss_fn.eval()``) and
        batches without a valid token do not count."""
        return self._pending

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "controller": None if self.controller is None else self.controller.state_dict(),
            "one_pass_scores": None if self._prev_scores is None else self._prev_scores.cpu(),
            # The run's own settings, for tools that read a run back (``adakd inspect`` on a final/ folder);
            # loading ignores them (the constructor's arguments rule).
            "settings": {
                "indicator": self.indicator, "selection": self.selection, "temperature": self.temperature,
                "c": self.c, "tau_base": self.tau_base, "tau_weight": self.tau_weight, "detach_tau": self.detach_tau,
                "ratio": self.ratio,
            },
        }  # fmt: skip

    def set_extra_state(self, state: dict[str, Any]) -> None:
        ctrl = state.get("controller") if isinstance(state, dict) else None
        if isinstance(state, dict) and state.get("one_pass_scores") is not None:
            self._prev_scores = state["one_pass_scores"]
        if self.controller is not None:
            if ctrl is None:
                raise ValueError(f"AdaKDLoss state has no {self.selection!r} controller state")
            self.controller.load_state_dict(ctrl)

    def extra_repr(self) -> str:
        return (
            f"base={self.base!r}, base_params={self.base_params}, indicator={self.indicator!r}, "
            f"selection={self.selection!r}, ratio={self.ratio:.4g}, temperature={self.temperature!r}, "
            f"c={self.c}, tau_base={self.tau_base}, tau_weight={self.tau_weight!r}, detach_tau={self.detach_tau}"
        )

    # ----------------------------------------------------------------------------------------------------------
    def _weight(self, tau: Tensor | float) -> Tensor | float:
        """The per-token factor of Eq. 2: τ² (``tau_weight="squared"``) or 1 (``"none"``)."""
        return tau * tau if self.tau_weight == "squared" else 1.0

    def _record(
        self,
        loss: Tensor,
        ratio: float,
        n: int,
        k: int,
        tau: Tensor | float,
        kept_scores: Tensor | None,
        mean_loss: Tensor | float,
        ce_loss: Tensor | float = math.nan,
    ) -> LossReport:
        """The :class:`LossReport` of this forward, kept as ``last_report``; L_t joins :meth:`pending` in training
        mode when the batch had valid tokens. Called only once the loss is known to be finite."""
        report = make_report(loss, ratio, n, k, tau, kept_scores, mean_loss, self.tau_base, ce_loss)
        self.last_report = report
        self._forwards += int(self.training)
        if self.training and k > 0:
            self._pending = (self._pending[0] + report.mean_loss, self._pending[1] + 1)
        return report

    def _finite(self, loss: Tensor) -> None:
        # Checked before _record, on both paths: a bad batch must not reach LATF's EMA nor the statistics.
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(
                "non-finite AdaKD loss: NaN or +inf logits, a row of -inf, or a token that one model gives "
                "probability 0 and the other does not"
            )

    def _scorer(self, dtype: torch.dtype, differentiable: bool = False):
        """The indicator on logits (dense or sparse teacher), at τ = 1."""
        score = self.score_with_grad if differentiable else self.score
        direct = None if differentiable else self.indicator
        return logit_scorer(score, dtype, self.indicator in FULL_STUDENT_INDICATORS, direct)

    @staticmethod
    def _ce_coef(ce_weight: float, n: int, k: int, reduction: str) -> float:
        """The factor of Σ CE in a loss with ``ce_weight`` w: w·CE_mean next to L_t (``mean``), or k times that next
        to the kept tokens' sum (``sum``, whose KD term is k·L_t), CE_mean being over the n valid tokens."""
        return ce_weight / n if reduction == "mean" else ce_weight * k / n

    def _needs_scores(self, n: int) -> bool:
        """Whether n valid tokens need difficulty scores: not in plain-KD mode (keep all, one τ)."""
        keeps_all = self.controller is None or keep_count(n, self.ratio) == n
        return not (keeps_all and self.temperature == "fixed")

    def _select(
        self, n: int, score_pass: Callable[[], Tensor]
    ) -> tuple[float, int, Tensor | None, Tensor | None, Tensor | float]:
        """Selection and temperatures for n valid tokens (Eqs. 4-10), shared by both paths.

        ``score_pass()`` returns the ``[n]`` difficulty scores; it is not called in plain-KD mode (keep all, one τ),
        which needs none. Returns ``(ratio, k, kept [k] | None (None: keep all), kept_scores [k] | None, tau)``.
        """
        ratio = self.ratio
        k = n if self.controller is None else keep_count(n, ratio)
        if not self._needs_scores(n):
            return ratio, k, None, None, self.tau_base
        scores = score_pass()
        sel = select_tokens(
            scores, ratio if self.controller is not None else 1.0, temperature=self.temperature, c=self.c,
            tau_base=self.tau_base, differentiable=self.tau_has_grad,
        )  # fmt: skip
        if k < n:
            return ratio, k, sel.index, scores[sel.index], sel.tau
        # Every token kept: stay in position order (no gather of the logits), τ moved back to it.
        tau = sel.tau
        if isinstance(tau, Tensor):
            inverse = torch.empty_like(sel.index)
            inverse[sel.index] = torch.arange(n, device=sel.index.device)
            tau = tau[inverse]
        return ratio, k, None, scores, tau

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | SparseTeacher,
        labels: Tensor,
        *,
        ce_weight: float = 0.0,
        mix: Mix | None = None,
        return_report: bool = False,
    ) -> Tensor | tuple[Tensor, LossReport]:
        """The AdaKD loss of one micro-batch, on materialised logits (the reference path).

        Args:
            student_logits: ``[..., V_s]``; position i predicts ``labels[i]`` (the caller shifts).
            teacher_logits: ``[..., V_t]``, V_t ≥ V_s (cropped by :func:`align_vocab`). No gradient flows to it.
                Or a :class:`adakd.sparse.SparseTeacher` with the same leading shape (top-k ids < V_s, their
                log-probabilities and the tail; a teacher cache): the divergence, the scores and IDTS then work on
                the k + 1 coarse outcomes (``docs/method.md``, "Sparse teacher").
            labels: ``[...]`` target ids; ``ignore_index`` (-100) marks positions without loss.
            ce_weight: w ≥ 0 adds w × the student's mean cross-entropy over the valid tokens: the loss is
                L_t + w·CE (``reduction="mean"``; with the paper's kd_ratio α, α·(L_t + (1−α)/α·CE) is its mix), or
                k·(L_t + w·CE) for ``reduction="sum"``, k the kept count. LATF and the report's ``mean_loss`` see
                L_t alone; the report's ``ce_loss`` is the CE.
            mix: a :class:`Mix` (α, W): the loss is ``(1 − α)·ΣCE/W + α·ΣKD_kept/(W·k/n)`` instead, whatever
                ``reduction`` (not with ``ce_weight``). The CE is ``F.cross_entropy`` of ``student_logits.float()``
                summed over the valid tokens; ``teacher_logits`` may be None at α = 0, which computes the CE alone
                and leaves the loss's state (LATF, ``stats``) as it is. The report's ``ce_term`` and ``kd_term``
                are the two parts.
            return_report: also return the :class:`LossReport` (what was kept, τ, L_t).

        Returns:
            A float32 scalar (float64 for float64 logits), or ``(loss, report)``. 0, with a zero gradient, when
            every label is masked.

        Raises:
            NonFiniteLossError: the loss is NaN or inf; nothing (statistics, LATF) has changed then.
        """
        if mix is None:
            loss, report = self._forward_logits(student_logits, teacher_logits, labels, ce_weight, self.reduction)
        else:
            loss, report = self._mixed_logits(student_logits, teacher_logits, labels, mix, ce_weight)
        return (loss, report) if return_report else loss

    def _mixed_logits(
        self, student_logits: Tensor, teacher_logits: Tensor | SparseTeacher | None, labels: Tensor, mix: Mix,
        ce_weight: float,
    ) -> tuple[Tensor, LossReport]:  # fmt: skip
        """:meth:`forward` with a :class:`Mix`: the trainer's CE on the float32 logits, the KD sum, both normalised."""
        _check_mix(mix, ce_weight, teacher_logits)
        alpha = mix.kd_ratio
        denom = _window(mix, labels, self.ignore_index)
        ce_sum = None
        if alpha < 1:
            flat = student_logits.reshape(-1, student_logits.shape[-1]).float()
            ce_sum = torch.nn.functional.cross_entropy(
                flat, labels.reshape(-1), ignore_index=self.ignore_index, reduction="sum"
            )
            self._finite(ce_sum)  # before the KD forward moves any state
        if alpha == 0:
            return self._ce_only(ce_sum, labels, denom)
        kd_sum, report = self._forward_logits(student_logits, teacher_logits, labels, 0.0, "sum")
        denom = denom.to(torch.promote_types(denom.dtype, kd_sum.dtype))  # float64 losses keep float64 W·k/n
        kd = kd_sum / (denom * _kept_fraction(report))
        loss = alpha * kd if ce_sum is None else (1 - alpha) * (ce_sum / denom) + alpha * kd
        return loss, self._mixed_report(report, loss, denom, alpha, ce_sum)

    def _ce_only(self, ce_sum: Tensor, labels: Tensor, denom: Tensor) -> tuple[Tensor, LossReport]:
        """A mix at α = 0: ΣCE/W and its report (nothing kept, no KD); the loss's state does not change."""
        loss = ce_sum / denom
        self._finite(loss)
        n, ce_total, window = torch.stack(
            [(labels != self.ignore_index).sum().double(), ce_sum.detach().double(), denom.double()]
        ).tolist()
        n = int(n)
        ce_loss = ce_total / n if n else math.nan
        report = make_report(loss, self.ratio, n, 0, self.tau_base, None, math.nan, self.tau_base, ce_loss)
        return loss, dataclasses.replace(report, mean_loss=math.nan, ce_term=ce_total / window)

    def _mixed_report(
        self, report: LossReport, loss: Tensor, denom: Tensor, alpha: float, ce_sum: Tensor | None
    ) -> LossReport:
        """``report`` (kept as ``last_report``) with the mix's loss, ``ce_term`` and ``kd_term`` (one device sync)."""
        n = report.valid_tokens
        ce = torch.zeros_like(denom) if ce_sum is None else ce_sum.detach()
        value, ce_total, window = torch.stack([loss.detach().double(), ce.double(), denom.double()]).tolist()
        ce_loss = report.ce_loss if ce_sum is None else (ce_total / n if n else 0.0)
        ce_term = math.nan if alpha == 1 else ce_loss * n / window if n else 0.0
        # From the loss itself: the report's mean_loss is rounded to float32.
        kd_term = value if alpha == 1 else (value - (1 - alpha) * ce_term) / alpha
        report = dataclasses.replace(report, loss=loss, ce_loss=ce_loss, ce_term=ce_term, kd_term=kd_term)
        self.last_report = report
        return report

    def _forward_logits(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | SparseTeacher,
        labels: Tensor,
        ce_weight: float,
        reduction: str,
    ) -> tuple[Tensor, LossReport]:
        """:meth:`forward` without a mix, under ``reduction``."""
        sparse = isinstance(teacher_logits, SparseTeacher)
        if sparse:
            check_sparse(
                teacher_logits, student_logits.shape[:-1], student_logits.shape[-1], labels != self.ignore_index
            )
            check_vocab_sizes(student_logits.shape[-1], student_logits.shape[-1], self.vocab_size)
        else:
            student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, self.vocab_size)
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"labels {tuple(labels.shape)} must have the logits' leading shape {tuple(student_logits.shape[:-1])}"
            )
        vocab = student_logits.shape[-1]
        student = student_logits.reshape(-1, vocab)
        if sparse:
            teacher = SparseTeacher(*(t.detach() for t in teacher_logits)).reshape(-1)
            dtype = compute_dtype(student, teacher.logprobs)
        else:
            teacher = teacher_logits.detach().reshape(-1, vocab)
            dtype = compute_dtype(student, teacher)
        flat_labels = labels.reshape(-1)
        rows = (flat_labels != self.ignore_index).nonzero().squeeze(1)
        n = rows.numel()
        if n == 0:
            # An empty sum keeps the graph (backward gives zeros), even if the logits hold -inf.
            loss = student[:0].sum().to(dtype)
            return loss, self._record(loss, self.ratio, 0, 0, self.tau_base, None, loss)

        def score_pass() -> Tensor:
            targets = flat_labels.index_select(0, rows)
            if self.tau_has_grad:  # τ will carry the gradient back through these scores
                return self._scorer(dtype, True)(student.index_select(0, rows), _rows(teacher, rows), targets)
            with torch.no_grad():
                return self._scorer(dtype)(student.detach().index_select(0, rows), _rows(teacher, rows), targets)

        if ce_weight < 0 or not math.isfinite(ce_weight):
            raise ValueError(f"ce_weight must be a finite number >= 0, got {ce_weight}")
        ratio, k, kept, scores, tau = self._select(n, score_pass)
        ce_sum = None
        if ce_weight:
            valid = student.index_select(0, rows).to(dtype)
            ce_sum = torch.nn.functional.cross_entropy(valid, flat_labels.index_select(0, rows), reduction="sum")
        if kept is not None:
            rows = rows[kept]
        # One gather of the rows that take loss, straight from the inputs (no intermediate copy of all valid rows).
        if rows.numel() < student.shape[0]:
            student, teacher = student.index_select(0, rows), _rows(teacher, rows)
        per_token = self.div(*pair_log_probs(student, teacher, tau, dtype))
        per_token = per_token * self._weight(tau)
        kd = per_token.mean() if reduction == "mean" else per_token.sum()
        loss = kd if ce_sum is None else kd + self._ce_coef(ce_weight, n, k, reduction) * ce_sum
        self._finite(loss)
        ce_mean = math.nan if ce_sum is None else ce_sum.detach() / n
        return loss, self._record(loss, ratio, n, k, tau, scores, per_token.mean(), ce_mean)

    def forward_hidden(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor | SparseTeacher,
        teacher_weight: Tensor | None,
        labels: Tensor,
        *,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        chunk_size: int | None = None,
        impl: str | None = None,
        one_pass: bool | None = None,
        ce_weight: float = 0.0,
        mix: Mix | None = None,
        return_report: bool = False,
    ) -> Tensor | tuple[Tensor, LossReport]:
        """The same loss as :meth:`forward` on ``student_hidden @ student_weight.T``, without materialising it.

        Chunked and fused with the lm_head products (:mod:`adakd.fused`): pass 1 scores every valid token chunk by
        chunk without gradient; the global top-k, median and temperatures follow; pass 2 computes the loss and the
        gradients of the kept tokens chunk by chunk. Peak extra memory is O(chunk_size × V), not O(N × V). The
        selection, temperatures, ``stats`` and LATF state are those of :meth:`forward`.

        Args:
            student_hidden: ``[N, H_s]`` (or ``[..., H_s]``), the student's final hidden states.
            student_weight: ``[V_s, H_s]``, the student's lm_head weight.
            teacher_hidden: ``[N, H_t]`` (or ``[..., H_t]``, the same leading shape). No gradient flows to it. Or a
                :class:`adakd.sparse.SparseTeacher` with the same leading shape (a teacher cache), with
                ``teacher_weight`` and ``teacher_bias`` None: the student's logits are still never materialised.
            teacher_weight: ``[V_t, H_t]``, V_t ≥ V_s; rows beyond V_s are padding and are cropped.
            labels: ``[N]`` (or ``[...]``) target ids; ``ignore_index`` marks positions without loss.
            student_bias: ``[V_s]`` or None.
            teacher_bias: ``[V_t]`` or None (-inf entries give those tokens probability 0).
            chunk_size: rows per chunk; default :func:`adakd.fused.default_chunk_size` (~2^23 logits on a CPU).
            impl: ``torch`` (eager, the reference, always available) or ``compile`` (``torch.compile`` on the
                per-chunk softmax/divergence/gradient); default ``self.impl``.
            one_pass: an approximation that does each logit product once: the kept set is the tokens scoring at
                least the previous micro-batch's k-th score (k from the current ratio) and the IDTS median is that
                of the previous micro-batch's kept scores. The first micro-batch (or one where no token passes)
                runs the exact passes. Default ``self.one_pass``. See the README for its measured effect.
            ce_weight: as :meth:`forward`. The CE and its gradient come from the logits pass 1 computes anyway (in
                plain-KD mode, from pass 2's), so mixing it in adds no logit product.
            mix: as :meth:`forward`: ``(1 − α)·ΣCE/W + α·ΣKD_kept/(W·k/n)``, the CE riding in the fused passes as
                with ``ce_weight`` (α = 0: the chunked CE alone, :func:`adakd.fused.fused_cross_entropy`, and
                ``teacher_hidden``/``teacher_weight`` may be None; α = 1: no CE).
            return_report: also return the :class:`LossReport`.

        Returns:
            A float32 scalar (float64 for float64 inputs), with gradients into ``student_hidden``,
            ``student_weight`` and ``student_bias`` where they require grad; or ``(loss, report)``.

        Raises:
            NonFiniteLossError: as :meth:`forward`, before any state changes.
        """
        student = (student_hidden, student_weight, student_bias)
        teacher = (teacher_hidden, teacher_weight, teacher_bias)
        options = {"chunk_size": chunk_size, "impl": impl, "one_pass": one_pass}
        if mix is None:
            loss, report = self._forward_hidden(student, teacher, labels, ce_weight, self.reduction, **options)
        else:
            loss, report = self._mixed_hidden(student, teacher, labels, mix, ce_weight, options)
        return (loss, report) if return_report else loss

    def _mixed_hidden(
        self, student: tuple, teacher: tuple, labels: Tensor, mix: Mix, ce_weight: float, options: dict[str, Any]
    ) -> tuple[Tensor, LossReport]:
        """:meth:`forward_hidden` with a :class:`Mix`: the CE in the fused passes (w = (1 − α)/α next to the kept
        tokens' KD sum), normalised by W·k/n, which makes it (1 − α)·ΣCE/W + α·ΣKD/(W·k/n) exactly as the trainer's
        algebra; at α = 0 the fused CE alone."""
        _check_mix(mix, ce_weight, teacher[0])
        alpha = mix.kd_ratio
        denom = _window(mix, labels, self.ignore_index)
        if alpha == 0:
            hidden, weight, bias = student
            check_student_inputs(hidden, weight, bias, labels)
            flat = hidden.reshape(-1, hidden.shape[-1])
            chunk_size = options["chunk_size"] or default_chunk_size(weight.shape[0], hidden.device)
            ce_sum = fused_cross_entropy(flat, weight, bias, labels.reshape(-1), chunk_size, self.ignore_index)
            return self._ce_only(ce_sum, labels, denom)
        w = (1 - alpha) / alpha
        total, report = self._forward_hidden(student, teacher, labels, w, "sum", **options)
        denom = denom.to(torch.promote_types(denom.dtype, total.dtype))  # float64 losses keep float64 W·k/n
        loss = alpha * (total / (denom * _kept_fraction(report)))
        return loss, self._mixed_report(report, loss, denom, alpha, None)

    def _forward_hidden(
        self,
        student: tuple[Tensor, Tensor, Tensor | None],
        teacher: tuple[Tensor | SparseTeacher, Tensor | None, Tensor | None],
        labels: Tensor,
        ce_weight: float,
        reduction: str,
        *,
        chunk_size: int | None,
        impl: str | None,
        one_pass: bool | None,
    ) -> tuple[Tensor, LossReport]:
        """:meth:`forward_hidden` without a mix, under ``reduction``."""
        student_hidden, student_weight, student_bias = student
        teacher_hidden, teacher_weight, teacher_bias = teacher
        impl = impl or self.impl
        check_hidden_inputs(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
            self.vocab_size, self.ignore_index,
        )  # fmt: skip
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
        h_s, v_s = student_hidden.shape[-1], student_weight.shape[0]
        hs = student_hidden.reshape(-1, h_s)
        if isinstance(teacher_hidden, SparseTeacher):
            ht, wt, bt = SparseTeacher(*(t.detach() for t in teacher_hidden)).reshape(-1), None, None
            dtype = compute_dtype(hs, ht.logprobs)
        else:
            ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
            wt = teacher_weight.detach()[:v_s]
            bt = None if teacher_bias is None else teacher_bias.detach()[:v_s]
            dtype = compute_dtype(hs, ht)
        flat_labels = labels.reshape(-1)
        chunk_size = chunk_size or default_chunk_size(v_s, hs.device)
        rows = (flat_labels != self.ignore_index).nonzero().squeeze(1)
        n = rows.numel()
        if n == 0:
            # Empty sums keep every student input in the graph with a zero gradient.
            loss = hs[:0].sum().to(dtype) + student_weight[:0].sum().to(dtype)
            if student_bias is not None:
                loss = loss + student_bias[:0].sum().to(dtype)
            return loss, self._record(loss, self.ratio, 0, 0, self.tau_base, None, loss)

        targets = flat_labels.index_select(0, rows)
        if ce_weight < 0 or not math.isfinite(ce_weight):
            raise ValueError(f"ce_weight must be a finite number >= 0, got {ce_weight}")
        one_pass = self.one_pass if one_pass is None else one_pass
        if one_pass and not self.detach_tau:
            raise ValueError("one_pass supports detach_tau=True only (its temperatures come from the previous batch)")
        if one_pass and self._needs_scores(n) and self._prev_scores is not None:
            chunk_fn = self._chunk_fn(dtype, impl)
            done = self._one_pass(
                hs, student_weight, student_bias, ht, wt, bt, rows, targets, chunk_fn, chunk_size, ce_weight,
                reduction,
            )  # fmt: skip
            if done is not None:
                return done

        return self._fused_exact(
            hs, student_weight, student_bias, ht, wt, bt, rows, targets, one_pass, dtype, impl, chunk_size,
            reduction, ce_weight,
        )  # fmt: skip

    def _fused_exact(
        self, hs, ws, bs, ht, wt, bt, rows, targets, one_pass, dtype, impl, chunk_size, reduction, ce_weight
    ) -> tuple[Tensor, LossReport]:
        """forward_hidden's exact path: pass 1 scores every valid token (no gradient; with ``ce_weight``, also their
        CE and its gradients), the selection and τ follow, pass 2 takes the loss and gradients of the kept tokens."""
        n = rows.numel()
        bs_detached = None if bs is None else bs.detach()
        scored: dict[str, Tensor] = {}
        ce = CrossEntropyPart(hs, ws, bs, dtype) if ce_weight else None

        def score_pass() -> Tensor:
            scores = chunked_scores(
                self._scorer(dtype), hs.detach(), ws.detach(), bs_detached, ht, wt, bt, rows, targets, chunk_size,
                dtype, ce,
            )  # fmt: skip
            if one_pass:
                scored["all"] = scores  # becomes the one-pass state once the loss is known to be finite
            return scores

        ratio, k, kept, scores, tau = self._select(n, score_pass)
        if kept is not None:
            rows = rows[kept]
        scale = 1.0 / k if reduction == "mean" else 1.0
        ce_coef = self._ce_coef(ce_weight, n, k, reduction) if ce is not None else 0.0
        if self.tau_has_grad and scores is not None:
            # τ is returned by the Function: its gradient flows back through the kept tokens' scores.
            kept_targets = targets if kept is None else targets[kept]
            loss, tau = FusedKeptLossTauGrad.apply(
                hs, ws, bs, ht, wt, bt, rows, scores, kept_targets, self._scorer(dtype, True), self.c, self.tau_base,
                self.temperature == "reverse", scale, self._chunk_fn(dtype, impl, True), chunk_size, dtype, ce,
                ce_coef,
            )  # fmt: skip
        else:
            chunk_fn = self._chunk_fn(dtype, impl)
            loss = FusedKeptLoss.apply(
                hs, ws, bs, ht, wt, bt, rows, tau, scale, chunk_fn, chunk_size, dtype, ce, ce_coef, targets
            )
        self._finite(loss)
        self._prev_scores = scored.get("all", self._prev_scores)
        kd = loss.detach() if ce is None else ce.kd_value
        mean_loss = kd if reduction == "mean" else kd / k
        report = self._record(loss, ratio, n, k, tau, scores, mean_loss, math.nan if ce is None else ce.total / n)
        return loss, report

    def _one_pass(
        self, hs, ws, bs, ht, wt, bt, rows, targets, chunk_fn, chunk_size, ce_weight, reduction
    ) -> tuple[Tensor, LossReport] | None:
        """forward_hidden's one-pass approximation: (loss, report), or None when no token reaches the threshold
        (run the exact path)."""
        prev, n, ratio = self._prev_scores.to(hs.device), rows.numel(), self.ratio
        k_prev = prev.numel() if self.controller is None else keep_count(prev.numel(), ratio)
        top = prev.topk(k_prev).values  # descending: the last is the k-th score
        threshold = top[-1].item() if k_prev < prev.numel() else -math.inf
        median = None if self.temperature == "fixed" else top.median().item()
        dtype = compute_dtype(hs, ht.logprobs if isinstance(ht, SparseTeacher) else ht)
        loss, scores, info = FusedOnePassLoss.apply(
            hs, ws, bs, ht, wt, bt, rows, targets, threshold, median, self.c, self.tau_base,
            self.temperature == "reverse", reduction == "mean", self._scorer(dtype), chunk_fn, chunk_size, dtype,
            ce_weight,
        )  # fmt: skip
        count, tau_sum, tau_min, tau_max, kd_value, ce_sum = info.tolist()
        if count == 0:
            self._prev_scores = scores
            return None
        self._finite(loss)
        self._prev_scores = scores
        mean_loss = kd_value if reduction == "mean" else kd_value / count
        kept = scores[scores >= threshold]  # the same statistics as the exact path: of this batch's kept scores
        score_stats = torch.stack([kept.median(), kept.min()]).tolist()
        report = self._record(
            loss, ratio, n, int(count), [tau_sum / count, tau_min, tau_max], score_stats, mean_loss,
            ce_sum / n if ce_weight else math.nan,
        )  # fmt: skip
        return loss, report

    def _chunk_fn(self, dtype: torch.dtype, impl: str, tau_grad: bool = False):
        key = (dtype, impl, tau_grad)
        if key not in self._chunk_fns:
            self._chunk_fns[key] = chunk_loss_fn(self.div, dtype, impl, tau_weight=self.tau_weight, tau_grad=tau_grad)
        return self._chunk_fns[key]


def _rows(teacher: Tensor | SparseTeacher, rows: Tensor) -> Tensor | SparseTeacher:
    """The ``rows`` of a flat teacher: ``[N, V]`` logits or an ``[N]`` sparse teacher."""
    return teacher.index_select(rows) if isinstance(teacher, SparseTeacher) else teacher.index_select(0, rows)


def _check_mix(mix: Mix, ce_weight: float, teacher: object) -> None:
    """A mix sets the CE's weight itself, and needs a teacher unless α = 0."""
    if not isinstance(mix, Mix):
        raise TypeError(f"mix must be an adakd.Mix, got {type(mix).__name__}")
    if ce_weight:
        raise OptionError("ce_weight", f"must be 0 with a mix (its kd_ratio sets the CE's weight), got {ce_weight}")
    if teacher is None and mix.kd_ratio > 0:
        raise ValueError(f"a mix with kd_ratio {mix.kd_ratio} > 0 needs a teacher (None only at kd_ratio 0)")


def _window(mix: Mix, labels: Tensor, ignore_index: int) -> Tensor:
    """W as the trainer forms it: a float32 scalar ≥ 1 on the labels' device (the call's valid count for None);
    the callers promote it to a float64 loss's dtype."""
    if mix.window_tokens is None:
        return (labels != ignore_index).sum().clamp_min(1).to(torch.float32)
    return torch.as_tensor(mix.window_tokens, device=labels.device, dtype=torch.float32).clamp_min(1)


def _kept_fraction(report: LossReport) -> float:
    """k/n of a forward (1 for a batch without a valid token), as ``adakd.integrations.window_mean`` takes it."""
    return report.kept_tokens / report.valid_tokens if report.valid_tokens else 1.0
