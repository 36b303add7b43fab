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
from adakd.errors import StorageError
from adakd.train import build_trainer
from adakd.train.trainer import STAGING_DIR, STATE_FILE, CheckpointError

from .common import ROOT, TINY, cli, metrics, one_line_error, tiny

RUN = ["training.max_steps=4", "training.save_steps=2", "training.save_strategy=steps"]
SAME = ["data.synthetic_size=64", "loss.fused=false"]  # the settings of tiny() that the CLI is given to resume


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A finished 4-step run with checkpoint-2 and checkpoint-4 (copy before changing it)."""
    from adakd.train.runner import run

    root = tmp_path_factory.mktemp("ckpt")
    run(tiny(root, *RUN))  # as adakd train runs it: the checkpoints record the run's settings
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
    out = tmp_path / "run"
    with pytest.raises(StorageError) as info:  # an OSError too, for callers of the Python API
        build_trainer(tiny(tmp_path, *RUN)).train()
    assert str(info.value) == (
        f"{out}: no space left on device while saving checkpoint-4; the partial save was discarded (the last "
        f"complete checkpoint is {out / 'checkpoint-2'}): free space, then rerun the same command with --resume"
    )
    assert (out / "checkpoint-2" / STATE_FILE).is_file()
    assert not (out / "checkpoint-4").exists()  # the half-written one never got its name
    assert not (out / STAGING_DIR / "checkpoint-4").exists()  # and its space was given back
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
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_killed_then_resumed_matches_an_uninterrupted_run(tmp_path, sig):
    """kill -9 (nothing runs after it) and SIGTERM (a scheduler's preemption: adakd ends as on an interrupt, one
    line, exit 143): neither leaves a half-written checkpoint, and the resumed run ends as the uninterrupted one."""
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
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [*cmd, f"training.output_dir={killed}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err
        )
        deadline = time.monotonic() + 300
        while not (killed / "checkpoint-10").is_dir():  # renamed into place only once complete
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.02)
        proc.send_signal(sig)
        proc.wait()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 143
        assert (tmp_path / "stderr.txt").read_text().splitlines()[-1] == "adakd: terminated (SIGTERM)"
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


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_resume_keeps_the_best_checkpoint_and_ends_with_the_same_final_model(tmp_path, monkeypatch):
    """``load_best_model_at_end`` with a metric that makes the first checkpoint the best (the eval loss, taken as
    greater-is-better): a run interrupted right after that checkpoint (whose own trainer state names it as the best)
    and resumed must keep checkpoint-2 through rotation and end with the same ``final/`` as the run that was never
    interrupted."""
    import json

    from transformers import TrainerCallback

    from adakd.data import synthetic_instructions
    from adakd.train.runner import run

    data = tmp_path / "data.jsonl"
    rows = [{"prompt": r.prompt, "output": r.response} for r in synthetic_instructions(60, seed=3)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    keys = ["training.max_steps=8", "training.save_steps=2", "training.eval_steps=2", "training.eval_strategy=steps",
            "training.save_total_limit=1", "training.load_best_model_at_end=true",
            "training.metric_for_best_model=eval_loss", "training.greater_is_better=true", "data.source=minillm_jsonl",
            f"data.path={data}", f"data.eval_path={data}", "data.eval_limit=8"]  # fmt: skip
    run(tiny(tmp_path, *keys, name="straight"))

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt  # as a kill after checkpoint-2 was published

    real_build = trainer_module.AdaKDTrainer.__init__

    def with_crash(self, *args, **kwargs):
        real_build(self, *args, **kwargs)
        self.add_callback(Crash())

    monkeypatch.setattr(trainer_module.AdaKDTrainer, "__init__", with_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(tmp_path, *keys, name="resumed"))
    monkeypatch.setattr(trainer_module.AdaKDTrainer, "__init__", real_build)
    resumed = tmp_path / "resumed"
    state = json.loads((resumed / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(resumed / "checkpoint-2")  # a published path, not the staging one
    run(tiny(tmp_path, *keys, name="resumed"), resume=True)

    straight = tmp_path / "straight"
    assert (resumed / "checkpoint-2").is_dir()  # the best survived the rotation after the resume
    a, b = _weights(straight / "final"), _weights(resumed / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], _weights(straight / "checkpoint-2")[k]) for k in a)  # final/ is the best, step 2


# ------------------------------------------------------------------------------------------------ a full disk


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs, filled up, or skip where this machine cannot mount one."""
    from .common import small_disk, unmount

    disk = tmp_path / "disk"
    if not small_disk(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (the flows are covered by injected errors below)")
    with open(disk / "filler", "wb") as f:
        with pytest.raises(OSError):
            f.write(b"\0" * (2 << 20))
            f.flush()
    yield disk
    unmount(disk)


def test_every_writer_s_full_disk_error_is_recognised(full_disk):
    from safetensors.torch import save_file

    from adakd.files import storage_reason

    errors = []
    for write in (
        lambda p: torch.save(torch.zeros(50_000), p),  # an internal assertion, not an OSError
        lambda p: save_file({"w": torch.zeros(50_000)}, str(p)),  # SafetensorError "... (os error 28)"
        lambda p: p.write_bytes(b"\0" * 200_000),  # OSError ENOSPC
    ):
        with pytest.raises(Exception) as info:
            write(full_disk / "x")
        errors.append(info.value)
    assert [storage_reason(e, full_disk / "x") for e in errors] == ["no space left on device"] * 3
    assert storage_reason(RuntimeError("unexpected pos 1 vs 2"), ROOT) is None  # not read as a full disk elsewhere
    assert storage_reason(ValueError("bad"), full_disk) is None


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, capsys):
    from .common import one_line, small_disk, unmount

    disk = tmp_path / "disk"
    if small_disk(disk, "256k"):  # the run's logs fit; its first checkpoint (model + optimizer state) does not
        try:
            keys = [*RUN, "training.logging_steps=1", "training.disable_tqdm=true", "data.synthetic_size=32"]
            code, err = cli(capsys, "train", str(TINY), f"training.output_dir={disk / 'run'}", *keys)
            line = one_line(code, err, 1)
            assert f"{disk / 'run'}: no space left on device while saving checkpoint-2; the partial save was " in line
            assert "no checkpoint is complete yet" in line and line.endswith("rerun the same command with --resume")
            assert not (disk / "run" / "checkpoint-2").exists()
            assert not list((disk / "run").glob(f"{STAGING_DIR}/checkpoint-*"))
        finally:
            unmount(disk)
        return
    pytest.skip("cannot mount a tmpfs here")


def test_a_full_disk_while_writing_final_publishes_nothing_and_resume_writes_it(tmp_path, capsys, monkeypatch):
    """The final save fails half-way (config written, then the disk is full): no ``final/`` appears, the message
    says what is kept, and ``--resume`` once there is space writes ``final/`` from the last checkpoint without
    training, equal to the ``final/`` of a run that never failed."""
    import errno
    import importlib
    import json

    run_module = importlib.import_module("adakd.train.runner")  # the module

    from .common import one_line

    args = ["train", str(TINY), *RUN, "training.logging_steps=1", "training.disable_tqdm=true",
            "data.synthetic_size=32"]  # fmt: skip
    assert cli(capsys, *args, f"training.output_dir={tmp_path / 'straight'}")[0] == 0
    real = run_module.save_final

    def fill_up(trainer, folder):
        (folder.mkdir(parents=True, exist_ok=True), (folder / "config.json").write_text("{}"))
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(run_module, "save_final", fill_up)
    out = tmp_path / "run"
    line = one_line(*cli(capsys, *args, f"training.output_dir={out}"), 1)
    assert line == (
        f"adakd: error: {out / 'final'}: no space left on device while writing the final model; nothing was "
        f"published there (the last complete checkpoint is {out / 'checkpoint-4'}): free space, then rerun the same "
        "command with --resume"
    )
    assert not (out / "final").exists() and not (out / STAGING_DIR / "final").exists()
    rows = metrics(out)
    monkeypatch.setattr(run_module, "save_final", real)
    assert cli(capsys, *args, f"training.output_dir={out}", "--resume")[0] == 0
    assert metrics(out) == rows  # no step was trained again
    a, b = _weights(tmp_path / "straight" / "final"), _weights(out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = lambda run: torch.load(run / "final" / STATE_FILE, weights_only=False)  # noqa: E731
    assert repr(state(out)) == repr(state(tmp_path / "straight"))
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "qwen2"
    line = one_line_error(*cli(capsys, *args, f"training.output_dir={out}", "--resume"))  # now it is finished
    assert "is at step 4, the end of the run" in line


# ------------------------------------------------------------------------------- damaged or foreign checkpoints


def _no_models(monkeypatch):
    """Fail the test if the run gets as far as building its trainer (loading models)."""
    import importlib

    run_module = importlib.import_module("adakd.train.runner")

    def refuse(*args, **kwargs):
        raise AssertionError("the models were loaded before the checkpoint was checked")

    monkeypatch.setattr(run_module, "build_trainer", refuse)


@pytest.mark.parametrize(
    ("name", "damage", "reason"),
    [
        ("optimizer.pt", "truncate", "corrupted (truncated: File is not a zip file)"),
        ("rng_state.pth", "truncate", "corrupted (truncated: File is not a zip file)"),
        ("model.safetensors", "truncate", "corrupted (truncated to "),
        ("model.safetensors", "header", "corrupted (its header is not JSON)"),
        ("trainer_state.json", "garbage", "corrupted (not JSON: JSONDecodeError)"),
    ],
)
def test_a_damaged_checkpoint_is_named_before_the_models_load(checkpoints, tmp_path, capsys, monkeypatch, name,
                                                              damage, reason):  # fmt: skip
    out = _copy(checkpoints, tmp_path)
    path = out / "checkpoint-4" / name
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        path.write_bytes(data[:8] + b"!" + data[9:])
    else:
        path.write_text("{not json")
    _no_models(monkeypatch)
    args = ["train", str(TINY), f"training.output_dir={out}", *RUN, "training.max_steps=6", "--resume"]
    line = one_line_error(*cli(capsys, *args))
    assert line.startswith(f"adakd: error: {path}: {reason}") and line.endswith("resume from an earlier checkpoint")


def test_resuming_with_other_settings_names_each_change_and_needs_accept_changes(checkpoints, tmp_path, capsys):
    out = _copy(checkpoints, tmp_path)
    args = ["train", str(TINY), f"training.output_dir={out}", *RUN, *SAME, "training.max_steps=6"]
    changed = ["loss.base=fkl", "training.learning_rate=0.001", "data.seed=5", "training.logging_steps=2", "--resume"]
    line = one_line_error(*cli(capsys, *args, *changed))
    assert line == (
        f"adakd: error: --resume: {out / 'checkpoint-4'} was trained with other settings (data.seed 0 → 5; "
        "loss.base 'rkl' → 'fkl'; training.learning_rate 0.003 → 0.001): resume with the same ones, or add "
        "--accept-changes to go on with the new ones"
    )  # logging (like max_steps, saving and evaluation) may change
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in checkpoints.iterdir())  # nothing ran
    code, err = cli(capsys, *args, *changed, "--accept-changes")
    assert code == 0, err
    assert f"[adakd] --accept-changes: resuming {out / 'checkpoint-4'} with data.seed 0 → 5;" in err
    line = one_line_error(*cli(capsys, "train", str(TINY), f"training.output_dir={tmp_path / 'x'}", "--accept-changes"))
    assert line == "adakd: error: --accept-changes: applies only with --resume"


def test_a_checkpoint_of_another_model_is_named(checkpoints, tmp_path, capsys):
    out = _copy(checkpoints, tmp_path)
    wider = "student.config.hidden_size=48"
    args = ["train", str(TINY), f"training.output_dir={out}", *RUN, *SAME, "training.max_steps=6", wider, "--resume"]
    line = one_line_error(*cli(capsys, *args))
    assert "student.config.hidden_size 32 → 48" in line  # the settings say it first
    line = one_line_error(*cli(capsys, *args, "--accept-changes"))
    assert line == (
        f"adakd: error: {out / 'checkpoint-4' / 'model.safetensors'}: a checkpoint of another model "
        "(model.embed_tokens.weight [288, 32]; the student's is [288, 48]); resume from this run's checkpoints, or "
        "start over with --overwrite"
    )
