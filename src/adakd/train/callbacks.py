"""The AdaKD trainers' one callback: LATF after every optimizer step, for both
:class:`adakd.train.AdaKDTrainer` and :class:`adakd.integrations.trl.AdaKDDistillationTrainer`; for ``adakd train``'s
trainer also the on-policy validation, ROUGE-L every ``eval.rouge_every`` steps, and the metrics file
(``output_dir/metrics.jsonl``, one JSON line per ``Trainer.log``: training rows, eval rows, each with the wall-clock
``time`` it was written, in Unix seconds, so that a run's speed reads from its log across resumes)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback

from ..memory import release_freed_memory, trim_interval
from ..window import step_latf

__all__ = ["METRICS_FILE", "LatfHost", "LossStateCallback", "StepHooks", "repair_metrics"]


class LatfHost(Protocol):
    """What the callback asks of every trainer: its loss, its accelerator (for the all-reduce) and whether it
    distils (no KD term, no LATF step and no collective). A protocol, so that this module imports no trainer."""

    loss_fn: Any
    accelerator: Any
    distils: bool


class StepHooks(Protocol):
    """The run hooks of :class:`~adakd.train.trainer.AdaKDTrainer`: on-policy validation and ROUGE-L."""

    rouge: Any

    def _validate_onpolicy(self, initial: bool = False) -> None: ...

    def log_rouge(self) -> None: ...


METRICS_FILE = "metrics.jsonl"


def repair_metrics(path: Path) -> int:
    """Drop a cut last line of the metrics file at ``path`` (what a run killed mid-write leaves); the bytes dropped.

    Why: the next run appends to this file, and its first row would otherwise be glued to the cut line, which
    ``adakd report`` then refuses as a corrupt line. Complete lines are kept as they are; a missing file is left
    missing.
    """
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1  # 0 when the only line is cut
    with open(path, "r+b") as f:
        f.truncate(keep)
    return len(data) - keep


class LossStateCallback(TrainerCallback):
    """Steps LATF after every optimizer step; with ``hooks`` (``adakd train``'s trainer) also validates the on-policy
    schedule, scores ROUGE-L when due and writes metrics.jsonl (main process).

    Args:
        trainer: the trainer whose loss steps (:class:`LatfHost`).
        hooks: the run hooks (:class:`StepHooks`, the same trainer for ``AdaKDTrainer``), or None (TRL's trainer,
            which logs through TRL).
    """

    def __init__(self, trainer: LatfHost, hooks: StepHooks | None = None) -> None:
        self.trainer = trainer
        self.hooks = hooks

    def on_train_begin(self, args, state, control, **kwargs):
        if self.hooks is None:
            return
        if state.is_world_process_zero:
            dropped = repair_metrics(Path(args.output_dir) / METRICS_FILE)
            if dropped:
                print(
                    f"[adakd] {Path(args.output_dir) / METRICS_FILE}: dropped its last line, cut by an interrupted "
                    f"run ({dropped} bytes), before appending"
                )
        self.hooks._validate_onpolicy(initial=True)

    def on_step_end(self, args, state, control, **kwargs):
        every = trim_interval()
        if every and state.global_step % every == 0:
            release_freed_memory()  # glibc keeps freed CPU memory: see adakd.memory
        # LATF advances on L_t averaged over this step's micro-steps and over all ranks (one all-reduce). Every rank
        # enters it at every optimizer step, also one whose micro-batches were all skipped (a zero count); a step
        # in which no rank kept a micro-batch leaves LATF where it is. No KD term: the same on every rank.
        if self.trainer.distils:
            step_latf(self.trainer.loss_fn, self.trainer.accelerator)
        if self.hooks is None:
            return
        self.hooks._validate_onpolicy()
        # After the optimizer step and before the Trainer's checkpoint of this step: the model scored is the one
        # saved as checkpoint-{step}.
        rouge = self.hooks.rouge
        if rouge is not None and rouge.due(state.global_step):
            self.hooks.log_rouge()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.hooks is not None and state.is_world_process_zero and logs:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(args.output_dir) / METRICS_FILE, "a") as f:
                row = {"step": state.global_step, **logs, "time": round(time.time(), 3)}
                f.write(json.dumps(row) + "\n")
