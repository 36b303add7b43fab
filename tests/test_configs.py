"""Every shipped config loads: run configs through ``load_config``, accelerate configs through accelerate's parser.

The paper's runs (``configs/paper/<pair>/<run>.yaml``) are also checked against the paper's settings
(docs/method.md): LoRA r 16 / α 64 / dropout 0.1, AdaKD runs with LATF + inverse temperatures, plain KD with every
token at τ 1, SFT with no teacher, GKD / DistiLLM runs with their divergence and on-policy settings, a global batch
of 128 on 8 GPUs, and a header that opens with the file's own launch command.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from adakd.train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ACCELERATE = CONFIGS / "accelerate"
PAPER = CONFIGS / "paper"

RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if ACCELERATE not in p.parents)
PAPER_CONFIGS = sorted(PAPER.rglob("*.yaml"))
ACCELERATE_CONFIGS = sorted(ACCELERATE.glob("*.yaml"))

PAIRS = {"qwen2": True, "openllama2": True, "gpt2": False}  # pair -> student uses LoRA
BASES = ("fkl", "rkl", "abkd")
# mode -> (base, base_params); GKD's JSD λ 0.9 (TRL β 0.1) is the authors' GKD baseline
ONPOLICY = {"gkd": ("jsd", {"lam": 0.9}), "distillm": ("srkl", {"lam": 0.1})}
RUNS = ("sft-teacher", "sft", *BASES, *ONPOLICY, *(f"{b}-adakd" for b in (*BASES, *ONPOLICY)))
GPUS = 8  # the paper configs' batch assumes 8 data-parallel ranks

# file -> (distributed_type, num_processes, DeepSpeed zero_stage or None)
ACCELERATE_EXPECTED = {
    "ddp.yaml": ("MULTI_GPU", 8, None),
    "fsdp.yaml": ("FSDP", 8, None),
    "zero2.yaml": ("DEEPSPEED", 8, 2),
    "zero3.yaml": ("DEEPSPEED", 8, 3),
    "cpu-2proc.yaml": ("MULTI_GPU", 2, None),
}


def _id(path: Path) -> str:
    return path.relative_to(CONFIGS).as_posix()


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, Path]:
    """ADAKD_DATA and ADAKD_OUTPUTS pointing into tmp_path (load_config expands ${VAR} in paths)."""
    paths = {"ADAKD_DATA": tmp_path / "data", "ADAKD_OUTPUTS": tmp_path / "outputs"}
    for name, value in paths.items():
        monkeypatch.setenv(name, str(value))
    return paths


def test_the_paper_set_is_complete():
    expected = {f"paper/{pair}/{run}.yaml" for pair in PAIRS for run in RUNS}
    assert {_id(p) for p in PAPER_CONFIGS} == expected


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=_id)
def test_run_config_loads(path, env):
    config = load_config(path)
    for value in (config.data.path, config.training["output_dir"], config.teacher and config.teacher.name_or_path):
        assert "${" not in str(value or ""), f"{value!r}: an env var was left unexpanded"
    # The values, not just the key names, must be acceptable to TrainingArguments (use_cpu: bf16 needs a device).
    from transformers import TrainingArguments

    TrainingArguments(**{**config.training, "use_cpu": True})


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=_id)
def test_paper_config_follows_the_spec(path, env):
    rel = path.relative_to(REPO).as_posix()
    pair, run = path.parent.name, path.stem
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#") and f"adakd train {rel}" in lines[0], lines[0]
    launch = next((line for line in lines[:5] if "accelerate launch" in line), None)
    assert launch is not None and launch.rstrip().endswith(f"-m adakd train {rel}"), launch
    accel = re.search(r"--config_file (\S+)", launch).group(1)
    assert (REPO / accel).is_file(), f"{rel}: {accel} does not exist"
    assert any(line.startswith("# From the paper (docs/method.md):") for line in lines), f"{rel}: no paper section"
    assert any(line.startswith("# Not in the paper") for line in lines), f"{rel}: no note on the unstated choices"

    config = load_config(path)
    outputs = env["ADAKD_OUTPUTS"]
    assert Path(config.training["output_dir"]) == outputs / pair / run

    # Model and LoRA
    lora = config.student.lora
    if PAIRS[pair]:
        assert lora is not None, f"{rel}: the {pair} runs use LoRA"
        assert (lora.r, lora.alpha, lora.dropout) == (16, 64, 0.1)
        assert config.student.dtype == "bfloat16" and config.training["bf16"] is True
    else:
        assert lora is None, f"{rel}: GPT-2 is fully fine-tuned"
        assert config.student.tokenizer == "gpt2"
        assert config.data.source == "shards"
        assert Path(config.data.path) == env["ADAKD_DATA"] / "dolly-train-gpt2-tokens" / "train_0"
    if pair == "qwen2":
        assert config.loss.fused is True, f"{rel}: the 151,936-token vocabulary needs the fused loss"

    # Loss per kind of run
    loss = config.loss
    if run in ("sft-teacher", "sft"):
        assert config.teacher is None and loss.kd_ratio == 0.0
    else:
        assert config.teacher is not None
        assert Path(config.teacher.name_or_path) == outputs / pair / "sft-teacher" / "final"
        assert loss.kd_ratio == 1.0
        base = run.removesuffix("-adakd")
        if base in ONPOLICY:
            op = config.onpolicy
            assert op.mode == base and (loss.base, loss.base_params) == ONPOLICY[base]
            assert (op.temperature, op.top_p, op.max_new_tokens) == (1.0, 1.0, 256)
            if base == "gkd":
                assert (op.lmbda, op.seq_kd) == (0.5, False)
            else:
                assert (op.init_threshold, op.loss_eps, op.capacity, op.replay_ratio) == (0.0, 0.1, 1000, "decreasing")
                assert op.eval_examples == 500
        else:
            assert config.onpolicy.mode == "off"
            assert loss.base == base
        if base == "abkd":
            assert loss.base_params == {"alpha": 0.2, "beta": 0.7}
        if run.endswith("-adakd"):
            assert (loss.selection, loss.temperature, loss.indicator) == ("latf", "inverse", "hellinger")
            assert (loss.c, loss.tau_base, loss.ratio, loss.max_ratio) == (0.5, 1.0, None, 1.0)  # r0 = r_max
            assert (loss.ema_decay, loss.tolerance, loss.step_size) == (0.99, 0.05, 0.05)
            assert (loss.min_ratio, loss.max_ratio, loss.warmup_ratio) == (0.1, 1.0, 0.05)
        else:
            assert (loss.selection, loss.temperature, loss.tau_base) == ("all", "fixed", 1.0)

    # The shared protocol: batch 128 on 8 GPUs, cosine, 5% LR warm-up, weight decay 0.01, clip 1.0, 512 / 256.
    t = config.training
    assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * GPUS == 128
    assert t["lr_scheduler_type"] == "cosine" and t["warmup_steps"] == 0.05
    assert (t["weight_decay"], t["max_grad_norm"]) == (0.01, 1.0)
    assert isinstance(t["learning_rate"], float), f"{rel}: learning_rate {t['learning_rate']!r} is not a number"
    if pair == "gpt2" and run != "sft-teacher":
        assert t["learning_rate"] == 5e-4 and t["num_train_epochs"] == 20
    assert (config.data.max_length, config.data.max_prompt_length) == (512, 256)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=_id)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert path.name in ACCELERATE_EXPECTED, f"{path.name}: add it to ACCELERATE_EXPECTED"
    kind, processes, stage = ACCELERATE_EXPECTED[path.name]
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == kind
    assert config.num_processes == processes
    assert config.deepspeed_config.get("zero_stage") == stage
    if kind == "DEEPSPEED":
        ds = config.deepspeed_config
        assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
        assert ds["zero3_init_flag"] is (stage == 3)
    if kind == "FSDP":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2  # FSDP version 1 is refused by the trainer
        assert fsdp["fsdp_reshard_after_forward"] is True
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        # Every key is one the FSDP2 plugin accepts without an obsolescence warning (FSDP1-only keys are gone).
        obsolete = {
            f"fsdp_{k}" for k in ("use_orig_params", "sync_module_states", "backward_prefetch", "forward_prefetch")
        }
        assert not obsolete & set(fsdp), obsolete & set(fsdp)
    if path.name == "cpu-2proc.yaml":
        assert config.use_cpu is True and config.mixed_precision == "no"
    else:
        assert config.use_cpu is False and config.mixed_precision == "bf16"
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and f"accelerate launch --config_file {path.relative_to(REPO).as_posix()}" in first


def test_every_accelerate_config_is_expected():
    assert sorted(p.name for p in ACCELERATE_CONFIGS) == sorted(ACCELERATE_EXPECTED)


@pytest.mark.parametrize(
    ("good", "bad", "dotted"),
    [
        ("  selection: latf", "  selecton: latf", "loss.selecton"),
        ("  learning_rate: 5.0e-4", "  learning_rte: 5.0e-4", "training.learning_rte"),
        ("    alpha: 64", "    alpah: 64", "student.lora.alpah"),
    ],
)
def test_misspelled_key_names_file_and_key(good, bad, dotted, env, tmp_path):
    text = (PAPER / "qwen2" / "rkl-adakd.yaml").read_text()
    assert text.count(good + "\n") == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace(good + "\n", bad + "\n"))
    with pytest.raises(ConfigError) as info:
        load_config(broken)
    message = str(info.value)
    assert str(broken) in message and dotted in message, message


@pytest.mark.parametrize(
    ("override", "key", "match"),
    [
        ("loss.base_params={lam: 1.0}", "loss.base_params.lam", "for beta 0 \\(forward KL\\) use 'fkl'"),
        ("loss.tau_weight=cubed", "loss.tau_weight", "unknown 'cubed'; valid: squared, none"),
    ],
)
def test_tau_and_jsd_options_are_checked_by_key(override, key, match, tmp_path):
    overrides = [f"training.output_dir={tmp_path}", "loss.base=jsd", override]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: .*{match}"):
        load_config(REPO / "configs" / "tiny-cpu.yaml", overrides)


def test_tau_options_reach_the_loss(tmp_path):
    config = load_config(
        REPO / "configs" / "tiny-cpu.yaml",
        [f"training.output_dir={tmp_path}", "loss.tau_weight=none", "loss.detach_tau=false"],
    )
    loss = config.build_loss(total_steps=10)
    assert (loss.tau_weight, loss.detach_tau) == ("none", False)


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        # typed_yaml: a type, an unknown key, a value of an X | None field
        (["loss.c=abc"], "loss.c", "expected a number, got 'abc'"),
        (["loss.selecton=latf"], "loss.selecton", "unknown key (did you mean 'selection'?)"),
        (["data.limit=abc"], "data.limit", "expected an integer, got 'abc'"),
        # a section's own check, and a rule between sections
        (["onpolicy.mode=gkd", "onpolicy.top_p=0"], "onpolicy.top_p", "must be in (0, 1], got 0.0"),
        (["teacher=null"], "teacher", "no teacher: set loss.kd_ratio: 0 for plain SFT, or give a teacher"),
        # two errors: the earlier section's is the one reported (data is checked before loss)
        (["data.limit=-1", "loss.fused=maybe"], "data.limit", "must be >= 0, got -1"),
        (["loss.kd_ratio=2", "teacher=null"], "loss.kd_ratio", "must be in [0, 1], got 2.0"),
    ],
)
def test_config_errors_carry_key_and_reason(overrides, key, reason, tmp_path):
    # The key and the reason travel apart from the text: a caller reads them, never the message.
    path = REPO / "configs" / "tiny-cpu.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, [f"training.output_dir={tmp_path}", *overrides])
    error = info.value
    assert error.key == key and error.reason.startswith(reason)  # an unknown key's reason goes on: "; valid: ..."
    assert str(error) == f"{path}: {key}: {error.reason}"
