"""Atomic checkpoints, resume after a crash or kill -9, corrupted and partial checkpoints."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import adakd.train.trainer as trainer_module
from adakd.train import build_trainer
from adakd.train.trainer import STAGING_DIR, STATE_FILE, CheckpointError

from .common import ROOT, TINY, cli, metrics, one_line_error, tiny

RUN = ["training.max_steps=4", "training.save_steps=2", "training.save_strategy=steps"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A finished 4-step run with checkpoint-2 and checkpoint-4 (copy before changing it)."""
    root = tmp_path_factory.mktemp("ckpt")
    build_trainer(tiny(root, *RUN)).train()
    return root / "run"


def _copy(checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(checkpoints, out)
    return out


def test_checkpoints_are_complete_and_no_staging_is_left(checkpoints):
    for step in (2, 4):
        folder = checkpoints / f"checkpoint-{step}"
        assert (folder / STATE_FILE).is_file() and (folder / "trainer_state.json").is_file()
    assert not (checkpoints / STAGING_DIR).exists()


def test_crash_mid_save_leaves_no_checkpoint_and_resume_recovers(tmp_path, monkeypatch):
    real = trainer_module.save_loss_state
    calls = []

    def crash_on_second(loss_fn, folder):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(loss_fn, folder)

    monkeypatch.setattr(trainer_module, "save_loss_state", crash_on_second)
    with pytest.raises(OSError):
        build_trainer(tiny(tmp_path, *RUN)).train()
    out = tmp_path / "run"
    assert (out / "checkpoint-2" / STATE_FILE).is_file()
    assert not (out / "checkpoint-4").exists()  # the half-written one never got its name
    assert (out / STAGING_DIR).is_dir()
    monkeypatch.setattr(trainer_module, "save_loss_state", real)
    trainer = build_trainer(tiny(tmp_path, *RUN))
    assert trainer.resolve_checkpoint(True).endswith("checkpoint-2")
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4 and (out / "checkpoint-4" / STATE_FILE).is_file()
    assert not (out / STAGING_DIR).exists()


def test_resume_picks_the_newest_complete_checkpoint(checkpoints, tmp_path):
    out = _copy(checkpoints, tmp_path)
    (out / STAGING_DIR / "checkpoint-6").mkdir(parents=True)  # a killed save
    (out / "checkpoint-8").mkdir()  # an empty folder: not a checkpoint
    (out / "checkpoint-4" / STATE_FILE).unlink()  # incomplete
    trainer = build_trainer(tiny(tmp_path, *RUN))
    assert trainer.resolve_checkpoint(True) == str(out / "checkpoint-2")


def test_truncated_state_is_reported(checkpoints, tmp_path, capsys):
    out = _copy(checkpoints, tmp_path)
    state = out / "checkpoint-4" / STATE_FILE
    state.write_bytes(state.read_bytes()[:20])
    trainer = build_trainer(tiny(tmp_path, *RUN))
    with pytest.raises(CheckpointError, match=f"^{state}: corrupted"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    # a longer run resumed from it (resuming a finished run is refused before any state is read)
    args = ["train", str(TINY), f"training.output_dir={out}", *RUN, "training.max_steps=6", "--resume",
            str(out / "checkpoint-4")]  # fmt: skip
    line = one_line_error(*cli(capsys, *args))
    assert f"{state}: corrupted" in line


def test_missing_state_and_missing_checkpoint_are_reported(checkpoints, tmp_path, capsys):
    out = _copy(checkpoints, tmp_path)
    (out / "checkpoint-4" / STATE_FILE).unlink()
    trainer = build_trainer(tiny(tmp_path, *RUN))
    with pytest.raises(CheckpointError, match=f"{out / 'checkpoint-4' / STATE_FILE}: missing"):
        trainer.resolve_checkpoint(str(out / "checkpoint-4"))
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        trainer.resolve_checkpoint(str(out / "checkpoint-99"))
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        trainer.resolve_checkpoint(str(out / "checkpoint-4"))
    empty = tmp_path / "empty"
    line = one_line_error(*cli(capsys, "train", str(TINY), f"training.output_dir={empty}", "--resume"))
    assert f"{empty}: no complete checkpoint to resume from" in line


def _last_per_step(folder) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(folder) if "loss" in r}


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    common = [
        "training.max_steps=40",
        "training.save_steps=10",
        "training.logging_steps=1",
        "training.disable_tqdm=true",
        "data.synthetic_size=96",
        "loss.warmup_ratio=0",
        "loss.ema_decay=0.0",
        "loss.tolerance=0.0",
        "loss.step_size=0.2",
    ]
    cmd = [sys.executable, "-m", "adakd", "train", str(TINY), *common]
    straight = tmp_path / "straight"
    done = subprocess.run([*cmd, f"training.output_dir={straight}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, f"training.output_dir={killed}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint-10").is_dir():  # renamed into place only once complete
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists()

    resumed = subprocess.run(
        [*cmd, f"training.output_dir={killed}", "--resume"], cwd=ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    load = lambda folder: torch.load(folder / "final" / STATE_FILE, weights_only=False)  # noqa: E731
    assert repr(load(killed)) == repr(load(straight))  # the final LATF state, exactly
    ma, mb = _last_per_step(straight), _last_per_step(killed)
    assert sorted(mb) == sorted(ma) == list(range(1, 41))
    ratios = [ma[s]["adakd/ratio"] for s in ma]
    assert len(set(ratios)) > 2, ratios  # LATF moved, so the state really had to be restored
    for step in ma:
        assert mb[step]["adakd/ratio"] == pytest.approx(ma[step]["adakd/ratio"], rel=1e-9), step
        assert mb[step]["loss"] == pytest.approx(ma[step]["loss"], rel=1e-5), step
