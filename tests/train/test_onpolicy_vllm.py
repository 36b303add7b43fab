"""``onpolicy.generator: vllm``: GKD steps whose student generations come from a vLLM copy of the student, its
weights pushed from the training student before each generation. Skipped where vllm is not installed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from adakd.train import build_trainer, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GKD = ROOT / "configs" / "tiny-cpu-gkd.yaml"


def test_the_generator_key_is_checked(tmp_path):
    from adakd.train import ConfigError

    with pytest.raises(ConfigError, match=r"onpolicy\.generator: unknown 'sglang'; valid: hf, vllm"):
        load_config(GKD, [f"training.output_dir={tmp_path}", "onpolicy.generator=sglang"])


class _FakeEngine:
    """Stands for the vLLM copy: records each push (a clone of one student weight) and each generation."""

    def __init__(self, eos: int) -> None:
        self.eos, self.events = eos, []

    def push(self, student) -> None:
        self.events.append(("push", student.model.embed_tokens.weight.detach().clone()))

    def close(self) -> None:
        self.events.append(("close", None))

    def generate(self, prompts, *, max_new_tokens, stops, temperature, top_p, vocab_size):
        self.events.append(("generate", (len(prompts), max_new_tokens, stops, temperature, top_p, vocab_size)))
        return [[70 + i % 3, 71, self.eos] for i in range(len(prompts))]


def test_student_generations_come_from_the_engine_after_a_push_each_step(tmp_path):
    config = load_config(
        GKD,
        [
            f"training.output_dir={tmp_path / 'run'}",
            "training.disable_tqdm=true",
            "training.save_strategy=no",
            "training.max_steps=2",
            "training.gradient_accumulation_steps=2",
            "data.synthetic_size=64",
            "training.warmup_steps=0",  # the first step moves the weights
            "onpolicy.lmbda=1",
            "onpolicy.generator=vllm",
            "onpolicy.max_new_tokens=16",
            "onpolicy.top_p=0.9",
        ],
    )
    trainer = build_trainer(config)
    eos = trainer.processing_class.eos_token_id
    fake = trainer.onpolicy.engine = _FakeEngine(eos)
    trained = []
    original = trainer.get_batch_samples

    def record(*args, **kwargs):
        batches, n = original(*args, **kwargs)
        trained.extend(batches)
        return batches, n

    trainer.get_batch_samples = record
    trainer.train()
    kinds = [kind for kind, _ in fake.events]
    assert kinds == ["push", "generate", "generate"] * 2  # one push per step, before its micro-batches' generations
    first, second = fake.events[0][1], fake.events[3][1]
    assert not torch.equal(first, second)  # the second push carries the weights the first step trained
    vocab = len(trainer.processing_class)
    for _, (n, max_new, stops, temperature, top_p, vocab_size) in fake.events[1:3]:
        assert (n, max_new, stops, temperature, top_p, vocab_size) == (8, 16, [eos], 1.0, 0.9, vocab)
    assert len(trained) == 4
    for batch in trained:  # the labels are the engine's tokens
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            ids, labels = ids[: int(mask.sum())], labels[: int(mask.sum())]
            answer = labels[labels != -100].tolist()
            assert answer[1:] == [71, eos] and answer[0] in (70, 71, 72) and ids[-3:].tolist() == answer
    trainer.onpolicy.close()  # what adakd train does once training ends
    assert fake.events[-1][0] == "close" and trainer.onpolicy.engine is None


def _vllm_params(engine) -> dict[str, torch.Tensor]:
    return engine.llm.apply_model(lambda m: {n: p.detach().clone() for n, p in m.named_parameters()})[0]


def _as_vllm(student) -> dict[str, torch.Tensor]:
    """The student's weights under vLLM's names: q/k/v and gate/up fused as vLLM's loader fuses them."""
    out = {"model.embed_tokens.weight": student.model.embed_tokens.weight}
    for i, layer in enumerate(student.model.layers):
        a, m, pre = layer.self_attn, layer.mlp, f"model.layers.{i}."
        out[pre + "self_attn.qkv_proj.weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        out[pre + "self_attn.o_proj.weight"] = a.o_proj.weight
        out[pre + "mlp.gate_up_proj.weight"] = torch.cat([m.gate_proj.weight, m.up_proj.weight])
        out[pre + "mlp.down_proj.weight"] = m.down_proj.weight
    return {k: v.detach() for k, v in out.items()}


@pytest.mark.slow
def test_gkd_with_the_vllm_generator_pushes_the_students_weights_and_trains(tmp_path):
    pytest.importorskip("vllm")
    config = load_config(
        GKD,
        [
            f"training.output_dir={tmp_path / 'run'}",
            "training.logging_steps=1",
            "training.disable_tqdm=true",
            "training.save_strategy=no",
            "training.max_steps=3",
            "data.synthetic_size=32",
            "onpolicy.max_new_tokens=16",
            "onpolicy.lmbda=1",
            "onpolicy.generator=vllm",
            # vLLM's CPU attention takes head sizes of 32 and up: 2 heads of 64
            "student.config.hidden_size=128",
            "student.config.num_attention_heads=2",
            "student.config.num_key_value_heads=1",
        ],
    )
    trainer = build_trainer(config)
    initial = _as_vllm(trainer.model)
    generated = []
    original = trainer.onpolicy._generate
    trainer.onpolicy._generate = lambda model, batch, engine=None: (
        generated.append(engine) or original(model, batch, engine)
    )
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    engine = trainer.onpolicy.engine
    assert engine is not None and len(generated) == 3 and all(e is engine for e in generated)
    # After a push the copy holds the trained student's weights (which training has moved from the initial ones).
    # vLLM's CPU build repacks the linear layers' weights for its kernels and keeps only their packed form: the
    # embedding is compared as a parameter, the rest through the log-probabilities below.
    engine.push(trainer.model)
    copy, trained = _vllm_params(engine), _as_vllm(trainer.model)
    compared = [n for n, t in trained.items() if n in copy and copy[n].numel() > 0]
    assert "model.embed_tokens.weight" in compared, {n: tuple(t.shape) for n, t in copy.items()}
    for name in compared:  # vLLM pads the vocabulary rows to a multiple of 64
        assert torch.equal(copy[name][: len(trained[name])], trained[name]), name
    assert any(not torch.equal(initial[n], trained[n]) for n in trained)
    # The copy answers as the student: the log-probabilities of a prompt's tokens (vLLM's prompt_logprobs).
    from vllm import SamplingParams, TokensPrompt

    ids = list(range(40, 72))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    theirs = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    ours = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(theirs), ours, atol=1e-3, rtol=0)


def test_the_generator_refuses_several_processes_and_lora(monkeypatch):
    import transformers

    from adakd.errors import InputError
    from adakd.generation.vllm_engine import VLLMGenerator

    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1,
    )  # fmt: skip
    student = transformers.Qwen2ForCausalLM(config)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match=r"^onpolicy\.generator: vllm runs in one process, this run has 2; use hf$"):
        VLLMGenerator(student, max_length=32)
    monkeypatch.setenv("WORLD_SIZE", "1")
    student.peft_config = {"default": None}  # what a peft-wrapped student carries
    with pytest.raises(InputError, match=r"^onpolicy\.generator: vllm needs a student without LoRA"):
        VLLMGenerator(student, max_length=32)
