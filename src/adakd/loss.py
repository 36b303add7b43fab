"""AdaKDLoss: token-adaptive distillation on materialised logits (the reference path) or fused with the lm_head.

Per micro-batch (``docs/method.md``):

1. flatten the valid positions (label != -100): N tokens;
2. score each token's difficulty s_i at τ = 1 without gradient (Hellinger by default, Eq. 3);
3. keep the k = max(1, floor(N·r)) hardest tokens, r from LATF or a schedule (Eqs. 4-7);
4. give each kept token τ_i = τ_base·exp(−c·ŝ_i) over the kept tokens' median (IDTS, Eqs. 9-10);
5. loss = mean over kept tokens of τ_i² · D(p^τi, q^τi) for the base divergence D (Eq. 2).

:meth:`AdaKDLoss.forward_hidden` runs the same steps through the plans of :mod:`adakd.fused`.

This module imports only torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .adaptive import IDTS, score_fn
from .divergences import divergence_fn
from .errors import NonFiniteLossError
from .fused.outcome import Outcome, empty_stats
from .labels import IGNORE_INDEX
from .loss_mix import MixMixin
from .loss_options import C_MAX, build_controller, check_options
from .loss_paths import PathsMixin
from .loss_report import LossReport, Mix, make_report
from .shapes import align_vocab, check_vocab_sizes
from .sparse import SparseTeacher

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


class AdaKDLoss(PathsMixin, MixMixin, nn.Module):
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
            selection=selection,
            temperature=temperature,
            reduction=reduction,
            impl=impl,
            c=c,
            tau_weight=tau_weight,
            detach_tau=detach_tau,
            one_pass=one_pass,
            tau_base=tau_base,
            ratio=ratio,
            latf_kwargs=latf_kwargs,
        )
        self.base = base
        self.base_params = dict(base_params or {})
        self.div = divergence_fn(base, **self.base_params)
        self.indicator = indicator
        self.score = score_fn(indicator)
        self.selection = selection
        self.temperature = temperature
        self.c = float(c)
        self.tau_base = float(tau_base)
        self.idts = IDTS(c=self.c, tau_base=self.tau_base, mode=temperature)
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
    def _record(self, loss: Tensor, ratio: float, n: int, outcome: Outcome) -> LossReport:
        """The :class:`LossReport` of this forward, kept as ``last_report``; L_t joins :meth:`pending` in training
        mode when the batch had valid tokens. Called only once the loss is known to be finite."""
        report = make_report(loss, ratio, n, outcome.kept, outcome.stats, outcome.ce_mean)
        self.last_report = report
        self._forwards += int(self.training)
        if self.training and outcome.kept > 0:
            self._pending = (self._pending[0] + report.mean_loss, self._pending[1] + 1)
        return report

    def _record_empty(self, loss: Tensor) -> LossReport:
        """The report of a batch without a valid token."""
        return self._record(loss, self.ratio, 0, Outcome(0, empty_stats(self.tau_base)))

    def _finite(self, loss: Tensor) -> None:
        # Checked before _record, on both paths: a bad batch must not reach LATF's EMA nor the statistics.
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(
                "non-finite AdaKD loss: NaN or +inf logits, a row of -inf, or a token that one model gives "
                "probability 0 and the other does not"
            )

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
