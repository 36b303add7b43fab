"""Single-process checks of the engine layer: forward redirection, full parameters, FSDP1 refusal, and the guard
that keeps the fused loss from optimising another objective on models whose logits are not hidden @ Wᵀ (+ b)."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from adakd.train.config import ConfigError  # noqa: E402
from adakd.train.engines import call_through, check_linear_head, engine_of, full_parameters, unwrap  # noqa: E402

SMALL = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=64, head_dim=8,
)  # fmt: skip


def _model(model_type: str, **extra):
    config = AutoConfig.for_model(model_type, **{**SMALL, **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_call_through_runs_the_wrappers_hooks_and_restores_forward():
    model = torch.nn.Linear(3, 2)
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append("pre"), with_kwargs=True)
    model.register_forward_hook(lambda m, args, out: seen.append("post"))
    accelerate_like = model.forward  # an instance-level forward, as accelerate installs for mixed precision
    model.forward = accelerate_like
    out = call_through(model, lambda x: x * 2, torch.ones(2))
    assert torch.equal(out, torch.full((2,), 2.0)) and seen == ["pre", "post"]
    assert model.__dict__["forward"] is accelerate_like  # restored
    del model.forward
    call_through(model, lambda: torch.zeros(()))
    assert "forward" not in model.__dict__  # nothing left behind


def test_call_through_a_ddp_module_arms_its_reducer(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        inner = torch.nn.Linear(3, 1)
        ddp = torch.nn.parallel.DistributedDataParallel(inner)
        calls = []
        original = ddp._pre_forward
        ddp._pre_forward = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        loss = call_through(ddp, lambda x: inner.weight.sum() * x.sum(), torch.ones(3))
        loss.backward()
        assert calls == [1] and inner.weight.grad is not None
        assert unwrap(ddp) is inner
    finally:
        dist.destroy_process_group()


def test_full_parameters_passes_full_tensors_through_detached():
    w = torch.nn.Parameter(torch.randn(4, 3))
    with full_parameters(w, None) as (full, none):
        assert none is None and torch.equal(full, w) and not full.requires_grad


def _accelerator(kind: str, fsdp2: bool = False, processes: int = 2):
    from accelerate.utils import DistributedType

    return types.SimpleNamespace(distributed_type=DistributedType[kind], is_fsdp2=fsdp2, num_processes=processes)


def test_engine_of_names_each_engine_and_refuses_fsdp1():
    assert engine_of(_accelerator("NO", processes=1)) == "single"
    assert engine_of(_accelerator("MULTI_CPU")) == "ddp"
    assert engine_of(_accelerator("MULTI_GPU")) == "ddp"
    assert engine_of(_accelerator("DEEPSPEED")) == "deepspeed"
    assert engine_of(_accelerator("FSDP", fsdp2=True)) == "fsdp2"
    with pytest.raises(ConfigError, match=r"FSDP version 1 is not supported; use FSDP2 \(fsdp_version: 2"):
        engine_of(_accelerator("FSDP", fsdp2=False))


def test_a_quantised_output_layer_is_refused():
    class Params4bit(torch.nn.Parameter):  # how bitsandbytes names the packed weight of a quantised layer
        pass

    model = _model("qwen2", tie_word_embeddings=False)
    head = model.get_output_embeddings()
    head.weight = Params4bit(head.weight.detach().clone(), requires_grad=False)
    with pytest.raises(ConfigError, match="loss.fused: the student's output layer is quantised"):
        check_linear_head(model, "student")


def test_linear_heads_pass():
    check_linear_head(_model("qwen2"), "student")
    check_linear_head(_model("qwen2", tie_word_embeddings=False), "teacher")
    check_linear_head(_model("cohere", logit_scale=1.0), "student")  # a scale of 1 changes nothing


@pytest.mark.parametrize(
    ("model_type", "extra", "attr"),
    [
        ("gemma2", {"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
        ("cohere", {"logit_scale": 0.0625}, "logit_scale=0.0625"),
        ("granite", {"logits_scaling": 8.0}, "logits_scaling=8.0"),
    ],
)
def test_transformed_heads_are_refused_by_name(model_type, extra, attr):
    model = _model(model_type, **extra)
    with pytest.raises(ConfigError, match=rf"^loss.fused: the student .* \({attr}\);.*set loss.fused: false"):
        check_linear_head(model, "student")


def test_an_unknown_transformation_is_caught_by_the_probe():
    model = _model("qwen2")
    forward = model.forward

    def scaled(*args, **kwargs):  # logits × 1.5, with no config attribute saying so
        out = forward(*args, **kwargs)
        out.logits = out.logits * 1.5
        return out

    model.forward = scaled
    with pytest.raises(ConfigError, match=r"computes logits other than hidden @ lm_head.weightᵀ"):
        check_linear_head(model, "teacher")
    assert not model.training  # the probe restores the mode


def test_fused_training_refuses_a_softcapped_student(tmp_path):
    from adakd.train import build_trainer, load_config
    from adakd.train.config import DistillConfig

    from ..faults.common import TINY

    config = load_config(TINY, [f"training.output_dir={tmp_path}", "loss.fused=true", "data.synthetic_size=16"])
    assert isinstance(config, DistillConfig)
    config.student.config = {
        "model_type": "gemma2", **SMALL, "vocab_size": 288, "final_logit_softcapping": 30.0,
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"loss.fused: the student \(Gemma2ForCausalLM\) applies final logit"):
        build_trainer(config)


def test_lora_adapters_start_from_the_models_seed_whatever_the_global_rng():
    """Every data-parallel rank (and a single process) must start from the same adapters: FSDP2 shards each rank's
    own copy without a broadcast."""
    from adakd.train.config import LoraSection, ModelSection
    from adakd.train.models import apply_lora

    section = ModelSection(config={"model_type": "qwen2"}, seed=3, lora=LoraSection(r=2, alpha=4, dropout=0.0))
    adapters = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        model = apply_lora(_model("qwen2"), section)
        adapters.append({k: v.detach().clone() for k, v in model.named_parameters() if "lora_A" in k})
    assert adapters[0] and all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
