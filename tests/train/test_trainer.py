"""The trainer end to end on tiny models built from configs: runs, resume, invariances, CLI errors."""

from __future__ import annotations

import inspect as pyinspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import TrainerCallback  # noqa: E402

from adakd.train import build_trainer, load_config, run  # noqa: E402
from adakd.train.trainer import STATE_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny-cpu.yaml"


def _config(tmp_path: Path, *overrides: str, name: str = "run"):
    base = [
        f"training.output_dir={tmp_path / name}",
        "training.logging_steps=1",
        "training.disable_tqdm=true",
        "data.synthetic_size=96",
    ]
    return load_config(TINY, [*base, *overrides])


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_end_to_end(tmp_path):
    import time

    config = _config(tmp_path, "training.max_steps=6", "training.save_steps=3")
    start = time.time()
    summary = run(config)
    end = time.time()
    out = tmp_path / "run"
    assert summary["global_step"] == 6
    assert (out / "final" / "config.json").is_file() and (out / "final" / STATE_FILE).is_file()
    assert (out / "final" / "tokenizer.json").is_file()
    assert (out / "checkpoint-3" / STATE_FILE).is_file()
    rows = [r for r in _metrics(out) if "loss" in r]
    assert len(rows) == 6
    for r in rows:
        for key in ("loss", "kd_loss", "adakd/ratio", "adakd/kept_tokens", "adakd/valid_tokens", "adakd/tau_mean"):
            assert key in r, key
        assert r["adakd/tau_min"] <= r["adakd/tau_mean"] <= r["adakd/tau_max"]
        assert r["loss"] == pytest.approx(r["kd_loss"], rel=1e-4)  # kd_ratio 1: the loss is the KD term
    times = [r["time"] for r in _metrics(out)]  # every row, the Trainer's summary included: the wall clock
    assert start <= times[0] and times == sorted(times) and times[-1] <= end


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


LATF_MOVES = [  # LATF that reacts at every step, so that a wrong resume shows in the ratio trajectory
    "loss.ema_decay=0.0",
    "loss.tolerance=0.0",
    "loss.step_size=0.2",
    "loss.warmup_steps=1",
    "loss.min_ratio=0.2",
]


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    common = ["training.max_steps=10", "training.save_steps=5", *LATF_MOVES]
    straight = build_trainer(_config(tmp_path, *common, name="straight"))
    straight.train()

    first = build_trainer(_config(tmp_path, *common, name="resumed"))
    first.add_callback(_StopAt(5))
    first.train()
    assert (tmp_path / "resumed" / "checkpoint-5" / STATE_FILE).is_file()
    second = build_trainer(_config(tmp_path, *common, name="resumed"))
    second.train(resume_from_checkpoint=True)

    a = [r for r in _metrics(tmp_path / "straight") if "loss" in r]
    b = [r for r in _metrics(tmp_path / "resumed") if "loss" in r]
    assert [r["step"] for r in b] == list(range(1, 11))
    ratios = [r["adakd/ratio"] for r in a]
    assert len(set(ratios)) > 2, ratios  # the controller did move
    for ra, rb in zip(a, b, strict=True):
        assert rb["adakd/ratio"] == pytest.approx(ra["adakd/ratio"], rel=1e-9), ra["step"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]
    assert second.loss_fn.controller.state_dict() == pytest.approx(straight.loss_fn.controller.state_dict())


def _one_step_weights(tmp_path, name, batch, accumulation, *extra):
    config = _config(
        tmp_path,
        "training.max_steps=1",
        f"training.per_device_train_batch_size={batch}",
        f"training.gradient_accumulation_steps={accumulation}",
        "training.optim=sgd",
        "training.learning_rate=0.5",
        "training.warmup_steps=0",
        "training.lr_scheduler_type=constant",
        "training.max_grad_norm=0",
        "training.save_strategy=no",
        "loss.selection=all",
        "loss.temperature=fixed",
        *extra,
        name=name,
    )
    trainer = build_trainer(config)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    logged = [r for r in _metrics(tmp_path / name) if "loss" in r][0]
    return before, dict(trainer.model.named_parameters()), logged


@pytest.mark.parametrize("kd_ratio", [1.0, 0.5])
def test_gradient_accumulation_invariance(tmp_path, kd_ratio):
    # One optimizer step on the same 4 sequences, as 1 micro-batch of 4 or as 4 micro-batches of 1.
    b0, one, log_one = _one_step_weights(tmp_path, "one", 4, 1, f"loss.kd_ratio={kd_ratio}")
    b1, four, log_four = _one_step_weights(tmp_path, "four", 1, 4, f"loss.kd_ratio={kd_ratio}")
    assert log_one["loss"] == pytest.approx(log_four["loss"], rel=1e-5)
    moved = 0.0
    for name, p in one.items():
        torch.testing.assert_close(b0[name], b1[name])  # the same initial weights
        torch.testing.assert_close(four[name], p, rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, (p - b0[name]).abs().max().item())
    assert moved > 1e-4  # the step did change the weights


@pytest.mark.parametrize(
    "variant", [[], ["loss.detach_tau=false", "loss.tau_weight=none", "loss.selection=fixed", "loss.ratio=0.5"]]
)
def test_fused_and_logits_paths_give_the_same_loss(tmp_path, variant):
    results = []
    for fused in ("false", "true"):
        overrides = [f"loss.fused={fused}", "loss.kd_ratio=0.7", "loss.chunk_size=7", *variant]
        if variant:  # fixed selection takes no LATF settings
            overrides += ["loss.ema_decay=0.99", "loss.tolerance=0.05", "loss.warmup_ratio=0.05"]
        trainer = build_trainer(_config(tmp_path, *overrides))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        results.append((loss.detach(), grads, dict(trainer.loss_fn.stats)))
    (l0, g0, s0), (l1, g1, s1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert len(g0) == len(g1)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert s0["kept_tokens"] == s1["kept_tokens"]


def test_sft_mode_is_the_models_own_cross_entropy(tmp_path):
    config = _config(tmp_path, "loss.kd_ratio=0")
    config.teacher = None
    trainer = build_trainer(config.validate())
    assert trainer.teacher is None
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ours = trainer.compute_loss(trainer.model, batch)
    theirs = trainer.model(**batch).loss  # transformers' shifted, token-averaged cross-entropy
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    trainer.train_dataset.examples = trainer.train_dataset.examples[:16]
    trainer.args.max_steps = 2
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("lora", [True, False])
def test_lora_and_full_fine_tuning_both_train(tmp_path, lora):
    overrides = ["training.max_steps=3", "training.save_strategy=no"]
    if lora:
        overrides += ["student.lora={r: 4, alpha: 16, dropout: 0.0}"]
    trainer = build_trainer(_config(tmp_path, *overrides))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    changed = {k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])}
    if lora:
        assert changed and all("lora_" in k for k in changed)  # only the adapters move
    else:
        assert len(changed) == len(before)  # every weight moves
    run_dir = tmp_path / "run"
    trainer.save_model(str(run_dir / "final"))
    assert (run_dir / "final" / ("adapter_config.json" if lora else "config.json")).is_file()


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "adakd", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("selection: latf", "selekton: latf"))
    proc = _cli("train", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and "loss.selekton: unknown key" in proc.stderr
    proc = _cli("train", str(TINY), "loss.ratio=two")
    assert proc.returncode == 2 and "loss.ratio: expected a number" in proc.stderr
    proc = _cli("train", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "missing.yaml: cannot read" in proc.stderr


@pytest.mark.slow
def test_cli_trains(tmp_path):
    proc = _cli("train", str(TINY), f"training.output_dir={tmp_path / 'cli'}", "training.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "cli" / "final" / STATE_FILE).is_file()
    assert "rank 0:" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_processes_hold_the_same_ratio(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--nproc_per_node=2", "--master_port=29517", "-m", "adakd", "train", str(TINY),
        f"training.output_dir={tmp_path / 'ddp'}", "training.max_steps=8", "training.ddp_backend=gloo",
        "training.disable_tqdm=true", *LATF_MOVES,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = {}
    for line in proc.stderr.splitlines():
        if "[adakd] rank " in line:
            rank, _, payload = line.partition("[adakd] rank ")[2].partition(": ")
            reports[int(rank)] = json.loads(payload)
    assert set(reports) == {0, 1}
    assert reports[0]["global_step"] == reports[1]["global_step"] == 8
    assert reports[0]["ratio"] == reports[1]["ratio"] < 1.0


def test_evaluation_batches_do_not_move_latf(tmp_path):
    trainer = build_trainer(_config(tmp_path))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    assert trainer.loss_fn.pending() == (0.0, 0)  # nothing counts towards LATF's next step
    trainer.log({"loss": 0.0})
    assert "kd_loss" not in trainer.state.log_history[-1]  # nor towards the training logs
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    assert trainer.loss_fn.pending()[1] == 1
    trainer.log({"loss": 0.0})
    assert "kd_loss" in trainer.state.log_history[-1] and "adakd/ratio" in trainer.state.log_history[-1]


def test_kd_is_normalised_by_the_tokens_the_loss_really_kept(tmp_path):
    """The trainer's KD term is the loss's own sum divided by what the loss reports it kept (scaled to the window
    by the micro-batch's share of valid tokens), not by r × valid tokens."""
    trainer = build_trainer(_config(tmp_path, "loss.selection=fixed", "loss.ratio=0.3", "loss.kd_ratio=1.0"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    valid = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=valid)
    report = trainer.loss_fn.last_report
    assert report.valid_tokens == valid and report.kept_tokens == max(1, math.floor(valid * 0.3 + 1e-6))
    assert report.kept_tokens != valid * 0.3  # so that r × valid (the old normaliser) would give another value
    # The mean over kept: the loss's L_t, Σ_kept τ²·D / k (its report's loss is now the mixed, returned value).
    assert loss.item() == pytest.approx(report.mean_loss, rel=1e-6)


@pytest.mark.parametrize(
    ("examples", "batch", "accumulation", "epochs"),
    [(96, 8, 1, 1.0), (96, 8, 3, 2.0), (100, 8, 3, 1.5), (7, 8, 2, 0.25), (96, 5, 4, 2.7)],
)
def test_optimizer_steps_match_the_trainers_own_count(tmp_path, examples, batch, accumulation, epochs):
    """LATF's warm-up and the ratio schedules are sized from the run's optimizer steps: the same count the
    Trainer will run, a fractional num_train_epochs included (it used to be rounded up to whole epochs)."""
    from adakd.train.inputs import optimizer_steps

    config = _config(
        tmp_path, "training.max_steps=-1", f"training.num_train_epochs={epochs}",
        f"training.per_device_train_batch_size={batch}", f"training.gradient_accumulation_steps={accumulation}",
        f"data.synthetic_size={examples}",
    )  # fmt: skip
    trainer = build_trainer(config)
    n = len(trainer.train_dataset)  # the synthetic source skips some over-long prompts
    hook = trainer.set_initial_training_values
    extra = {}
    if "total_train_batch_size" in pyinspect.signature(hook).parameters:  # transformers 5.0 takes it as an argument
        args = trainer.args
        extra["total_train_batch_size"] = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    want = hook(trainer.args, trainer.get_train_dataloader(), **extra)[-1]
    assert optimizer_steps(trainer.args, n) == want
    assert trainer.loss_fn.controller.warmup_steps == int(0.1 * want)  # the tiny config's warmup_ratio 0.1


def test_the_private_trainer_hooks_adakd_overrides_behave_as_relied_on(tmp_path):
    """AdaKDTrainer overrides four private Trainer methods where no public hook does the job (an atomic checkpoint
    must control the folder the Trainer writes into; on-policy steps replace a step's batches before they are
    counted). This pins what it relies on, so a transformers release that changes them fails here, by name."""
    import inspect as pyinspect

    from transformers import Trainer, TrainingArguments

    for name, params in (
        ("_save_checkpoint", ["self", "model", "trial"]),
        ("_get_output_dir", ["self", "trial"]),
        ("get_batch_samples", ["self", "epoch_iterator", "num_batches", "device"]),
        ("_get_num_items_in_batch", ["self", "batch_samples", "device"]),
    ):
        assert list(pyinspect.signature(getattr(Trainer, name)).parameters) == params, name

    ours = build_trainer(_config(tmp_path))
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to="none", save_strategy="no")
    plain = Trainer(model=ours.model, args=args)
    # _save_checkpoint writes checkpoint-N under whatever _get_output_dir returns (the staging folder, for us).
    plain.state.global_step = 3
    plain.create_optimizer_and_scheduler(num_training_steps=3)
    staging = tmp_path / "staging"
    plain._get_output_dir = lambda trial: str(staging)
    plain._save_checkpoint(plain.model, None)
    assert (staging / "checkpoint-3" / "trainer_state.json").is_file()
    # get_batch_samples returns (batches, the window's label-token count), the count _get_num_items_in_batch gives.
    batches = [ours.data_collator([ours.train_dataset[i] for i in range(j, j + 2)]) for j in (0, 2)]
    got, count = plain.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    assert len(got) == 2 and int(count) == int(plain._get_num_items_in_batch(batches, torch.device("cpu")))
    assert int(count) == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


@pytest.mark.parametrize("fused", ["true", "false"])
def test_sft_mode_on_both_paths_is_the_models_own_cross_entropy(tmp_path, fused):
    config = _config(tmp_path, "loss.kd_ratio=0", f"loss.fused={fused}", "loss.chunk_size=5")
    config.teacher = None
    trainer = build_trainer(config.validate())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ours = trainer.compute_loss(trainer.model, batch)
    ours.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad()
    theirs = trainer.model(**batch).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, p in zip(grads, trainer.model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_fused_auto_is_the_default_and_says_which_path(tmp_path, capsys):
    trainer = build_trainer(_config(tmp_path, name="auto"))
    assert trainer.fused is True and "hidden @ Wᵀ" in trainer.fused_reason
    assert (
        "[adakd] loss path: fused (loss.fused: auto; the output layers are hidden @ Wᵀ (+ b))"
        in capsys.readouterr().out
    )
    # A teacher that soft-caps its logits cannot take the fused path: auto falls back and names why.
    gemma = {"model_type": "gemma2", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "final_logit_softcapping": 30.0, "max_position_embeddings": 512}  # fmt: skip
    config = _config(tmp_path, name="capped")
    config.teacher.config = gemma
    trainer = build_trainer(config)
    assert trainer.fused is False and "final_logit_softcapping" in trainer.fused_reason
    assert "[adakd] loss path: logits (loss.fused: auto; the teacher" in capsys.readouterr().out
    config = _config(tmp_path, "loss.fused=true", name="forced")
    config.teacher.config = gemma
    with pytest.raises(Exception, match="loss.fused: the teacher .* soft-capping"):
        build_trainer(config)
    with pytest.raises(Exception, match="loss.fused: must be true, false or auto, got 'maybe'"):
        _config(tmp_path, "loss.fused=maybe")


def test_a_cut_last_metrics_line_is_dropped_before_a_resumed_run_appends(tmp_path, capsys):
    """A run killed while writing metrics.jsonl leaves a cut last line; the resumed run must not glue its first row
    to it (adakd report would then refuse the whole file)."""
    from adakd.report.metrics import read_metrics

    common = ["training.max_steps=4", "training.save_steps=2"]
    first = build_trainer(_config(tmp_path, *common, name="cut"))
    first.add_callback(_StopAt(2))
    first.train()
    metrics = tmp_path / "cut" / "metrics.jsonl"
    whole = metrics.read_bytes()
    metrics.write_bytes(whole + b'{"step": 3, "loss": 1.2')  # the kill came mid-write
    second = build_trainer(_config(tmp_path, *common, name="cut"))
    second.train(resume_from_checkpoint=True)
    assert "metrics.jsonl: dropped its last line, cut by an interrupted run (23 bytes)" in capsys.readouterr().out
    assert metrics.read_bytes().startswith(whole)
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [1, 2, 3, 4]


def test_repair_metrics_keeps_whole_lines(tmp_path):
    from adakd.train.callbacks import repair_metrics

    path = tmp_path / "metrics.jsonl"
    assert repair_metrics(path) == 0 and not path.exists()
    path.write_bytes(b'{"step": 1}\n')
    assert repair_metrics(path) == 0 and path.read_bytes() == b'{"step": 1}\n'
    path.write_bytes(b'{"ste')
    assert repair_metrics(path) == 5 and path.read_bytes() == b""


def test_a_run_and_its_resume_show_no_expected_warnings(tmp_path):
    """The Trainer warned on every run that the tokenizer's special tokens differ from the (inline, placeholder)
    model config, and on every resume of a tied-embedding student that ``lm_head.weight`` is missing: both are
    expected, and read like faults. Neither shows now; the ids are still aligned and the weights still tied."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    keys = [
        f"training.output_dir={out}",
        "training.save_steps=1",
        "data.synthetic_size=16",
        "training.disable_tqdm=true",
    ]
    cmd = [sys.executable, "-m", "adakd", "train", str(TINY), *keys]
    first = subprocess.run([*cmd, "training.max_steps=1"], capture_output=True, text=True, cwd=ROOT)
    resumed = subprocess.run([*cmd, "training.max_steps=2", "--resume"], capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == resumed.returncode == 0, resumed.stderr[-2000:]
    for err in (first.stderr, resumed.stderr):
        assert "new PAD/BOS/EOS" not in err and "missing keys" not in err, err[-3000:]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.eos_token_id == model.config.pad_token_id == 256  # the byte tokenizer's
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


FRAGMENT = """
import sys, torch
from adakd.memory import release_freed_memory

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

torch.empty(4 << 20, dtype=torch.uint8).fill_(1)  # freeing an mmapped 4 MB block raises glibc's mmap threshold
held = [torch.ones(3 << 18) for _ in range(300)]  # 300 x 3 MB, now from the heap
del held[:-1]  # the last block stays, so the heap's free space sits below it and cannot shrink by itself
before = rss()
assert release_freed_memory()
print(before, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_cpu_memory_goes_back_to_the_system_every_step(tmp_path, monkeypatch):
    """The growth a long CPU run showed (bench/memory_bench.py) is glibc keeping freed heap memory: trimming gives it
    back (here, 900 MB held after their tensors were freed), and the trainer trims every ``ADAKD_MALLOC_TRIM``
    optimizer steps."""
    out = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert before > 800 and after < before - 700, (before, after)

    import adakd.train.callbacks as callbacks

    calls = []
    monkeypatch.setattr(callbacks, "release_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv("ADAKD_MALLOC_TRIM", "2")
    build_trainer(_config(tmp_path, "training.max_steps=5")).train()
    assert len(calls) == 2  # after steps 2 and 4
    monkeypatch.setenv("ADAKD_MALLOC_TRIM", "0")
    build_trainer(_config(tmp_path, "training.max_steps=2", name="off")).train()
    assert len(calls) == 2
