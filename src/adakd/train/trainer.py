"""AdaKDTrainer: a transformers.Trainer that distils a frozen teacher into the student with the AdaKD loss.

The training step of one micro-batch is :class:`adakd.train.step.LossStep` (``compute_loss`` calls it): the student
forward (logits, or final hidden states for the fused loss), the teacher's part from the teacher object
(:mod:`adakd.train.teacher`: a live model or a cache), the nonfinite policy, and the loss
``(1 − kd_ratio)·CE + kd_ratio·KD`` mixed and normalised over the whole gradient-accumulation window (and all
data-parallel ranks) by the loss itself (:class:`adakd.loss.Mix`): CE by the window's valid-token count
``num_items_in_batch``, KD by the tokens the loss kept, scaled to the window by the micro-batch's share of valid
tokens; so with ``selection: all`` the loss and gradients do not depend on how a batch is split.

LATF advances once per optimizer step on ``AdaKDLoss.pending()`` all-reduced over ranks
(:func:`adakd.window.step_latf`, from :class:`adakd.train.callbacks.LossStateCallback`), so every rank holds the
same ratio; the loss state is saved in every checkpoint (``adakd_state.pt``; :mod:`adakd.train.checkpoints`) and
restored on resume.

Several processes (DDP, FSDP2, DeepSpeed; :mod:`adakd.train.engines`): the student is always called through the
engine's wrapper, on the fused path too (forward redirection: the fused loss runs inside the lm_head's forward,
where the engine holds the full weight); every rank enters every collective at every optimizer step.

On-policy modes (GKD, DistiLLM; ``adakd.train.onpolicy``) hook in at ``get_batch_samples``: once per optimizer step
the step's micro-batches may be replaced by generated ones before the window's tokens are counted; their state
(replay buffer, schedule, RNG) is checkpointed next to the loss state. Evaluation (:mod:`adakd.train.evaluation`)
logs token-weighted CE, KD at τ = 1, Hellinger and ``eval_loss`` without calling the loss, and ROUGE-L every
``eval.rouge_every`` steps.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from ..errors import ConfigError, ServerError, StorageError
from ..files import storage_reason, write_json
from ..labels import IGNORE_INDEX
from ..loss import AdaKDLoss
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
from .engines import engine_of
from .evaluation import EvaluationMixin, RougeDuringTraining
from .onpolicy import OnPolicyController
from .prefetch import Prefetcher, stopped_by_server
from .step import LossStep, Nonfinite, StepTerms, Window
from .teacher import CachedTeacher, Teacher, as_teacher
from .trainer_checks import auto_fused, check_arguments, check_fused

# The checkpoint names are re-exported: callers read STATE_FILE and CheckpointError next to the trainer.
__all__ = ["STAGING_DIR", "STATE_FILE", "AdaKDTrainer", "CheckpointError", "complete_checkpoints", "save_loss_state"]

LOGGED = ("ratio", "kept_tokens", "valid_tokens", "tau_mean", "tau_min", "tau_max")


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
        teacher_cache: ``True``: the teacher is an ``adakd cache`` folder read through the batches
            (:class:`adakd.train.teacher.CachedTeacher`); the alias of passing ``CachedTeacher()`` as the teacher.
        **kwargs: ``transformers.Trainer`` arguments (``args``, ``train_dataset``, ``data_collator``, ...).

    The teacher (``teacher_model``) is a model, a :class:`adakd.train.teacher.Teacher` (a live model, a cache, any
    other source of a sparse teacher), or None. ``trainer.teacher`` is its live model (None for a source of data),
    ``trainer.teacher_source`` the object the step asks.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        teacher_model: torch.nn.Module | Teacher | None = None,
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
        teacher = as_teacher(teacher_model, cache=teacher_cache)
        check_arguments(loss_fn, teacher, kd_ratio, fused, nonfinite)
        if teacher is not None and onpolicy is not None:
            teacher.check_onpolicy()
        super().__init__(model=model, **kwargs)
        self.loss_fn = loss_fn
        # The run's settings (checkpoints.run_settings), saved in each checkpoint and compared on --resume; set by
        # adakd.train.runner, None for a trainer built by hand.
        self.run_settings: dict[str, Any] | None = None
        self.onpolicy = onpolicy
        self.nonfinite = nonfinite
        self.empty_batches = 0  # micro-batches with no supervised token (loss 0, zero gradient)
        self._staging: str | None = None
        # Our compute_loss normalises by num_items_in_batch itself: have the Trainer count it, and not divide again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.engine = engine_of(self.accelerator)  # refuses FSDP version 1 with a clear error
        self.engine_shards_params = self.engine == "fsdp2" or (
            self.engine == "deepspeed" and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        self.fused_reason: str | None = None  # why loss.fused: auto chose the path it did
        if fused == "auto":
            fused, self.fused_reason = auto_fused(model, teacher)
            if self.args.process_index == 0:
                why = self.fused_reason
                print(f"[adakd] loss path: {'fused' if fused else 'logits'} (loss.fused: auto; {why})", flush=True)
        elif fused:  # never a silently different objective: the fused loss computes hidden @ Wᵀ (+ b) only
            check_fused(model, teacher)
        if teacher is not None:
            teacher.prepare(self.accelerator)
        self.teacher_source = teacher
        self.prefetcher = Prefetcher(teacher)  # the next micro-batches' teacher rows, asked while this one trains
        policy = Nonfinite(nonfinite, engine=self.engine, shards=self.engine_shards_params, device=self.args.device)
        settings = {"fused": bool(fused), "chunk_size": chunk_size, "accelerator": self.accelerator}
        self.loss_step = LossStep(loss_fn, float(kd_ratio), nonfinite=policy, **settings)
        self._window: dict[str, float] = {}  # sums for logging since the last log
        self.rouge = rouge
        if rouge is not None and self.engine_shards_params:  # generation on one rank cannot gather the shards
            raise ConfigError(f"eval.rouge_every: ROUGE-L during training runs on one process, not under {self.engine}")
        self._eval_totals: torch.Tensor | None = None  # [4] float64 sums of the evaluation in progress
        self.add_callback(LossStateCallback(self, hooks=self))

    # The step's settings, read where the trainer's users and the evaluation look for them.
    kd_ratio = property(lambda self: self.loss_step.kd_ratio, doc="loss = (1 − kd_ratio)·CE + kd_ratio·KD")
    fused = property(lambda self: self.loss_step.fused, doc="whether the step runs the fused (hidden-state) path")
    chunk_size = property(lambda self: self.loss_step.chunk_size, doc="rows per chunk of the fused path")
    skipped_nonfinite = property(
        lambda self: self.loss_step.nonfinite.skipped, doc='micro-batches dropped under nonfinite="skip"'
    )

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The live teacher model, prepared for the engine (on-policy generation, evaluation); None without one."""
        return None if self.teacher_source is None else self.teacher_source.model

    @property
    def teacher_cache(self) -> bool:
        """Whether the teacher is read from an ``adakd cache`` folder."""
        return isinstance(self.teacher_source, CachedTeacher)

    @property
    def distils(self) -> bool:
        """Whether the run has a KD term: a teacher (a model, or a cache) and ``kd_ratio > 0``."""
        return self.teacher_source is not None and self.kd_ratio > 0

    # ----------------------------------------------------------------------------------------------------------
    # Private hooks kept on purpose (pinned by tests/train/test_trainer.py::
    # test_the_private_trainer_hooks_adakd_overrides_behave_as_relied_on): no callback may replace a step's batches
    # before the Trainer counts their tokens, nor choose the folder a checkpoint is written into, which the atomic
    # save below needs.
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The Trainer's micro-batches of one optimizer step; on-policy modes may replace them (one decision for the
        whole step), and then the window's label tokens are counted again on the batches actually trained on. A
        teacher that prefetches (``teacher.server``) gets the next micro-batches as they are pulled, ahead
        (:mod:`.prefetch`)."""
        batches, num_items = super().get_batch_samples(self.prefetcher.wrap(epoch_iterator), num_batches, device)
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
        labels = inputs["labels"][:, 1:]
        valid = (labels != IGNORE_INDEX).sum()
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
        window = self._window_of(valid, num_items_in_batch)
        terms = self.loss_step(model, inputs, self.teacher_source, window, self.state.global_step + 1)
        if model.training and not terms.skipped:  # evaluation batches must not move the training logs
            self._accumulate(terms, window.scale)
        return (terms.loss, None) if return_outputs else terms.loss

    def _window_of(self, valid: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> Window:
        """The micro-batch's window: the Trainer's count over every micro-batch and rank, or (evaluation, a caller
        outside the Trainer loop) this micro-batch's ``valid`` tokens alone."""
        if num_items_in_batch is None:
            return Window(valid.clamp_min(1).to(torch.float32))
        tokens = torch.as_tensor(num_items_in_batch, device=valid.device, dtype=torch.float32).clamp_min(1)
        # num_items_in_batch counts every rank's tokens; DDP averages gradients over ranks, so scale back up.
        return Window(tokens, self.accelerator.num_processes if self.args.average_tokens_across_devices else 1.0)

    # ----------------------------------------------------------------------------------------------------------
    def _accumulate(self, terms: StepTerms, scale: float) -> None:
        # Scaled like the returned loss, so that (1 − kd_ratio)·ce_loss + kd_ratio·kd_loss = loss on one process.
        w = self._window
        w["n"] = w.get("n", 0) + 1
        if terms.ce is not None:
            w["ce_loss"] = w.get("ce_loss", 0.0) + terms.ce * scale
        if terms.kd is not None:
            w["kd_loss"] = w.get("kd_loss", 0.0) + terms.kd * scale
            stats = terms.report.as_dict()
            for key in LOGGED:
                w[key] = w.get(key, 0.0) + stats[key]

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
        if "loss" in logs and self.teacher_source is not None:
            logs.update(self.teacher_source.log_metrics())
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
            ServerError: the teacher's server stopped answering; the message adds the step and the last complete
                checkpoint to resume from.
        """
        if resume_from_checkpoint:
            resume_from_checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
            check_checkpoint_files(resume_from_checkpoint)
            check_model_matches(resume_from_checkpoint, self.model)
            load_loss_state(self.loss_fn, resume_from_checkpoint)
            if self.onpolicy is not None:
                self.onpolicy.load(resume_from_checkpoint, rank=self.args.process_index)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except ServerError as e:  # the teacher's server: what was saved stays, --resume goes on from it
            found = complete_checkpoints(self.args.output_dir, need_state=self.kd_ratio > 0)
            raise stopped_by_server(e, self.state.global_step + 1, [str(f) for f in found]) from e
        finally:
            if self.teacher_source is not None:
                self.teacher_source.close()
