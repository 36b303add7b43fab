"""The AdaKD trainer's callback: LATF after every optimizer step, ROUGE-L every ``eval.rouge_every`` steps, and the
metrics file (``output_dir/metrics.jsonl``, one JSON line per ``Trainer.log``: training rows, eval rows, each with
the wall-clock ``time`` it was written, in Unix seconds, so that a run's speed reads from its log across resumes)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback

from ..memory import release_freed_memory, trim_interval

__all__ = ["METRICS_FILE", "LossStateCallback", "StepHooks", "repair_metrics"]


class StepHooks(Protocol):
    """What the callback asks of its trainer (:class:`~adakd.train.trainer.AdaKDTrainer` provides it); a protocol,
    so that this module does not import the trainer that imports it."""

    rouge: Any

    def _end_optimizer_step(self) -> None: ...

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
    """Steps LATF after every optimizer step, scores ROUGE-L when due, writes metrics.jsonl (main process)."""

    def __init__(self, trainer: StepHooks) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            dropped = repair_metrics(Path(args.output_dir) / METRICS_FILE)
            if dropped:
                print(
                    f"[adakd] {Path(args.output_dir) / METRICS_FILE}: dropped its last line, cut by an interrupted "
                    f"run ({dropped} bytes), before appending"
                )
        self.trainer._validate_onpolicy(initial=True)

    def on_step_end(self, args, state, control, **kwargs):
        every = trim_interval()
        if every and state.global_step % every == 0:
            release_freed_memory()
        self.trainer._end_optimizer_step()
        self.trainer._validate_onpolicy()
        # After the optimizer step and before the Trainer's checkpoint of this step: the model scored is the one
        # saved as checkpoint-{step}.
        rouge = self.trainer.rouge
        if rouge is not None and rouge.due(state.global_step):
            self.trainer.log_rouge()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(args.output_dir) / METRICS_FILE, "a") as f:
                row = {"step": state.global_step, **logs, "time": round(time.time(), 3)}
                f.write(json.dumps(row) + "\n")
