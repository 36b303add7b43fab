"""The rules of a run's output folder (``training.output_dir``), checked before anything loads: it is writable, it
holds no other run unless the run continues it (``--resume``) or starts it over (``--overwrite``), and a resumed
run has steps left and a checkpoint that reads back whole, trained with the same settings."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError

__all__ = ["check_fresh_run", "check_output_dir", "check_resume", "check_unfinished", "delete_earlier_run"]


def check_output_dir(path: str) -> None:
    """Create ``training.output_dir`` and prove it writable with a probe file, before any model is loaded."""
    folder = Path(path)
    probe = folder / f".adakd-probe-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"training.output_dir: {path}: not writable ({e.strerror or e})") from e


def _earlier_run(folder: Path) -> list[str]:
    """What an earlier run left in ``folder``: its checkpoints, final model, metrics and ROUGE-during-training
    results (names, sorted)."""
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.glob("checkpoint-*") if p.is_dir()]
    found += [name for name in ("final", "metrics.jsonl", "rouge") if (folder / name).exists()]
    return sorted(found)


def check_fresh_run(path: str, *, resume: str | bool | None, overwrite: bool) -> list[str]:
    """A run never silently replaces another: an ``output_dir`` that holds checkpoints, a final model or metrics is
    refused unless the run continues it (``resume``) or starts over (``overwrite``).

    Returns:
        What ``overwrite`` is to delete (names in ``path``), empty otherwise. Nothing is deleted here: the run
        deletes them with :func:`delete_earlier_run` only once its config, data and models have loaded, so that a
        refused run leaves the earlier one as it was.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: give one (continue the run, or start it over)")
    found = _earlier_run(Path(path))
    if not found or resume:
        return []
    if not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError(
            f"training.output_dir: {path} already holds a run ({shown}); continue it with --resume, "
            "or start over with --overwrite (which deletes them)"
        )
    return found


def check_unfinished(training: dict[str, Any], resume: str | bool) -> str | None:
    """Refuse to resume a run that has finished: its checkpoint is at ``training.max_steps`` (or, for a run counted
    in epochs, at the step count its trainer state recorded) and ``final/`` is there. The Trainer would otherwise
    take one more step and replace ``final/``. Checked before anything loads; a missing or incomplete checkpoint is
    left for the trainer to report. ``training``: the config's ``training`` section.

    Returns:
        The finished checkpoint when ``final/`` is missing (its save failed, e.g. on a full disk): the run then
        writes ``final/`` from it without training. None otherwise (there are steps left).

    Raises:
        ConfigError: naming the checkpoint, its step and the key to raise.
    """
    import json

    from .checkpoints import resolve_checkpoint

    output_dir = training["output_dir"]
    try:
        folder = Path(resolve_checkpoint(output_dir, resume, need_state=False))
        state = json.loads((folder / "trainer_state.json").read_text())
        step, recorded = int(state["global_step"]), int(state.get("max_steps") or 0)
    except (InputError, OSError, ValueError, KeyError, TypeError):
        return None
    max_steps = training.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        done, limit, key = step >= max_steps, max_steps, "training.max_steps"
    else:
        done, limit, key = recorded > 0 and step >= recorded, recorded, "training.num_train_epochs"
    if done and not (Path(output_dir) / "final").is_dir():
        return str(folder)
    if done:
        raise ConfigError(
            f"--resume: {folder} is at step {step}, the end of the run ({key} gives {limit} steps): nothing to "
            f"train; raise {key} to train on"
        )
    return None


def check_resume(output_dir: str, resume: str | bool, settings: dict[str, Any], accept_changes: bool) -> None:
    """Before anything loads: the checkpoint to resume from (in ``output_dir``) reads back whole, and was trained
    with ``settings`` (:func:`~.checkpoints.run_settings` of the config; :func:`~.checkpoints.check_resume_settings`;
    ``accept_changes`` lets them differ, saying which)."""
    from .checkpoints import check_checkpoint_files, check_resume_settings, resolve_checkpoint

    folder = resolve_checkpoint(output_dir, resume, need_state=False)
    check_checkpoint_files(folder)
    changed = check_resume_settings(folder, settings, accept_changes)
    if changed and int(os.environ.get("RANK", "0")) == 0:
        print(f"[adakd] --accept-changes: resuming {folder} with {'; '.join(changed)}", file=sys.stderr, flush=True)


def delete_earlier_run(path: str, names: list[str]) -> None:
    """Delete ``names`` (from :func:`check_fresh_run`) in ``path``, on the main process only (``RANK`` 0)."""
    if not names or int(os.environ.get("RANK", "0")) != 0:
        return
    import shutil

    folder = Path(path)
    for name in names:
        target = folder / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
