"""AdaKD inside TRL (adakd.integrations.trl): the same training as adakd.train.AdaKDTrainer on the same batches.

Tiny Qwen2 student and teacher built from configs, the built-in byte-level tokenizer with a small chat template, a
24-example conversational dataset in TRL's prompt-completion format (one epoch covers the run: TRL's sampler restarts
its shuffling on resume, so only within the first epoch does a resumed run replay the same batches); off-policy
(lmbda 0) unless a test says.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs TRL (pip install -e '.[trl]')")

from datasets import Dataset  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402
from trl import DistillationConfig  # noqa: E402

from adakd import LATF, AdaKDLoss  # noqa: E402
from adakd.data.examples import byte_tokenizer  # noqa: E402
from adakd.errors import InputError  # noqa: E402
from adakd.integrations.trl import AdaKDDistillationTrainer  # noqa: E402
from adakd.train import AdaKDTrainer  # noqa: E402
from adakd.train.checkpoints import STATE_FILE, CheckpointError  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs" / "trl.md"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# LATF that reacts at every step, so that a wrong step count, average or resume shows in the ratio trajectory.
LATF_KWARGS = {"warmup_steps": 1, "tolerance": 0.0, "ema_decay": 0.0, "step_size": 0.2, "min_ratio": 0.2}
STEPS, SAVE, BATCH, ACCUMULATION = 6, 3, 2, 2


def _tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"  # TRL pads prompts on the left
    return tok


def _models() -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]:
    """(student, teacher): the same random weights on every call. One vocabulary size, as TRL requires."""
    common = dict(vocab_size=264, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(1)
    teacher = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, **common))
    torch.manual_seed(2)
    student = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, tie_word_embeddings=True, **common))
    return student, teacher


def _rows(n: int = 24) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus {3 * i}?"}],
            "completion": [{"role": "assistant", "content": f"{i} plus {3 * i} is {4 * i}." + " Yes." * (i % 3)}],
        }
        for i in range(n)
    ]


def _trl_args(out: Path, **overrides) -> DistillationConfig:
    settings = dict(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION, optim="sgd", learning_rate=0.3, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, logging_steps=1, save_steps=SAVE, report_to="none",
        use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
    )  # fmt: skip
    return DistillationConfig(**{**settings, **overrides})


class _Recorder(TrainerCallback):
    """The loss state after every optimizer step (added after the trainer's own callback: LATF has stepped)."""

    def __init__(self, loss_fn: AdaKDLoss) -> None:
        self.loss_fn, self.states, self.at_begin = loss_fn, [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_begin = copy.deepcopy(self.loss_fn.controller.state_dict())

    def on_step_end(self, args, state, control, **kwargs):
        self.states.append(copy.deepcopy(self.loss_fn.controller.state_dict()))


class _RecordingTrainer(AdaKDDistillationTrainer):
    """Keeps every training micro-batch TRL built and the L_t the loss took from it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[dict[str, torch.Tensor]] = []
        self.micro_losses: list[float] = []
        self.recorder = _Recorder(self.loss_fn)
        self.add_callback(self.recorder)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            self.batches.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            self.micro_losses.append(self.loss_fn.last_report.mean_loss)
        return out


def _trl_trainer(out: Path, cls=_RecordingTrainer, rows=None, lmbda=0.0, args=None, **kwargs):
    student, teacher = _models()
    return cls(
        student, teacher, args or _trl_args(out), Dataset.from_list(rows or _rows()), processing_class=_tokenizer(),
        adakd_loss=dict(LATF_KWARGS), lmbda=lmbda, **kwargs,
    )  # fmt: skip


def _assert_same_state(a: dict, b: dict, rel: float) -> None:
    """Two LATF states (ratio, EMA, reference loss, step count) equal to ``rel``; None (before warm-up ends) alike."""
    assert a.keys() == b.keys()
    for key in a:
        if a[key] is None or b[key] is None:
            assert a[key] is b[key] is None, key
        else:
            assert a[key] == pytest.approx(b[key], rel=rel), key


def _steps(log_history: list[dict]) -> list[dict]:
    return [r for r in log_history if "loss" in r]


def _full_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A TRL micro-batch as AdaKDTrainer takes it: one sequence, labels -100 outside TRL's loss mask (unshifted)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    completion = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    labels = torch.cat([torch.full_like(batch["prompt_ids"], -100), completion], dim=1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference_run(out: Path, batches: list[dict[str, torch.Tensor]]) -> AdaKDTrainer:
    """adakd.train.AdaKDTrainer on exactly the micro-batches TRL trained on, in order, with the same optimizer."""
    student, teacher = _models()
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=1, gradient_accumulation_steps=ACCUMULATION,
        optim="sgd", learning_rate=0.3, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        weight_decay=0.0, logging_steps=1, save_steps=SAVE, report_to="none", use_cpu=True, disable_tqdm=True,
        seed=0, train_sampling_strategy="sequential",
    )  # fmt: skip
    trainer = AdaKDTrainer(
        student, teacher, loss_fn=AdaKDLoss(reduction="sum", **LATF_KWARGS), args=args,
        train_dataset=[_full_batch(b) for b in batches], data_collator=lambda features: features[0],
    )  # fmt: skip
    trainer.recorder = _Recorder(trainer.loss_fn)
    trainer.add_callback(trainer.recorder)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """One TRL run and the AdaKDTrainer reference run on its batches."""
    tmp = tmp_path_factory.mktemp("trl")
    ours = _trl_trainer(tmp / "trl")
    ours.train()
    reference = _reference_run(tmp / "reference", ours.batches)
    return tmp, ours, reference


def test_trl_training_equals_adakd_trainer_on_the_same_batches(parity):
    tmp, ours, reference = parity
    assert len(ours.batches) == STEPS * ACCUMULATION
    for i in range(0, len(ours.batches), ACCUMULATION):  # TRL's window count is the one AdaKDTrainer takes
        window = ours.batches[i : i + ACCUMULATION]
        assert int(window[0]["num_items_in_batch"]) == sum(int(b["completion_mask"].sum()) for b in window)

    a, b = _steps(ours.state.log_history), _steps(reference.state.log_history)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), ra["step"]
        for key in ("adakd/ratio", "adakd/kept_tokens", "adakd/valid_tokens"):
            assert ra[key] == rb[key], (ra["step"], key)
        for key in ("adakd/tau_mean", "adakd/tau_min", "adakd/tau_max"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5), (ra["step"], key)
    ratios = [r["adakd/ratio"] for r in a]
    assert len(set(ratios)) > 2, ratios  # LATF did move, so the comparison can tell trajectories apart

    # The controller after every optimizer step, and the checkpointed state, are AdaKDTrainer's.
    assert len(ours.recorder.states) == len(reference.recorder.states) == STEPS
    for sa, sb in zip(ours.recorder.states, reference.recorder.states, strict=True):
        _assert_same_state(sa, sb, rel=1e-5)
    saved = torch.load(tmp / "trl" / f"checkpoint-{SAVE}" / STATE_FILE, weights_only=False)["_extra_state"]
    expected = torch.load(tmp / "reference" / f"checkpoint-{SAVE}" / STATE_FILE, weights_only=False)["_extra_state"]
    _assert_same_state(saved["controller"], expected["controller"], rel=1e-5)
    _assert_same_state(saved["controller"], ours.recorder.states[SAVE - 1], rel=1e-12)

    # The same optimizer (SGD) on the same gradients: the same final weights.
    before, _ = _models()
    theirs = dict(reference.model.named_parameters())
    moved = 0.0
    for name, p in ours.model.named_parameters():
        torch.testing.assert_close(p, theirs[name], rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, (p - before.get_parameter(name)).abs().max().item())
    assert moved > 1e-3  # training did change the weights


def test_latf_steps_once_per_optimizer_step_on_the_mean_over_micro_batches(parity):
    _, ours, _ = parity
    # An independent controller fed once per optimizer step with the mean L_t of that step's micro-batches.
    losses = ours.micro_losses
    assert len(losses) == STEPS * ACCUMULATION
    latf = LATF(**LATF_KWARGS)
    for step, state in enumerate(ours.recorder.states):
        latf.update(sum(losses[step * ACCUMULATION : (step + 1) * ACCUMULATION]) / ACCUMULATION)
        _assert_same_state(state, latf.state_dict(), rel=1e-9)
    # Stepping per micro-batch would have given another trajectory: the check above discriminates.
    per_micro = LATF(**LATF_KWARGS)
    trajectory = [per_micro.update(x) for x in losses][ACCUMULATION - 1 :: ACCUMULATION]
    assert trajectory != pytest.approx([s["ratio"] for s in ours.recorder.states])


def test_adakd_metrics_go_through_trls_logging(parity):
    _, ours, _ = parity
    for row in _steps(ours.state.log_history):
        for key in ("adakd/ratio", "adakd/kept_tokens", "adakd/valid_tokens", "adakd/tau_mean", "entropy"):
            assert key in row, key
        assert row["adakd/kept_tokens"] <= row["adakd/valid_tokens"]
        assert row["adakd/tau_min"] <= row["adakd/tau_mean"] <= row["adakd/tau_max"]
        assert row["onpolicy/generated"] == 0.0  # lmbda 0: the dataset's completions
    # ... and the batches trained on hold exactly those (not samples): each row decodes to a dataset completion.
    tok = _tokenizer()
    expected = {r["completion"][0]["content"] + "<|endoftext|>" for r in _rows()}
    for batch in ours.batches:
        for ids, mask in zip(batch["completion_ids"], batch["completion_mask"], strict=True):
            assert tok.decode(ids[mask.bool()]) in expected


def test_resume_from_a_trl_checkpoint_restores_the_latf_state(parity, tmp_path):
    tmp, straight, _ = parity
    checkpoint = tmp / "trl" / f"checkpoint-{SAVE}"
    resumed = _trl_trainer(tmp_path / "resumed")
    fresh_state = copy.deepcopy(resumed.loss_fn.controller.state_dict())
    resumed.train(resume_from_checkpoint=str(checkpoint))

    after_save = straight.recorder.states[SAVE - 1]
    assert fresh_state["num_steps"] == 0 and after_save["num_steps"] == SAVE  # the restore is visible
    _assert_same_state(resumed.recorder.at_begin, after_save, rel=1e-12)
    assert len(resumed.recorder.states) == STEPS - SAVE
    for sa, sb in zip(resumed.recorder.states, straight.recorder.states[SAVE:], strict=True):
        _assert_same_state(sa, sb, rel=1e-6)
    a = _steps(straight.state.log_history)[SAVE:]
    b = [r for r in _steps(resumed.state.log_history) if r["step"] > SAVE]  # the checkpoint holds the earlier rows
    assert [r["step"] for r in b] == list(range(SAVE + 1, STEPS + 1))
    for ra, rb in zip(a, b, strict=True):
        assert rb["adakd/ratio"] == ra["adakd/ratio"], ra["step"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]

    # A checkpoint without the loss state is refused rather than resumed with a fresh controller.
    bare = tmp_path / "bare" / checkpoint.name
    shutil.copytree(checkpoint, bare)
    (bare / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=STATE_FILE):
        _trl_trainer(tmp_path / "other").train(resume_from_checkpoint=str(bare))


def _one_batch(trainer: AdaKDDistillationTrainer, n: int = 4) -> dict:
    trainer.model.train()
    return trainer._generate_and_score_completions([dict(r) for r in _rows(n)])


@pytest.mark.parametrize("fused", [False, True])
def test_the_loss_is_adakd_on_the_completion_tokens(tmp_path, fused):
    # One micro-batch that is the whole window: the loss is AdaKDLoss's mean over kept tokens, computed here on
    # the models' full logits with the labels shifted as for cross-entropy (an independent alignment).
    trainer = _trl_trainer(tmp_path, cls=AdaKDDistillationTrainer, fused=fused, chunk_size=7,
                           args=_trl_args(tmp_path, gradient_accumulation_steps=1))  # fmt: skip
    trainer.loss_fn.step(1.0)  # past warm-up: the same ratio for both paths
    trainer.loss_fn.controller.ratio = 0.6  # a real selection
    batch = _one_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    student, teacher = _models()
    full = _full_batch(batch)
    reference = AdaKDLoss(**LATF_KWARGS)
    reference.load_state_dict(trainer.loss_fn.state_dict())
    with torch.no_grad():
        t_logits = teacher(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits[:, :-1]
    s_logits = student(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits[:, :-1]
    expected = reference(s_logits, t_logits, full["labels"][:, 1:])
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-7)
    for name, p in student.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert 0 < trainer.loss_fn.last_report.kept_tokens < trainer.loss_fn.last_report.valid_tokens


def test_dataset_completions_are_tokenized_as_the_chat_template_renders_them(tmp_path):
    trainer = _trl_trainer(tmp_path, cls=AdaKDDistillationTrainer, args=_trl_args(tmp_path, max_completion_length=9))
    tok, rows = _tokenizer(), _rows(3)
    prompts, completions = trainer.tokenize_completions([r["prompt"] for r in rows], rows)
    for row, p, c in zip(rows, prompts, completions, strict=True):
        assert p == tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"]
        full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)["input_ids"]
        assert p + c == full[: len(p) + 9]  # cut to max_completion_length
        assert tok.decode(full[len(p) :]) == row["completion"][0]["content"] + "<|endoftext|>"

    text = [{"prompt": "Q: 2 plus 2?", "completion": " A: 4."}, {"prompt": "Q: 1?", "completion": " A.<|endoftext|>"}]
    prompts, completions = trainer.tokenize_completions([r["prompt"] for r in text], text)
    assert [tok.decode(c) for c in completions] == [" A: 4.<|endoftext|>", " A.<|endoftext|>"]  # eos once
    assert [tok.decode(p) for p in prompts] == ["Q: 2 plus 2?", "Q: 1?"]
    with pytest.raises(InputError, match="no 'completion'"):
        trainer.tokenize_completions(["Q"], [{"prompt": "Q"}])


def test_on_policy_steps_sample_from_the_student(tmp_path):
    trainer = _trl_trainer(tmp_path, lmbda=1.0, args=_trl_args(tmp_path, max_steps=2, max_completion_length=5))
    calls = []
    sample = trainer._generate_single_turn

    def counted(*args, **kwargs):
        calls.append(1)
        return sample(*args, **kwargs)

    trainer._generate_single_turn = counted
    trainer.train()
    assert len(calls) == 2  # one generation batch per optimizer step
    assert trainer.loss_fn.controller.num_steps == 2
    assert all(int(b["completion_mask"].sum(1).max()) <= 5 for b in trainer.batches)
    rows = _steps(trainer.state.log_history)
    assert [r["onpolicy/generated"] for r in rows] == [1.0, 1.0] and all("adakd/ratio" in r for r in rows)


def test_lmbda_draws_once_per_step_the_same_on_every_instance(tmp_path):
    a = _trl_trainer(tmp_path / "a", cls=AdaKDDistillationTrainer, lmbda=0.3)
    b = _trl_trainer(tmp_path / "b", cls=AdaKDDistillationTrainer, lmbda=0.3)
    a.model.train()
    draws = []
    for step in range(400):
        a.state.global_step = b.state.global_step = step
        draws.append(a._dataset_completions_now())
        assert draws[-1] == b._dataset_completions_now() == a._dataset_completions_now()
    assert 0.6 < sum(draws) / len(draws) < 0.8  # dataset completions with probability 1 − lmbda
    a.model.eval()
    assert a._dataset_completions_now()  # evaluation scores the dataset's completions


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"args": "beta"}, "beta"),
        ({"adakd_loss": AdaKDLoss()}, "reduction"),
        ({"adakd_loss": {"reduction": "mean"}}, "reduction"),
        ({"adakd_loss": {"selekton": "latf"}}, "adakd_loss: unknown LATF argument"),
        ({"lmbda": 1.5}, "lmbda"),
        ({"rows": [{"prompt": "Q"}] * 4}, "completion"),
        ({"teacher": None}, "teacher"),
        ({"tools": [lambda x: x]}, "tools"),
        ({"softcap": 30.0}, "fused=True"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_arguments_adakd_cannot_honour_are_refused(tmp_path, change, message):
    student, teacher = _models()
    args = _trl_args(tmp_path, beta=0.5) if change.get("args") else _trl_args(tmp_path)
    kwargs = {"adakd_loss": change.get("adakd_loss", {}), "lmbda": change.get("lmbda", 0.0)}
    if "tools" in change:
        kwargs["tools"] = change["tools"]
    if "softcap" in change:
        student.config.final_logit_softcapping = change["softcap"]
        kwargs["fused"] = True
    if "chunk_size" in change:
        kwargs["chunk_size"] = change["chunk_size"]
    with pytest.raises(InputError, match=message):
        AdaKDDistillationTrainer(
            student, change.get("teacher", teacher), args, Dataset.from_list(change.get("rows", _rows())),
            processing_class=_tokenizer(), **kwargs,
        )  # fmt: skip


def _docs_block(name: str) -> str:
    block = re.search(rf"<!-- test: {name} -->\n```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert block, f"docs/trl.md has no block marked {name}"
    return block.group(1)


def test_the_docs_trl_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    exec(compile(_docs_block("trl-example"), "docs/trl.md trl-example", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == trainer.loss_fn.controller.num_steps == trainer.args.max_steps
    assert list(tmp_path.glob(f"*/checkpoint-*/{STATE_FILE}"))


def test_the_docs_hand_written_loop_runs(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    exec(compile(_docs_block("hand-written-loop"), "docs/trl.md hand-written-loop", "exec"), namespace)
    # LATF stepped once per optimizer step, not once per micro-batch.
    assert namespace["loss_fn"].controller.num_steps == namespace["steps"]
    assert namespace["steps"] * namespace["accumulation"] > namespace["steps"]


def test_evaluation_scores_the_eval_set_without_moving_latf(tmp_path):
    trainer = _trl_trainer(
        tmp_path, cls=AdaKDDistillationTrainer, args=_trl_args(tmp_path, per_device_eval_batch_size=4)
    )
    trainer.eval_dataset = Dataset.from_list(_rows(8))
    trainer.loss_fn.step(1.0)
    before = (copy.deepcopy(trainer.loss_fn.state_dict()), trainer.loss_fn.pending())
    metrics = trainer.evaluate()
    assert (trainer.loss_fn.state_dict(), trainer.loss_fn.pending()) == before
    assert metrics["eval_loss"] > 0 and metrics["eval_adakd/valid_tokens"] > 0 and "eval_adakd/ratio" in metrics


_DDP_WORKER = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from tests.integrations.test_trl import _RecordingTrainer, _trl_args, _trl_trainer
from pathlib import Path

out = Path(sys.argv[2])
args = _trl_args(out / "run", max_steps=3, save_strategy="no", ddp_backend="gloo", ddp_timeout=300)
trainer = _trl_trainer(out / "run", cls=_RecordingTrainer, args=args)
trainer.train()
rank = trainer.args.process_index

# The same through torch.distributed alone (no accelerator), as a hand-written DDP loop calls it.
import torch
from adakd import AdaKDLoss
from adakd.integrations import step_latf
loss_fn = AdaKDLoss(warmup_steps=0)
torch.manual_seed(rank)
plain = [loss_fn(torch.randn(3, 5, 11), torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))).item() for _ in range(2)]
step_latf(loss_fn)
record = {"micro": trainer.micro_losses, "states": trainer.recorder.states, "plain": plain,
          "plain_state": loss_fn.controller.state_dict()}
(out / f"rank{rank}.json").write_text(json.dumps(record))
# Leave together: a rank that exits while the other still holds the gloo group can abort at teardown.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_hold_the_ratio_of_the_mean_over_ranks(tmp_path):
    # torchrun, two CPU processes (gloo, DDP): each rank trains on its own batches; LATF must see the mean L_t over
    # both ranks' micro-batches, so both ranks hold one trajectory, which their local means alone would not give.
    worker = tmp_path / "worker.py"
    worker.write_text(_DDP_WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={29400 + os.getpid() % 200}", str(worker)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, str(DOCS.parents[1]), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["micro"] != ranks[1]["micro"]  # the ranks trained on different batches
    latf, local = LATF(**LATF_KWARGS), LATF(**LATF_KWARGS)
    for step in range(3):
        window = slice(step * ACCUMULATION, (step + 1) * ACCUMULATION)
        both = ranks[0]["micro"][window] + ranks[1]["micro"][window]
        latf.update(sum(both) / len(both))
        local.update(sum(ranks[0]["micro"][window]) / ACCUMULATION)
        for rank in ranks:
            _assert_same_state(rank["states"][step], latf.state_dict(), rel=1e-9)
    assert local.state_dict()["ema"] != pytest.approx(latf.state_dict()["ema"])  # rank 0 alone would differ
    # step_latf without an accelerator all-reduces through torch.distributed.
    plain = LATF()
    plain.update(sum(ranks[0]["plain"] + ranks[1]["plain"]) / 4)
    for rank in ranks:
        _assert_same_state(rank["plain_state"], plain.state_dict(), rel=1e-9)
