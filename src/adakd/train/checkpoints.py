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
    "SETTINGS_FILE",
    "STAGING_DIR",
    "STATE_FILE",
    "CheckpointError",
    "check_checkpoint_files",
    "check_model_matches",
    "check_resume_settings",
    "complete_checkpoints",
    "load_loss_state",
    "publish_checkpoint",
    "resolve_checkpoint",
    "run_settings",
    "save_loss_state",
]

STATE_FILE = "adakd_state.pt"
SETTINGS_FILE = "adakd_settings.json"  # what the run trained with, compared on --resume
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


def _publish_best(state_file: Path, staging: Path, run_dir: Path) -> None:
    """The Trainer wrote ``trainer_state.json`` while the checkpoint sat in the staging folder: a
    ``best_model_checkpoint`` that names the staging folder is made to name the published one, so that a resumed
    run finds the best checkpoint (and keeps it from rotation) instead of a path that no longer exists."""
    import json

    from ..files import write_json

    if not state_file.is_file():
        return
    state = json.loads(state_file.read_text())
    best = state.get("best_model_checkpoint")
    if isinstance(best, str) and staging in Path(best).parents:
        state["best_model_checkpoint"] = str(run_dir / Path(best).name)
        write_json(state_file, state)


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
    if best and staging in Path(best).parents:
        best = str(Path(run_dir) / Path(best).name)
    _publish_best(staged / "trainer_state.json", staging, Path(run_dir))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    shutil.rmtree(staging, ignore_errors=True)
    rotate_checkpoints(
        output_dir=str(run_dir), save_total_limit=save_total_limit, best_model_checkpoint=best, use_mtime=True
    )
    return best


# ------------------------------------------------------------------------------------------------- before resume

# training keys that change what the steps compute; the others (max_steps, saving, logging, evaluation, workers) may
# change on resume. Everything under student, teacher, data (but its eval_* keys), loss and onpolicy is compared.
TRAJECTORY_KEYS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio",
                   "weight_decay", "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps",
                   "seed", "data_seed", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "bf16",
                   "fp16")  # fmt: skip
_COMPARED_SECTIONS = ("student", "teacher", "data", "loss", "onpolicy")
_SECRETS = ("hub_token", "token", "api_key")
# How the run reaches its teacher server, not what it teaches: may change between a run and its --resume.
_TRANSPORT = tuple(f"teacher.server.{k}" for k in ("url", "timeout", "retries", "backoff", "api_key_env", "prefetch"))


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            _flat(f"{prefix}.{key}", inner, out)
    else:
        out[prefix] = value


def run_settings(config: Any) -> dict[str, Any]:
    """The settings of ``config`` (a DistillConfig) that a resumed run must share with the run it continues, as
    ``{"section.key": value}`` (JSON values; tokens left out)."""
    import dataclasses
    import json

    flat: dict[str, Any] = {}
    for section in _COMPARED_SECTIONS:
        value = getattr(config, section)
        _flat(section, dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value, flat)
    for key in TRAJECTORY_KEYS:
        if key in config.training:
            flat[f"training.{key}"] = config.training[key]
    flat = {k: v for k, v in flat.items() if not k.startswith("data.eval_") and k.rsplit(".", 1)[-1] not in _SECRETS}
    flat = {k: v for k, v in flat.items() if k not in _TRANSPORT}  # how to reach the server, not what it teaches
    return json.loads(json.dumps(flat, default=str))  # as it reads back from the file


def check_resume_settings(folder: str | os.PathLike, settings: dict[str, Any], accept: bool) -> list[str]:
    """Compare ``settings`` (:func:`run_settings` of the resuming run) with the ones saved in checkpoint ``folder``.

    Returns:
        The differences, ``key: old → new`` (empty when none, or when the checkpoint predates the settings file).

    Raises:
        CheckpointError: settings differ and ``accept`` is False; the message names each differing key.
    """
    import json

    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupted ({e.__class__.__name__}); resume from an earlier checkpoint") from e
    missing = object()
    changed = [
        f"{key} {saved.get(key, missing)!r} → {settings.get(key, missing)!r}".replace(repr(missing), "(unset)")
        for key in sorted(set(saved) | set(settings))
        if saved.get(key, missing) != settings.get(key, missing)
    ]
    if changed and not accept:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise CheckpointError(
            f"--resume: {folder} was trained with other settings ({shown}): resume with the same ones, or add "
            "--accept-changes to go on with the new ones"
        )
    return changed


def _check_safetensors(path: Path) -> None:
    """The header of a safetensors file parses and its tensors lie within the file (a truncated copy does not)."""
    import json
    import struct

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: corrupted (truncated to {size} bytes); resume from an earlier checkpoint")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: corrupted (truncated to {size} bytes); resume from an earlier checkpoint")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(
                f"{path}: corrupted (its header is not JSON); resume from an earlier checkpoint"
            ) from e
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: corrupted (truncated to {size} bytes, its tensors need {8 + n + end}); resume from an earlier "
            "checkpoint"
        )


def _check_torch_file(path: Path) -> None:
    """A ``torch.save`` file is a zip archive whose directory sits at its end: a truncated copy has none."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: corrupted (truncated: {e}); resume from an earlier checkpoint") from e


def check_checkpoint_files(folder: str | os.PathLike) -> None:
    """Before anything loads: the checkpoint's files read back whole. ``trainer_state.json`` parses; every
    safetensors file's header parses and covers its tensors; every torch file (optimizer, scheduler, RNG and loss
    states) has its archive directory. Bit flips inside tensor data are not detected (it would mean reading every
    byte); truncation, the usual damage of a killed copy or a full disk, is.

    Raises:
        CheckpointError: naming the damaged file.
    """
    import json

    folder = Path(folder)
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{state}: corrupted (not JSON: {e.__class__.__name__}); resume from an earlier checkpoint"
        ) from e
    for path in sorted(folder.rglob("*.safetensors")):
        _check_safetensors(path)
    for path in sorted([*folder.rglob("*.pt"), *folder.rglob("*.pth"), *folder.rglob("*.bin")]):
        _check_torch_file(path)


def check_model_matches(folder: str | os.PathLike, model: Any) -> None:
    """The checkpoint's weights are the student's: every tensor in its ``model.safetensors`` has a parameter or
    buffer of the same name and shape in ``model``. Checked after the models load, before the first step (a
    checkpoint of another model otherwise fails deep inside ``load_state_dict``).

    Raises:
        CheckpointError: naming the file and the first tensor that does not fit.
    """
    import json
    import struct

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    mine = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = tuple(info["shape"])
        if name not in mine or mine[name] != shape:
            have = "no such tensor" if name not in mine else f"the student's is {list(mine[name])}"
            raise CheckpointError(
                f"{path}: a checkpoint of another model ({name} {list(shape)}; {have}); resume from this run's "
                "checkpoints, or start over with --overwrite"
            )
