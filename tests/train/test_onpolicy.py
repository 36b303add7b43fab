"""On-policy distillation (GKD, DistiLLM): the replay buffer, the adaptive schedule, and tiny end-to-end runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainerCallback  # noqa: E402

from adakd.train import ConfigError, build_trainer, load_config  # noqa: E402
from adakd.train.onpolicy import (  # noqa: E402
    ONPOLICY_STATE_FILE,
    AdaptiveSchedule,
    ReplayBuffer,
    relabel,
    split_prompts,
)
from adakd.train.trainer import STATE_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GKD = ROOT / "configs" / "tiny-cpu-gkd.yaml"
DISTILLM = ROOT / "configs" / "tiny-cpu-distillm.yaml"


def _config(path: Path, tmp_path: Path, *overrides: str, name: str = "run"):
    base = [
        f"training.output_dir={tmp_path / name}",
        "training.logging_steps=1",
        "training.disable_tqdm=true",
        "training.save_strategy=no",
        "data.synthetic_size=64",
        "onpolicy.max_new_tokens=16",
    ]
    return load_config(path, [*base, *overrides])


def _metrics(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


# ---------------------------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------------------------


def _ex(i: int) -> dict[str, list[int]]:
    return {"input_ids": [i, i], "labels": [-100, i]}


def test_replay_buffer_keeps_the_newest_capacity_examples():
    buffer = ReplayBuffer(capacity=3, seed=0)
    buffer.add([_ex(i) for i in range(5)])
    assert len(buffer) == 3
    assert [e["input_ids"][0] for e in buffer.memory] == [2, 3, 4]  # FIFO: the oldest dropped out
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=0)
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(capacity=2).sample(1)


def test_replay_buffer_samples_distinct_examples_reproducibly():
    buffer = ReplayBuffer(capacity=10, seed=3)
    buffer.add([_ex(i) for i in range(10)])
    state = buffer.state_dict()
    first = buffer.sample(4)
    assert len({e["input_ids"][0] for e in first}) == 4  # without replacement
    assert len(buffer.sample(50)) == 10  # never more than it holds
    seen = set()
    for _ in range(50):
        seen.update(e["input_ids"][0] for e in buffer.sample(2))
    assert seen == set(range(10))  # uniform over the whole buffer
    restored = ReplayBuffer(capacity=1, seed=99)
    restored.load_state_dict(state)
    assert restored.capacity == 10 and restored.sample(4) == first


def test_adaptive_schedule_follows_distillm_on_scripted_losses():
    s = AdaptiveSchedule(threshold=0.0, loss_eps=0.1)
    losses = [2.0, 2.05, 2.1, 2.15, 2.21, 1.5, 2.3, 2.41, 2.6, 2.8, 3.0, 3.2, 3.4, 3.6, 3.8, 4.0]
    got = [round(s.update(v), 6) for v in losses]
    # 2.0 sets the reference; 2.1 is >= 2.0 + 0.1 (raise, reference 2.1); 2.15 not; 2.21 >= 2.2 (raise); a fall
    # changes nothing; 2.3 < 2.31; 2.41 >= 2.31 ... capped at 1.
    assert got == [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0]
    s = AdaptiveSchedule(threshold=0.6)
    # decreasing replay ratio: samp = 0.6·(1 − t/T) = 0.3 at the half
    assert s.decide(0.29, 5, 10, buffer_len=100, capacity=100) == "generate"
    assert s.decide(0.31, 5, 10, buffer_len=100, capacity=100) == "replay"
    assert s.decide(0.31, 5, 10, buffer_len=99, capacity=100) == "generate"  # the buffer is not full yet
    assert s.decide(0.61, 5, 10, buffer_len=100, capacity=100) == "off"
    assert AdaptiveSchedule(0.6, replay_ratio="constant").sampling_threshold(9, 10) == pytest.approx(0.3)
    assert AdaptiveSchedule(0.6, replay_ratio="increasing").sampling_threshold(9, 10) == pytest.approx(0.54)


def test_split_prompts_and_relabel():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 8], [-100, 10, -100, -100]]),
    }
    prompts = split_prompts(batch)
    assert prompts == [[5, 6], [9]]
    out = relabel(prompts, [[1, 2, 3], [4]], max_length=4)
    assert out[0] == {"input_ids": [5, 6, 1, 2], "labels": [-100, -100, 1, 2]}  # cut to max_length
    assert out[1] == {"input_ids": [9, 4], "labels": [-100, 4]}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("onpolicy.mode=dagger", "onpolicy.mode: unknown mode"),
        ("onpolicy.lmbda=1.5", "onpolicy.lmbda: must be in [0, 1]"),
        ("onpolicy.temperature=0", "onpolicy.temperature"),
        ("onpolicy.lmbdaa=1", "onpolicy.lmbdaa: unknown key"),
    ],
)
def test_config_errors_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        _config(GKD, tmp_path, override)


def test_distillm_needs_a_validation_set(tmp_path):
    with pytest.raises(ConfigError, match="onpolicy.eval_examples"):
        _config(DISTILLM, tmp_path, "onpolicy.eval_examples=0")
    with pytest.raises(ConfigError, match="onpolicy.replay_ratio"):
        _config(DISTILLM, tmp_path, "onpolicy.replay_ratio=random")


# ---------------------------------------------------------------------------------------------------------------
# Tiny runs
# ---------------------------------------------------------------------------------------------------------------


class _Record(TrainerCallback):
    """Keeps the batches each optimizer step trained on (after the on-policy replacement)."""

    def __init__(self, trainer) -> None:
        self.batches: list[dict] = []
        original = trainer.get_batch_samples

        def wrapped(*args, **kwargs):
            batches, n = original(*args, **kwargs)
            self.batches.extend(batches)
            return batches, n

        trainer.get_batch_samples = wrapped


def test_gkd_with_lmbda_0_is_off_policy_training(tmp_path):
    common = ["training.max_steps=3", "training.gradient_accumulation_steps=2"]
    common += ["training.per_device_train_batch_size=2"]
    off = build_trainer(_config(GKD, tmp_path, *common, "onpolicy.mode=off", name="off"))
    off.train()
    gkd = build_trainer(_config(GKD, tmp_path, *common, "onpolicy.lmbda=0", name="gkd"))
    gkd.train()
    a, b = _metrics(tmp_path / "off"), _metrics(tmp_path / "gkd")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == ra["loss"] and rb["adakd/ratio"] == ra["adakd/ratio"]
        assert rb["onpolicy/fraction"] == 0.0
    for pa, pb in zip(off.model.parameters(), gkd.model.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)


def test_gkd_with_lmbda_1_trains_on_generated_tokens(tmp_path):
    config = _config(
        GKD, tmp_path, "training.max_steps=2", "training.gradient_accumulation_steps=2", "onpolicy.lmbda=1"
    )
    trainer = build_trainer(config)
    record = _Record(trainer)
    trainer.train()
    rows = _metrics(tmp_path / "run")
    assert [r["onpolicy/fraction"] for r in rows] == [1.0, 1.0]
    assert all(r["onpolicy/generation_s"] > 0 for r in rows)
    assert len(record.batches) == 4  # 2 steps x 2 micro-batches, each generated
    originals = {tuple(e["input_ids"]) for e in trainer.train_dataset.examples}
    prompts = {tuple(p) for p in split_prompts(trainer.data_collator(trainer.train_dataset.examples))}
    for batch in record.batches:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            n = int(mask.sum())
            ids, labels = ids[:n].tolist(), labels[:n].tolist()
            start = next(i for i, y in enumerate(labels) if y != -100)
            assert labels[start:] == ids[start:]  # the labels are the generated tokens
            assert tuple(ids[:start]) in prompts and tuple(ids) not in originals
            assert len(ids) - start <= 16 and max(ids) < len(trainer.processing_class)


def test_gkd_seq_kd_trains_on_teacher_generations(tmp_path):
    config = _config(GKD, tmp_path, "training.max_steps=2", "onpolicy.lmbda=0", "onpolicy.seq_kd=true")
    trainer = build_trainer(config)
    record = _Record(trainer)
    trainer.train()
    assert [r["onpolicy/fraction"] for r in _metrics(tmp_path / "run")] == [0.0, 0.0]  # not the student's
    originals = {tuple(e["input_ids"]) for e in trainer.train_dataset.examples}
    assert all(tuple(ids[m.bool()].tolist()) not in originals for b in record.batches for ids, m in
               zip(b["input_ids"], b["attention_mask"], strict=True))  # fmt: skip


def test_distillm_trains_validates_and_fills_the_buffer(tmp_path):
    config = _config(
        DISTILLM, tmp_path, "training.max_steps=4", "onpolicy.init_threshold=1.0", "onpolicy.eval_steps=2",
        "onpolicy.eval_examples=8", "onpolicy.capacity=12",
    )  # fmt: skip
    trainer = build_trainer(config)
    held_out = trainer.onpolicy.eval_examples
    assert len(held_out) == 8 and not any(e in trainer.train_dataset.examples for e in held_out)
    trainer.train()
    op = trainer.onpolicy
    assert len(op.schedule.history) == 3  # before training, after steps 2 and 4
    assert len(op.buffer) == 12  # 8 per generated step, capped at the capacity
    rows = _metrics(tmp_path / "run")
    assert [r["onpolicy/buffer_size"] for r in rows] == [8.0, 12.0, 12.0, 12.0]
    assert all(r["onpolicy/fraction"] == 1.0 and r["onpolicy/threshold"] == 1.0 for r in rows)


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_restores_the_buffer_and_the_schedule(tmp_path):
    common = [
        "training.max_steps=4", "training.save_strategy=steps", "training.save_steps=2", "onpolicy.eval_steps=1",
        "onpolicy.init_threshold=0.9", "onpolicy.eval_examples=8", "onpolicy.loss_eps=0.0", "onpolicy.capacity=20",
    ]  # fmt: skip
    first = build_trainer(_config(DISTILLM, tmp_path, *common))
    first.add_callback(_StopAt(2))
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / STATE_FILE).is_file() and (checkpoint / ONPOLICY_STATE_FILE).is_file()
    saved = first.onpolicy.state_dict()
    assert saved["steps"] == 2 and len(saved["schedule"]["history"]) == 3 and saved["buffer"]["memory"]

    second = build_trainer(_config(DISTILLM, tmp_path, *common))
    loaded = {}
    original = second.onpolicy.load_state_dict

    def spy(state):
        original(state)
        loaded.update(second.onpolicy.state_dict())

    second.onpolicy.load_state_dict = spy
    second.train(resume_from_checkpoint=True)
    assert loaded == saved
    # no second "initial" validation on resume: 3 before the checkpoint, then one after each of steps 3 and 4
    assert len(second.onpolicy.schedule.history) == 5 and second.onpolicy.steps == 4
    assert second.onpolicy.schedule.history[:3] == saved["schedule"]["history"]


def test_resume_without_onpolicy_state_is_an_error(tmp_path):
    common = ["training.max_steps=2", "training.save_strategy=steps", "training.save_steps=2"]
    build_trainer(_config(GKD, tmp_path, *common)).train()
    (tmp_path / "run" / "checkpoint-2" / ONPOLICY_STATE_FILE).unlink()
    with pytest.raises(ValueError, match=ONPOLICY_STATE_FILE):
        build_trainer(_config(GKD, tmp_path, *common, "training.max_steps=3")).train(resume_from_checkpoint=True)


def test_training_samples_without_importing_evaluation():
    """On-policy training and evaluation share adakd.generation; training pulls in neither eval/ nor report/."""
    code = (
        "import sys, adakd.train, adakd.train.onpolicy\n"
        "print(sorted(m for m in sys.modules if m.startswith(('adakd.eval', 'adakd.report'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
