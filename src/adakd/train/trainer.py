"""AdaKDTrainer: a transformers.Trainer that distils a frozen teacher into the student with the AdaKD loss.

The training step, spelled out (``compute_loss``):

1. student forward (logits, or final hidden states for the fused loss), teacher forward under no_grad;
2. shift: position i predicts label i + 1; prompt and padding labels are -100;
3. CE = Σ_valid −log q(y) and KD = Σ_kept τ²·D (``AdaKDLoss(reduction="sum")``), both normalised over the whole
   gradient-accumulation window (and all data-parallel ranks): CE by the window's valid-token count
   ``num_items_in_batch``, KD by the tokens the loss reports it kept (its :class:`adakd.loss.LossReport`), scaled
   to the window by the micro-batch's share of valid tokens; so with ``selection: all`` the loss and gradients do
   not depend on how a batch is split into micro-batches;
4. loss = (1 − kd_ratio)·CE + kd_ratio·KD.

The trainer reads nothing else from the loss: the report of each forward, and ``AdaKDLoss.pending()`` (the sum
and count of L_t since the last step, training-mode forwards only), which it all-reduces once per optimizer step
and passes to ``AdaKDLoss.step``, so every rank holds the same ratio. The loss state (LATF) is saved in every
checkpoint (``adakd_state.pt``; :mod:`adakd.train.checkpoints`) and restored on resume.

Several processes (DDP, FSDP2, DeepSpeed; :mod:`adakd.train.engines`): the student is always called through the
engine's wrapper, on the fused path too (forward redirection: the fused loss runs inside the lm_head's forward,
where the engine holds the full weight), so the gradient reduction and the parameter gathering happen as for any
forward; every rank enters every collective at every optimizer step.

On-policy modes (GKD, DistiLLM; ``adakd.train.onpolicy``) hook in at ``get_batch_samples``: once per optimizer step
the step's micro-batches may be replaced by generated ones before the window's tokens are counted; their state
(replay buffer, schedule, RNG) is checkpointed next to the loss state.

Evaluation (``Trainer.evaluate``, scheduled by ``eval_strategy``) logs the eval set's token-weighted CE, KD at τ = 1
over all tokens, Hellinger difficulty and ``eval_loss`` (:mod:`adakd.train.evaluation`); it never calls the loss, so
it moves neither LATF nor the loss's pending sums. ROUGE-L of sampled answers is scored every ``eval.rouge_every``
optimizer steps on the main process (:class:`adakd.train.evaluation.RougeDuringTraining`).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from .. import AdaKDLoss
from ..errors import ConfigError, NonFiniteLossError, StorageError
from ..files import storage_reason, write_json
from ..fused import fused_cross_entropy
from ..integrations import step_latf, window_mean
from ..loss import LossReport
from ..sparse import SparseTeacher
from .callbacks import LossStateCallback
from .checkpoints import (
    SETTINGS_FILE,
    STAGING_DIR,
    STATE_FILE,
    CheckpointError,
    check_checkpoint_files,
    check_model_matches,
    complete_checkpoints,
    load_loss_state,
    publish_checkpoint,
    resolve_checkpoint,
    save_loss_state,
)
from .config import NONFINITE_POLICIES
from .engines import call_through, check_linear_head, engine_of, full_parameters, unwrap
from .evaluation import EvaluationMixin, RougeDuringTraining
from .onpolicy import OnPolicyController

# The checkpoint names are re-exported: callers read STATE_FILE and CheckpointError next to the trainer.
__all__ = ["STAGING_DIR", "STATE_FILE", "AdaKDTrainer", "CheckpointError", "complete_checkpoints", "save_loss_state"]

LOGGED = ("ratio", "kept_tokens", "valid_tokens", "tau_mean", "tau_min", "tau_max")


def auto_fused(student: torch.nn.Module, teacher: torch.nn.Module | None) -> tuple[bool, str]:
    """``loss.fused: auto``: the fused path where it computes exactly the models' logits (each output layer is
    ``hidden @ Wᵀ (+ b)``, :func:`adakd.train.engines.check_linear_head`), else the logits path; with the reason."""
    for model, role in ((student, "student"), (teacher, "teacher")):
        if model is None:
            continue
        try:
            check_linear_head(model, role)
        except ConfigError as e:
            return False, str(e).removeprefix("loss.fused: ").split(": set loss.fused")[0]
    return True, "the output layers are hidden @ Wᵀ (+ b)"


class AdaKDTrainer(EvaluationMixin, Trainer):
    """``transformers.Trainer`` with a frozen teacher and the AdaKD loss.

    Args:
        model: the student (optionally PEFT-wrapped).
        teacher_model: the teacher, or None for plain SFT (``kd_ratio`` must then be 0).
        loss_fn: an :class:`adakd.AdaKDLoss` built with ``reduction="sum"``.
        kd_ratio: loss = (1 − kd_ratio)·CE + kd_ratio·AdaKD.
        fused: ``True``: ``AdaKDLoss.forward_hidden`` (never materialise the logits; refused for a model whose logits
            are not ``hidden @ Wᵀ (+ b)``); ``False``: the logits path; ``"auto"`` (default): the fused path wherever
            it is exact for both models, the logits path otherwise, the choice printed once.
        chunk_size: rows per chunk of the fused path.
        onpolicy: GKD / DistiLLM batch generation (:class:`adakd.train.onpolicy.OnPolicyController`), or None.
        nonfinite: ``error`` (stop the run) or ``skip`` (drop the micro-batch) on non-finite logits or loss.
        rouge: ROUGE-L during training (:class:`adakd.train.evaluation.RougeDuringTraining`), or None.
        teacher_cache: no teacher model: every batch carries the teacher's top-k distributions read from an
            ``adakd cache`` folder (``teacher_ids``, ``teacher_logprobs`` [B, T−1, k] and ``teacher_tail`` [B, T−1],
            aligned with the shifted labels; :class:`adakd.cache.CachedTeacherCollator`), which the loss takes as
            a :class:`adakd.sparse.SparseTeacher`.
        **kwargs: ``transformers.Trainer`` arguments (``args``, ``train_dataset``, ``data_collator``, ...).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        teacher_model: torch.nn.Module | None = None,
        *,
        loss_fn: AdaKDLoss,
        kd_ratio: float = 1.0,
        fused: bool | str = "auto",
        chunk_size: int | None = None,
        onpolicy: OnPolicyController | None = None,
        nonfinite: str = "error",
        rouge: RougeDuringTraining | None = None,
        teacher_cache: bool = False,
        **kwargs: Any,
    ) -> None:
        if loss_fn.reduction != "sum":
            raise ValueError("AdaKDTrainer needs AdaKDLoss(reduction='sum'): it normalises over the whole window")
        if teacher_model is None and kd_ratio > 0 and not teacher_cache:
            raise ValueError("no teacher: kd_ratio must be 0 (plain SFT)")
        if teacher_cache and (teacher_model is not None or onpolicy is not None):
            raise ValueError("teacher_cache replaces the teacher model, and cannot serve on-policy generation")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite: unknown policy {nonfinite!r}; valid: {', '.join(NONFINITE_POLICIES)}")
        super().__init__(model=model, **kwargs)
        self.loss_fn = loss_fn
        # The run's settings (checkpoints.run_settings), saved in each checkpoint and compared on --resume; set by
        # adakd.train.run, None for a trainer built by hand.
        self.run_settings: dict[str, Any] | None = None
        self.kd_ratio = float(kd_ratio)
        self.fused = fused
        self.chunk_size = chunk_size
        self.onpolicy = onpolicy
        self.teacher_cache = teacher_cache
        self.nonfinite = nonfinite
        self.empty_batches = 0  # micro-batches with no supervised token (loss 0, zero gradient)
        self.skipped_nonfinite = 0  # micro-batches dropped under nonfinite="skip"
        self._staging: str | None = None
        # Our compute_loss normalises by num_items_in_batch itself: have the Trainer count it, and not divide again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.engine = engine_of(self.accelerator)  # refuses FSDP version 1 with a clear error
        self.engine_shards_params = self.engine == "fsdp2" or (
            self.engine == "deepspeed" and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        if fused not in (True, False, "auto"):
            raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
        self.fused_reason: str | None = None  # why loss.fused: auto chose the path it did
        if fused == "auto":
            fused, why = auto_fused(model, teacher_model)
            self.fused, self.fused_reason = fused, why
            if self.args.process_index == 0:
                print(f"[adakd] loss path: {'fused' if fused else 'logits'} (loss.fused: auto; {why})", flush=True)
        elif fused:  # never a silently different objective: the fused loss computes hidden @ Wᵀ (+ b) only
            check_linear_head(model, "student")
            if teacher_model is not None:
                check_linear_head(teacher_model, "teacher")
        self.teacher = None
        if teacher_model is not None:
            from .models import prepare_teacher

            self.teacher = prepare_teacher(teacher_model, self.accelerator)
        self._window: dict[str, float] = {}  # sums for logging since the last log
        self.rouge = rouge
        if rouge is not None and self.engine_shards_params:  # generation on one rank cannot gather the shards
            raise ConfigError(f"eval.rouge_every: ROUGE-L during training runs on one process, not under {self.engine}")
        self._eval_totals: torch.Tensor | None = None  # [4] float64 sums of the evaluation in progress
        self.add_callback(LossStateCallback(self))

    # ----------------------------------------------------------------------------------------------------------
    # Private hooks kept on purpose (pinned by tests/test_train.py::test_the_private_trainer_hooks_adakd_overrides_
    # behave_as_relied_on): no callback may replace a step's batches before the Trainer counts their tokens, nor
    # choose the folder a checkpoint is written into, which the atomic save below needs.
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The Trainer's micro-batches of one optimizer step; on-policy modes may replace them (one decision for the
        whole step), and then the window's label tokens are counted again on the batches actually trained on."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.onpolicy is None or not batches:
            return batches, num_items
        teacher = getattr(self.teacher, "module", self.teacher)  # a DeepSpeed inference engine wraps the model
        step, total = self.state.global_step + 1, self.state.max_steps
        batches = self.onpolicy.prepare_step(batches, self.model, teacher, step, total)
        return batches, self._get_num_items_in_batch(batches, device)

    def _validate_onpolicy(self, initial: bool = False) -> None:
        """DistiLLM's schedule: a validation loss before training (unless resumed), then every ``eval_steps``."""
        op = self.onpolicy
        if op is None or op.schedule is None:
            return
        if initial != (op.schedule.reference is None) or (not initial and self.state.global_step % op.cfg.eval_steps):
            return
        op.schedule.update(op.validation_loss(self.model, self.args.per_device_eval_batch_size))

    # ----------------------------------------------------------------------------------------------------------
    def _autocast(self):
        # accelerate applies mixed precision by wrapping the model's forward, which call_through replaces for the
        # call: enter the same autocast explicitly (a no-op without mixed precision).
        return self.accelerator.autocast() if self.accelerator.native_amp else contextlib.nullcontext()

    def _teacher_hidden(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The teacher's final hidden states ``[B, T−1, H_t]``, through its engine wrapper, without gradient."""
        decoder = unwrap(self.teacher).get_decoder()

        def forward(input_ids, attention_mask=None):
            with self._autocast():
                return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]

        with torch.no_grad():
            return call_through(self.teacher, forward, input_ids=ids, attention_mask=mask)

    def _zero_loss(self, model, output: torch.Tensor | None, weights=()) -> torch.Tensor:
        """A zero loss whose gradient is exactly zero for every trainable parameter, for a skipped micro-batch.

        The backward must still pass through the engine (DDP all-reduces, FSDP2 / ZeRO-3 reduce-scatters every
        parameter on every rank), so when the student's ``output`` is finite the zero flows through it (and through
        ``weights``, the lm_head parameters the fused path read). A non-finite student output would turn 0 into NaN
        there: replicated engines then use 0·Σθ over the parameters; sharded ones cannot (each rank holds other
        shards), so the run stops with an error instead of corrupting the weights.
        """
        if output is not None and bool(torch.isfinite(output).all()):
            zero = (output * 0).sum().float()
            for w in weights:
                if w is not None and w.requires_grad:
                    zero = zero + (w * 0).sum().float()
            return zero
        if self.engine_shards_params:
            raise NonFiniteLossError(
                f"step {self.state.global_step + 1}: the student's own outputs are non-finite (NaN or inf); under "
                f"{self.engine} a micro-batch cannot be skipped then (its parameters are sharded): lower the learning "
                "rate or check the data and dtypes"
            )
        # 0·θ for every trainable weight: a zero gradient for each (DDP expects each to get one) that bypasses the
        # non-finite output; nan_to_num keeps the value 0 even if a weight itself is inf.
        zero = torch.zeros((), device=self.args.device)
        for p in model.parameters():
            if p.requires_grad:
                zero = zero + (p * 0).nan_to_num(0.0, 0.0, 0.0).sum().float()
        return zero

    def _skip(self, what: str) -> None:
        """Apply the nonfinite policy to ``what`` ("teacher logits", ...): raise, or count and warn (the caller then
        returns a zero loss)."""
        step = self.state.global_step + 1
        if self.nonfinite == "error":
            raise NonFiniteLossError(
                f"step {step}: non-finite {what} (NaN or inf); lower the learning rate, check the data and dtypes, "
                "or set loss.nonfinite: skip"
            )
        self.skipped_nonfinite += 1
        warnings.warn(f"adakd: step {step}: non-finite {what}; micro-batch skipped", RuntimeWarning, stacklevel=3)

    @property
    def distils(self) -> bool:
        """Whether the run has a KD term: a teacher (a model, or a cache) and ``kd_ratio > 0``."""
        return (self.teacher is not None or self.teacher_cache) and self.kd_ratio > 0

    def _logits_terms(self, model, ids, mask, labels, cached) -> tuple[Any, Any, Any, LossReport | None]:
        """(Σ CE, Σ KD, zero loss if the micro-batch is skipped, the loss's report) on materialised logits."""
        student = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        teacher = cached
        if self.teacher is not None and self.kd_ratio > 0:
            with torch.no_grad():
                teacher = self.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
        for name, x in (("student", student), ("teacher", None if cached is not None else teacher)):
            if x is not None and not bool(torch.isfinite(x).all()):
                self._skip(f"{name} logits")
                return None, None, self._zero_loss(model, student if name == "teacher" else None), None
        ce = kd = None
        if self.kd_ratio < 1:
            flat = student.reshape(-1, student.shape[-1]).float()
            ce = F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="sum")
        report = None
        if self.kd_ratio > 0:
            try:
                kd, report = self.loss_fn(student, teacher, labels, return_report=True)
            except NonFiniteLossError:
                self._skip("loss")
                return None, None, self._zero_loss(model, student), None
        return ce, kd, None, report

    def _fused_terms(self, model, ids, mask, labels, cached) -> tuple[Any, Any, Any, LossReport | None]:
        """(Σ CE, Σ KD, zero loss if skipped, the loss's report) from hidden states and lm_head weights: the
        student's decoder runs through its engine wrapper, and the loss inside its lm_head's forward, where the
        engine holds the full weight (see :mod:`adakd.train.engines`)."""
        base = unwrap(model)
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        teacher_hidden = t_head = None
        skip = None
        if self.teacher is not None and self.kd_ratio > 0:
            teacher_hidden = self._teacher_hidden(ids, mask)
            t_head = unwrap(self.teacher).get_output_embeddings()
            if not bool(torch.isfinite(teacher_hidden).all()):
                self._skip("teacher hidden states")
                skip = "teacher"
        flat_labels = labels.reshape(-1)
        result: dict[str, Any] = {}

        def head_forward(hidden: torch.Tensor) -> torch.Tensor:
            # The teacher's lm_head is gathered first, on every rank, also one that skips this micro-batch: the
            # gather is a collective under FSDP2 and ZeRO-3.
            t_params = (t_head.weight, t_head.bias) if t_head is not None else (None, None)
            with full_parameters(*t_params) as (t_weight, t_bias):
                return head_loss(hidden, t_weight, t_bias)

        def head_loss(hidden: torch.Tensor, t_weight, t_bias) -> torch.Tensor:
            weight, bias = head.weight, head.bias
            # Under autocast the hidden states may be in half precision: the differentiable cast is what the
            # model's own lm_head call would do.
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
            flat = hidden.reshape(-1, hidden.shape[-1])
            if skip is None and not bool(torch.isfinite(hidden).all()):
                self._skip("student hidden states")
                result["zero"] = self._zero_loss(model, None)
                return result["zero"]
            if skip is not None:
                result["zero"] = self._zero_loss(model, hidden, (head.weight, head.bias))
                return result["zero"]
            ce = kd = None
            # With a KD term, the CE (kd_ratio < 1) rides in the fused passes; alone, it is a fused CE of its own.
            distil = self.distils
            ce_weight = (1 - self.kd_ratio) / self.kd_ratio if distil else 0.0
            if not distil:
                ce = fused_cross_entropy(flat, weight, bias, flat_labels, self.chunk_size or 1024)
            try:
                if ce is not None and not bool(torch.isfinite(ce)):
                    raise NonFiniteLossError("non-finite cross-entropy")
                if distil and cached is not None:
                    kd, result["report"] = self.loss_fn.forward_hidden(
                        hidden, weight, cached, None, labels, student_bias=bias, chunk_size=self.chunk_size,
                        ce_weight=ce_weight, return_report=True,
                    )  # fmt: skip
                elif distil:
                    dtype = teacher_hidden.dtype
                    kd, result["report"] = self.loss_fn.forward_hidden(
                        hidden, weight, teacher_hidden, t_weight.to(dtype), labels,
                        student_bias=bias, teacher_bias=None if t_bias is None else t_bias.to(dtype),
                        chunk_size=self.chunk_size, ce_weight=ce_weight, return_report=True,
                    )  # fmt: skip
            except NonFiniteLossError:  # e.g. an overflow inside the divergence: the same policy as on logits
                self._skip("loss")
                result["zero"] = self._zero_loss(model, hidden, (head.weight, head.bias))
                return result["zero"]
            terms = [t for t in (ce, kd) if t is not None]
            result["ce"], result["kd"] = ce, kd
            return torch.stack([t.float() for t in terms])

        def forward(input_ids, attention_mask=None):
            with self._autocast():
                hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
            return call_through(head, head_forward, hidden)

        out = call_through(model, forward, input_ids=ids, attention_mask=mask)
        if "zero" in result:
            return None, None, out, None
        # The terms as they left the engine's forward (its backward hooks are attached to ``out``).
        terms = iter(out.unbind(0))
        ce = next(terms) if result["ce"] is not None else None
        kd = next(terms) if result["kd"] is not None else None
        return ce, kd, None, result.get("report")

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, None]:
        """The micro-batch's loss, (1 − kd_ratio)·CE + kd_ratio·KD, normalised over the accumulation window.

        Args:
            model: the student, as the engine wraps it.
            inputs: ``input_ids``, ``labels`` (unshifted, -100 on prompt and padding) and ``attention_mask``,
                each [B, T].
            return_outputs: return ``(loss, None)``, as the Trainer's evaluation loop asks.
            num_items_in_batch: the window's valid-token count over every micro-batch and rank (the Trainer's);
                None normalises by this micro-batch alone (evaluation, or a caller outside the Trainer).

        Returns:
            A scalar; a zero with a zero gradient when the micro-batch is skipped under ``nonfinite="skip"``.

        Raises:
            NonFiniteLossError: non-finite logits, hidden states or loss under ``nonfinite="error"``.
        """
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        labels = inputs["labels"][:, 1:]
        valid = (labels != -100).sum()
        if model.training and int(valid) == 0:
            # No supervised token: every term below is a sum over nothing, 0 with a zero gradient. Count it.
            if self.empty_batches == 0:
                warnings.warn(
                    "adakd: a micro-batch has no supervised token (every label is -100); it contributes nothing "
                    "(counted in adakd/empty_batches)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.empty_batches += 1
        # Evaluation forwards must not move LATF: the loss counts L_t towards its next step in training mode only.
        self.loss_fn.train(model.training)
        terms = self._fused_terms if self.fused else self._logits_terms
        ce_sum, kd_sum, zero, report = terms(model, ids, mask, labels, self._cached_teacher(inputs))
        if zero is not None:
            return (zero, None) if return_outputs else zero
        if num_items_in_batch is None:  # evaluation, or a caller outside the Trainer loop: this batch alone
            denom, scale = valid.clamp_min(1).to(torch.float32), 1.0
        else:
            denom = torch.as_tensor(num_items_in_batch, device=labels.device, dtype=torch.float32).clamp_min(1)
            # num_items_in_batch counts every rank's tokens; DDP averages gradients over ranks, so scale back up.
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1.0
        ce = None if ce_sum is None else ce_sum / denom
        kd = None
        if kd_sum is not None:
            # KD is a mean over kept tokens: this micro-batch's sum over its kept tokens, scaled to the window by
            # its share of the window's valid tokens. With every token kept this is Σ/valid-in-window exactly
            # (invariant to how the window is split); otherwise each micro-batch uses the count it really kept.
            kd = window_mean(kd_sum, report, denom)
        mixed = report is not None and not math.isnan(report.ce_loss)
        if mixed:
            # The fused loss returned kd_sum + (1−α)/α·(k/n)·Σ CE: α·window_mean of it is (1−α)·CE + α·KD exactly.
            loss = self.kd_ratio * kd
            ce = torch.as_tensor(report.ce_loss * report.valid_tokens, device=denom.device) / denom
            kd = torch.as_tensor(report.mean_loss * report.valid_tokens, device=denom.device) / denom
        else:
            loss = sum(w * term for w, term in ((1 - self.kd_ratio, ce), (self.kd_ratio, kd)) if term is not None)
        if model.training:  # evaluation batches must not move the training logs
            self._accumulate(ce, kd, scale, report)
        loss = loss * scale
        return (loss, None) if return_outputs else loss

    def _cached_teacher(self, inputs: dict[str, torch.Tensor]) -> SparseTeacher | None:
        """The batch's sparse teacher ``[B, T−1]`` when the run reads a teacher cache, else None."""
        if not self.teacher_cache or self.kd_ratio == 0:
            return None
        try:
            return SparseTeacher(inputs["teacher_ids"], inputs["teacher_logprobs"], inputs["teacher_tail"])
        except KeyError as e:
            missing = e.args[0]
            raise ValueError(
                f"teacher_cache: the batch has no {missing!r} (use adakd.cache.CachedTeacherCollator)"
            ) from None

    # ----------------------------------------------------------------------------------------------------------
    def _accumulate(self, ce, kd, scale: float, report: LossReport | None) -> None:
        # Scaled like the returned loss, so that (1 − kd_ratio)·ce_loss + kd_ratio·kd_loss = loss on one process.
        w = self._window
        w["n"] = w.get("n", 0) + 1
        if ce is not None:
            w["ce_loss"] = w.get("ce_loss", 0.0) + ce.item() * scale
        if kd is not None:
            w["kd_loss"] = w.get("kd_loss", 0.0) + kd.item() * scale
            stats = report.as_dict()
            for key in LOGGED:
                w[key] = w.get(key, 0.0) + stats[key]

    def _end_optimizer_step(self) -> None:
        """LATF advances on L_t averaged over this step's micro-steps and over all ranks (one all-reduce).

        Every rank enters the all-reduce at every optimizer step, also one whose micro-batches were all skipped (it
        contributes a zero count); a step in which no rank kept a micro-batch leaves LATF where it is, on every rank.
        """
        if not self.distils:  # the same on every rank: no KD, no LATF, no collective
            return
        step_latf(self.loss_fn, self.accelerator)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, plus the window's CE and KD terms, the loss's statistics (``adakd/...``), the counts
        of empty and skipped micro-batches and the on-policy metrics. Evaluation rows (no ``loss``) leave the
        window to the next training row, which averages over the same steps as the Trainer's ``loss``."""
        w = {}
        if "loss" in logs:
            w, self._window = self._window, {}
        n = w.pop("n", 0)
        if "loss" in logs and n:
            # ce_loss / kd_loss are per-micro-step window-normalised terms: summed over micro-steps they make the
            # step's loss; averaged over the logged steps like "loss".
            steps = max(1, n / max(1, self.args.gradient_accumulation_steps))
            for key in ("ce_loss", "kd_loss"):
                if key in w:
                    logs[key] = w.pop(key) / steps
            for key in LOGGED:
                if key in w:
                    logs[f"adakd/{key}"] = w[key] / n
        if "loss" in logs:
            logs["adakd/empty_batches"] = self.empty_batches
            logs["adakd/skipped_nonfinite"] = self.skipped_nonfinite
        if "loss" in logs and self.onpolicy is not None:
            logs.update(self.onpolicy.log_metrics())
        super().log(logs, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        # While _save_checkpoint runs, the Trainer writes checkpoint-N into the staging folder.
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, plus the loss and on-policy states, written into ``output_dir/.adakd-staging``
        and renamed into place once complete: a run killed mid-save leaves no half-written ``checkpoint-N``."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging, name), ignore_errors=True)  # left by a killed save
        self.accelerator.wait_for_everyone()
        folder = Path(staging) / name
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                folder.mkdir(parents=True, exist_ok=True)
                save_loss_state(self.loss_fn, folder)
                if self.run_settings is not None:
                    write_json(folder / SETTINGS_FILE, self.run_settings)
            if self.onpolicy is not None:  # every rank: its own replay buffer
                folder.mkdir(parents=True, exist_ok=True)
                self.onpolicy.save(folder, rank=self.args.process_index)
        except Exception as e:
            reason = storage_reason(e, folder)
            if reason is None:
                raise
            shutil.rmtree(folder, ignore_errors=True)  # gives back the space the partial checkpoint took
            found = complete_checkpoints(run_dir, need_state=self.kd_ratio > 0)
            kept = f"the last complete checkpoint is {found[0]}" if found else "no checkpoint is complete yet"
            raise StorageError(
                f"{run_dir}: {reason} while saving {name}; the partial save was discarded ({kept}): free space, "
                "then rerun the same command with --resume"
            ) from e
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every rank's files are in before the rename
        if self.args.should_save:
            self.state.best_model_checkpoint = publish_checkpoint(
                folder, run_dir, self.state.best_model_checkpoint, self.args.save_total_limit
            )
        self.accelerator.wait_for_everyone()

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """The Trainer's warning about missing keys after it loads a checkpoint, without the expected case: a
        student with tied embeddings saves ``lm_head.weight`` once (as the embedding), so every resume reported
        it missing, which reads like a damaged checkpoint. Keys that are the same tensor as a loaded one are tied
        back and not reported; anything else still is."""
        missing = set(load_result.missing_keys)
        if missing:
            by_storage: dict[int, set[str]] = {}
            for name, tensor in self.model.state_dict(keep_vars=True).items():
                by_storage.setdefault(tensor.data_ptr(), set()).add(name)
            tied = {n for names in by_storage.values() if names - missing for n in names & missing}
            if tied == missing:
                self.model.tie_weights()
                load_result = type(load_result)([], load_result.unexpected_keys)
        super()._issue_warnings_after_load(load_result)

    def resolve_checkpoint(self, resume_from_checkpoint: str | bool) -> str:
        """The checkpoint to resume from: the given folder (checked), or with ``True`` the newest complete one
        (:func:`adakd.train.checkpoints.resolve_checkpoint`); the loss state is required when the run distils."""
        return resolve_checkpoint(self.args.output_dir, resume_from_checkpoint, need_state=self.kd_ratio > 0)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``; on resume, the AdaKD loss state (and the on-policy state) is restored first.

        Raises:
            CheckpointError: the checkpoint to resume from is missing, incomplete or corrupted.
            NonFiniteLossError: a non-finite loss under ``nonfinite="error"``.
        """
        if resume_from_checkpoint:
            resume_from_checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
            check_checkpoint_files(resume_from_checkpoint)
            check_model_matches(resume_from_checkpoint, self.model)
            load_loss_state(self.loss_fn, resume_from_checkpoint)
            if self.onpolicy is not None:
                self.onpolicy.load(resume_from_checkpoint, rank=self.args.process_index)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
