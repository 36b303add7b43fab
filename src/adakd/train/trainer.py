"""AdaKDTrainer: a transformers.Trainer that distils a frozen teacher into the student with the AdaKD loss.

The training step, spelled out (``compute_loss``):

1. student forward (logits, or final hidden states for the fused loss), teacher forward under no_grad;
2. shift: position i predicts label i + 1; prompt and padding labels are -100;
3. CE = Σ_valid −log q(y) and KD = Σ_kept τ²·D (``AdaKDLoss(reduction="sum")``), both normalised over the whole
   gradient-accumulation window (and all data-parallel ranks): CE by the window's valid-token count
   ``num_items_in_batch``, KD by its kept-token count ≈ r·``num_items_in_batch``; so with ``selection: all`` the
   loss and gradients do not depend on how a batch is split into micro-batches;
4. loss = (1 − kd_ratio)·CE + kd_ratio·KD.

After each optimizer step, ``AdaKDLoss.step`` receives L_t (the micro-steps' mean kept-token loss) averaged over
the micro-steps and all ranks, so every rank holds the same ratio. The loss state (LATF) is saved in every
checkpoint (``adakd_state.pt``) and restored on resume.

On-policy modes (GKD, DistiLLM; ``adakd.train.onpolicy``) hook in at ``get_batch_samples``: once per optimizer step
the step's micro-batches may be replaced by generated ones before the window's tokens are counted; their state
(replay buffer, schedule, RNG) is checkpointed next to the loss state.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, TrainerCallback

from .. import AdaKDLoss
from ..loss import NonFiniteLossError
from .models import output_layer
from .onpolicy import OnPolicyController

__all__ = ["STATE_FILE", "AdaKDTrainer", "CheckpointError", "NonFiniteError", "complete_checkpoints", "save_loss_state"]

STATE_FILE = "adakd_state.pt"
STAGING_DIR = ".adakd-staging"  # checkpoints are written here, then renamed into output_dir once complete
NONFINITE = ("error", "skip")


class NonFiniteError(ValueError):
    """NaN or inf in a model's logits (or in the loss) under ``loss.nonfinite: error``."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing or corrupted files); the message names it."""


def _checkpoint_step(folder: Path) -> int | None:
    name = folder.name
    prefix = "checkpoint-"
    return int(name[len(prefix) :]) if name.startswith(prefix) and name[len(prefix) :].isdigit() else None


def complete_checkpoints(output_dir: str | os.PathLike, need_state: bool = True) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir`` that hold a trainer state (and the loss state when ``need_state``),
    newest first. The staging folder of an interrupted save is not a checkpoint."""
    root = Path(output_dir)
    found = []
    for folder in root.iterdir() if root.is_dir() else ():
        step = _checkpoint_step(folder)
        if step is None or not folder.is_dir() or not (folder / "trainer_state.json").is_file():
            continue
        if need_state and not (folder / STATE_FILE).is_file():
            continue
        found.append((step, folder))
    return [folder for _, folder in sorted(found, reverse=True)]


LOGGED = ("ratio", "kept_tokens", "valid_tokens", "tau_mean", "tau_min", "tau_max")


def save_loss_state(loss_fn: AdaKDLoss, folder: str | os.PathLike) -> Path:
    """Write the loss state atomically (a crash mid-write leaves the previous file intact)."""
    path = Path(folder) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(loss_fn.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def _chunked_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias, labels: torch.Tensor, chunk: int):
    """Σ CE over the valid rows of ``hidden [N, H]`` without keeping ``[N, V]`` logits: each chunk's logits are
    recomputed in the backward (activation checkpointing)."""

    def ce(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, weight, bias).float()
        return F.cross_entropy(logits, y, ignore_index=-100, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(
            ce, hidden[start : start + chunk], labels[start : start + chunk], use_reentrant=False
        )
    return total


class _LossStateCallback(TrainerCallback):
    """Steps LATF after every optimizer step, saves its state with every checkpoint, writes metrics.jsonl."""

    def __init__(self, trainer: AdaKDTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._validate_onpolicy(initial=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._end_optimizer_step()
        self.trainer._validate_onpolicy()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(args.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class AdaKDTrainer(Trainer):
    """``transformers.Trainer`` with a frozen teacher and the AdaKD loss.

    Args:
        model: the student (optionally PEFT-wrapped).
        teacher_model: the teacher, or None for plain SFT (``kd_ratio`` must then be 0).
        loss_fn: an :class:`adakd.AdaKDLoss` built with ``reduction="sum"``.
        kd_ratio: loss = (1 − kd_ratio)·CE + kd_ratio·AdaKD.
        fused: use ``AdaKDLoss.forward_hidden`` (never materialise the logits).
        chunk_size: rows per chunk of the fused path.
        onpolicy: GKD / DistiLLM batch generation (:class:`adakd.train.onpolicy.OnPolicyController`), or None.
        **kwargs: ``transformers.Trainer`` arguments (``args``, ``train_dataset``, ``data_collator``, ...).
    """

    def __init__(
        self,
        model,
        teacher_model=None,
        *,
        loss_fn: AdaKDLoss,
        kd_ratio: float = 1.0,
        fused: bool = False,
        chunk_size: int | None = None,
        onpolicy: OnPolicyController | None = None,
        nonfinite: str = "error",
        **kwargs: Any,
    ) -> None:
        if loss_fn.reduction != "sum":
            raise ValueError("AdaKDTrainer needs AdaKDLoss(reduction='sum'): it normalises over the whole window")
        if teacher_model is None and kd_ratio > 0:
            raise ValueError("no teacher: kd_ratio must be 0 (plain SFT)")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite: unknown policy {nonfinite!r}; valid: {', '.join(NONFINITE)}")
        super().__init__(model=model, **kwargs)
        self.loss_fn = loss_fn
        self.kd_ratio = float(kd_ratio)
        self.fused = fused
        self.chunk_size = chunk_size
        self.onpolicy = onpolicy
        self.nonfinite = nonfinite
        self.empty_batches = 0  # micro-batches with no supervised token (loss 0, zero gradient)
        self.skipped_nonfinite = 0  # micro-batches dropped under nonfinite="skip"
        self._staging: str | None = None
        # Our compute_loss normalises by num_items_in_batch itself: have the Trainer count it, and not divide again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.teacher = None
        if teacher_model is not None:
            from .models import prepare_teacher

            self.teacher = prepare_teacher(teacher_model, self.accelerator)
        self._micro: list[float] = []  # L_t of each micro-step since the last optimizer step
        self._window: dict[str, float] = {}  # sums for logging since the last log
        self.add_callback(_LossStateCallback(self))

    # ----------------------------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
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
    def _forward(self, model, inputs: dict[str, torch.Tensor]):
        """Student logits ``[B, T−1, V]`` or hidden states ``[B, T−1, H]`` with (weight, bias); teacher likewise."""
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        if not self.fused:
            student = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            teacher = None
            if self.teacher is not None and self.kd_ratio > 0:
                with torch.no_grad():
                    teacher = self.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
            return student, teacher
        decoder, weight, bias = output_layer(model)
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        teacher = None
        if self.teacher is not None and self.kd_ratio > 0:
            t_decoder, t_weight, t_bias = output_layer(self.teacher)
            with torch.no_grad():
                t_hidden = t_decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            teacher = (t_hidden, t_weight, t_bias)
        return (hidden, weight, bias), teacher

    def _nonfinite(self, model, what: str) -> torch.Tensor:
        """Apply the nonfinite policy to ``what`` ("teacher logits", ...): raise, or a zero loss with zero gradient."""
        step = self.state.global_step + 1
        if self.nonfinite == "error":
            raise NonFiniteError(
                f"step {step}: non-finite {what} (NaN or inf); lower the learning rate, check the data and dtypes, "
                "or set loss.nonfinite: skip"
            )
        self.skipped_nonfinite += 1
        warnings.warn(f"adakd: step {step}: non-finite {what}; micro-batch skipped", RuntimeWarning, stacklevel=2)
        # 0·Σθ over the trainable weights: a zero gradient for every one of them (DDP expects each to get one), not
        # 0·loss, which is NaN.
        params = [p for p in model.parameters() if p.requires_grad]
        return sum(p.sum() for p in params) * 0.0 if params else torch.zeros((), device=self.args.device)

    @staticmethod
    def _finite(x) -> bool:
        x = x[0] if isinstance(x, tuple) else x  # the fused path: (hidden, weight, bias)
        return bool(torch.isfinite(x).all())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"][:, 1:]
        student, teacher = self._forward(model, inputs)
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
        kind = "hidden states" if self.fused else "logits"
        for name, x in (("teacher", teacher), ("student", student)):
            if x is not None and not self._finite(x):
                loss = self._nonfinite(model, f"{name} {kind}")
                return (loss, None) if return_outputs else loss
        if num_items_in_batch is None:  # evaluation, or a caller outside the Trainer loop: this batch alone
            denom, scale = valid.clamp_min(1).to(torch.float32), 1.0
        else:
            denom = torch.as_tensor(num_items_in_batch, device=labels.device, dtype=torch.float32).clamp_min(1)
            # num_items_in_batch counts every rank's tokens; DDP averages gradients over ranks, so scale back up.
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1.0

        ce = kd = None
        if self.kd_ratio < 1:
            if self.fused:
                hidden, weight, bias = student
                chunk = self.chunk_size or 1024
                ce = _chunked_ce_sum(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), chunk)
            else:
                ce = F.cross_entropy(
                    student.reshape(-1, student.shape[-1]).float(),
                    labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            ce = ce / denom
        if self.kd_ratio > 0:
            if self.fused:
                (hidden, weight, bias), (t_hidden, t_weight, t_bias) = student, teacher
                kd_sum = self.loss_fn.forward_hidden(
                    hidden, weight, t_hidden, t_weight, labels, student_bias=bias, teacher_bias=t_bias,
                    chunk_size=self.chunk_size,
                )  # fmt: skip
            else:
                try:
                    kd_sum = self.loss_fn(student, teacher, labels)
                except NonFiniteLossError:
                    loss = self._nonfinite(model, "loss")
                    return (loss, None) if return_outputs else loss
            # The window's kept count: r·(valid tokens); exactly the valid count when every token is kept.
            kept_fraction = 1.0 if self.loss_fn.controller is None else self.loss_fn.stats["ratio"]
            kd = kd_sum / (denom * kept_fraction)
        loss = sum(w * term for w, term in ((1 - self.kd_ratio, ce), (self.kd_ratio, kd)) if term is not None)
        if not torch.isfinite(loss):  # finite logits, yet e.g. an overflow inside the divergence
            loss = self._nonfinite(model, "loss")
            return (loss, None) if return_outputs else loss
        if model.training:  # evaluation batches must not move LATF nor the training logs
            if kd is not None:
                self._micro.append(self.loss_fn.stats["loss"])
            self._accumulate(ce, kd, scale)
        loss = loss * scale
        return (loss, None) if return_outputs else loss

    # ----------------------------------------------------------------------------------------------------------
    def _accumulate(self, ce, kd, scale: float) -> None:
        # Scaled like the returned loss, so that (1 − kd_ratio)·ce_loss + kd_ratio·kd_loss = loss on one process.
        w = self._window
        w["n"] = w.get("n", 0) + 1
        if ce is not None:
            w["ce_loss"] = w.get("ce_loss", 0.0) + ce.item() * scale
        if kd is not None:
            w["kd_loss"] = w.get("kd_loss", 0.0) + kd.item() * scale
            for key in LOGGED:
                w[key] = w.get(key, 0.0) + self.loss_fn.stats[key]

    def _end_optimizer_step(self) -> None:
        """LATF advances on L_t averaged over this step's micro-steps and over all ranks (one all-reduce)."""
        if not self._micro:
            return
        total = torch.tensor([sum(self._micro), len(self._micro)], dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        self._micro.clear()
        self.loss_fn.step(float(total[0] / total[1]))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
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
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        folder = Path(staging) / name
        if self.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            save_loss_state(self.loss_fn, folder)
        if self.onpolicy is not None:  # every rank: its own replay buffer
            folder.mkdir(parents=True, exist_ok=True)
            self.onpolicy.save(folder, rank=self.args.process_index)
        self.accelerator.wait_for_everyone()  # every rank's files are in before the rename
        if self.args.should_save:
            final = Path(run_dir) / name
            if final.exists():  # the same step saved again (e.g. a resumed run): the new one replaces it
                shutil.rmtree(final)
            os.replace(folder, final)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_model_checkpoint and Path(staging) in Path(self.state.best_model_checkpoint).parents:
                self.state.best_model_checkpoint = str(Path(run_dir) / Path(self.state.best_model_checkpoint).name)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def resolve_checkpoint(self, resume_from_checkpoint: str | bool) -> str:
        """The checkpoint to resume from: the given folder (checked), or with ``True`` the newest complete one."""
        need_state = self.kd_ratio > 0
        if resume_from_checkpoint is True:
            found = complete_checkpoints(self.args.output_dir, need_state=need_state)
            if not found:
                raise CheckpointError(f"{self.args.output_dir}: no complete checkpoint to resume from")
            return str(found[0])
        folder = Path(resume_from_checkpoint)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such checkpoint folder")
        if not (folder / "trainer_state.json").is_file():
            raise CheckpointError(f"{folder}: incomplete checkpoint (no trainer_state.json)")
        if need_state and not (folder / STATE_FILE).is_file():
            raise CheckpointError(f"{folder / STATE_FILE}: missing; cannot resume the AdaKD loss state")
        return str(folder)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """``Trainer.train``; on resume, the AdaKD loss state is restored from the checkpoint first."""
        if resume_from_checkpoint:
            resume_from_checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
            state = Path(resume_from_checkpoint) / STATE_FILE
            if state.is_file():
                try:
                    loaded = torch.load(state, map_location="cpu", weights_only=False)
                    self.loss_fn.load_state_dict(loaded)
                except Exception as e:  # truncated or foreign file: torch raises several unrelated types
                    raise CheckpointError(
                        f"{state}: corrupted ({e.__class__.__name__}); resume from an earlier checkpoint"
                    ) from None
            if self.onpolicy is not None:
                self.onpolicy.load(resume_from_checkpoint, rank=self.args.process_index)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
