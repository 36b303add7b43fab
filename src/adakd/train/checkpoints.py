"""A run's checkpoint files: the AdaKD loss state saved next to the Trainer's, checkpoint folders published in one
rename (a run killed mid-save leaves no half-written ``checkpoint-N``), and the checkpoint a resume starts from."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..files import torch_save

__all__ = [
    "STAGING_DIR",
    "STATE_FILE",
    "CheckpointError",
    "complete_checkpoints",
    "load_loss_state",
    "publish_checkpoint",
    "resolve_checkpoint",
    "save_loss_state",
]

STATE_FILE = "adakd_state.pt"
STAGING_DIR = ".adakd-staging"  # checkpoints are written here, then renamed into output_dir once complete


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from (missing or corrupted files); the message names it."""


def _checkpoint_step(folder: Path) -> int | None:
    """N for a folder named ``checkpoint-N``, else None."""
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


def resolve_checkpoint(output_dir: str | os.PathLike, resume: str | bool, need_state: bool) -> str:
    """The checkpoint to resume from: the folder ``resume`` names (checked), or with ``True`` the newest complete
    one in ``output_dir``. ``need_state``: the run distils, so the loss state must be there too.

    Raises:
        CheckpointError: no complete checkpoint, or the named one is missing or incomplete.
    """
    if resume is True:
        found = complete_checkpoints(output_dir, need_state=need_state)
        if not found:
            raise CheckpointError(f"{output_dir}: no complete checkpoint to resume from")
        return str(found[0])
    folder = Path(resume)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not (folder / "trainer_state.json").is_file():
        raise CheckpointError(f"{folder}: incomplete checkpoint (no trainer_state.json)")
    if need_state and not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{folder / STATE_FILE}: missing; cannot resume the AdaKD loss state")
    return str(folder)


def save_loss_state(loss_fn: Any, folder: str | os.PathLike) -> Path:
    """Write the loss state (:meth:`adakd.AdaKDLoss.state_dict`) atomically: a crash mid-write leaves the previous
    file intact."""
    return torch_save(loss_fn.state_dict(), Path(folder) / STATE_FILE)


def load_loss_state(loss_fn: Any, folder: str | os.PathLike) -> bool:
    """Restore the loss state saved in ``folder``, if there is one; returns whether there was.

    Raises:
        CheckpointError: the state file is truncated or not a loss state.
    """
    state = Path(folder) / STATE_FILE
    if not state.is_file():
        return False
    try:
        loss_fn.load_state_dict(torch.load(state, map_location="cpu", weights_only=False))
    except Exception as e:  # truncated or foreign file: torch raises several unrelated types
        raise CheckpointError(f"{state}: corrupted ({e.__class__.__name__}); resume from an earlier checkpoint") from e
    return True


def publish_checkpoint(
    staged: Path, run_dir: str | os.PathLike, best: str | None, save_total_limit: int | None
) -> str | None:
    """Rename the complete checkpoint ``staged`` (in ``run_dir/.adakd-staging``) into ``run_dir`` in one step,
    replacing one of the same step (a resumed run saves it again), then rotate old checkpoints as the Trainer does.
    Main process only.

    Returns:
        ``best`` (the Trainer's best-model checkpoint), moved out of the staging folder if it pointed into it.
    """
    from transformers.trainer_utils import rotate_checkpoints

    staging, final = staged.parent, Path(run_dir) / staged.name
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    shutil.rmtree(staging, ignore_errors=True)
    if best and staging in Path(best).parents:
        best = str(Path(run_dir) / Path(best).name)
    rotate_checkpoints(
        output_dir=str(run_dir), save_total_limit=save_total_limit, best_model_checkpoint=best, use_mtime=True
    )
    return best
