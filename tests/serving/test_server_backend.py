"""``adakd eval --backend vllm-server`` against a fake OpenAI-compatible server: what the requests carry (the token
ids of the cut prompts, the protocol's sampling parameters, per-prompt seeds, stop ids, per-prompt lengths), the texts
decoded as HFBackend decodes them, and the one-line refusals."""

from __future__ import annotations

import json

import pytest

from adakd.data import format_prompt

from .fake_completions import FakeCompletions

EOS = 256  # the byte tokenizer's <|endoftext|>


def _bytes(text: str) -> list[int]:
    """The byte tokenizer's ids, by definition (an independent reference for the encoding)."""
    return list(text.encode("utf-8"))


def _answer_text(prompt: list[int]) -> str:
    return f" answer {len(prompt)} café "


def _answer(prompt: list[int], body: dict) -> list[int]:
    """Text, then the eos, then more: a server that did not stop at the eos would return the rest."""
    return _bytes(_answer_text(prompt)) + [EOS] + _bytes(" never")


@pytest.fixture()
def server():
    fake = FakeCompletions(_answer, models=("tiny",), tokenize=_bytes)
    yield fake
    fake.close()


@pytest.fixture()
def data(tmp_path):
    folder = tmp_path / "data"
    (folder / "dolly").mkdir(parents=True)
    prompts = [format_prompt(f"Say {'x' * (7 * i)} {i}.") for i in range(5)]
    with open(folder / "dolly" / "valid.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p, "output": "answer"}) + "\n")
    return folder, prompts


def _run(server_url, data, tmp_path, *extra, model="byte"):
    from adakd.cli import main

    folder, _ = data
    out = tmp_path / "r.json"
    argv = [
        "eval", "--backend", "vllm-server", "--server-url", server_url, "--model", model, "--data-dir", str(folder),
        "--datasets", "dolly", "--seeds", "10,20", "--batch-size", "2", "--max-length", "200",
        "--max-prompt-length", "160", "--output", str(out), "--quiet", *extra,
    ]  # fmt: skip
    return main(argv), out


def _predictions(out, seed):
    path = out.with_name(out.stem + ".predictions") / f"dolly.seed{seed}.jsonl"
    return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]


def test_sampling_requests_carry_the_protocol_and_texts_decode_as_hf(server, data, tmp_path):
    rc, out = _run(server.url, data, tmp_path)
    assert rc == 0
    _, prompts = data
    cut = [_bytes(p)[-160:] for p in prompts]  # the last --max-prompt-length tokens
    assert any(len(_bytes(p)) > 160 for p in prompts) and any(len(_bytes(p)) <= 160 for p in prompts)
    bodies = server.completions()
    assert len(bodies) == 2 * len(prompts)  # sampled: one request per prompt (its own seed)
    by_seed = {(b["seed"], tuple(b["prompt"][0])): b for b in bodies}
    for seed in (10, 20):
        for i, ids in enumerate(cut):
            body = by_seed[(seed + i, tuple(ids))]  # prompt i samples with seed + i
            assert len(body["prompt"]) == 1
            assert body["max_tokens"] == 200 - len(ids)
            assert (body["temperature"], body["top_p"], body["top_k"]) == (1.0, 1.0, -1)
            assert body["stop_token_ids"] == [EOS] and body["ignore_eos"] is True
            assert body["return_token_ids"] is True and body["model"] == "tiny"
        # The eos is dropped, the rest never seen, the text stripped: HFBackend's decoding.
        assert _predictions(out, seed) == [_answer_text(ids).strip() for ids in cut]
    results = json.loads(out.read_text())
    kept = sum(len(_bytes(_answer_text(ids).strip())) + 2 for ids in cut) * 2  # + the two spaces stripped
    assert results["generation"]["answer_tokens"] == kept
    assert results["generation"]["generated_tokens"] == kept + 2 * len(cut)  # + each answer's eos
    assert results["generation"]["backend"] == "vllm-server"
    assert results["generation"]["server"]["url"] == server.url and results["generation"]["server"]["model"] == "tiny"


def test_greedy_batches_share_a_request_and_each_answer_keeps_its_own_room(data, tmp_path):
    fake = FakeCompletions(lambda prompt, body: _bytes("y" * 500))  # never stops
    try:
        rc, out = _run(fake.url, data, tmp_path, "--greedy", "--top-k", "5", "--temperature", "0.5")
    finally:
        fake.close()
    assert rc == 0
    _, prompts = data
    cut = [_bytes(p)[-160:] for p in prompts]
    bodies = fake.completions()
    assert [len(b["prompt"]) for b in bodies] == [2, 2, 1] * 2  # --batch-size 2, two seeds
    assert all((b["temperature"], b["top_p"], b["top_k"]) == (0.0, 1.0, -1) and "seed" not in b for b in bodies)
    assert bodies[0]["max_tokens"] == 200 - min(len(cut[0]), len(cut[1]))
    # Each answer is cut to its own prompt's room: prompt + answer <= --max-length.
    assert _predictions(out, 10) == ["y" * (200 - len(ids)) for ids in cut]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_refusals_are_one_line_naming_the_flag(server, data, tmp_path, capsys):
    assert _run(server.url, data, tmp_path, "--server-model", "nope")[0] == 2
    line = _error(capsys)
    assert "--server-model" in line and "'nope'" in line and "served: tiny" in line and server.url in line
    assert _run(server.url, data, tmp_path, "--max-length", "2000", "--max-prompt-length", "160")[0] == 2
    line = _error(capsys)
    assert "--max-length 2000" in line and "max_model_len 1024" in line
    from adakd.cli import main

    folder, _ = data
    base = ["eval", "--backend", "vllm-server", "--model", "byte", "--data-dir", str(folder), "--output"]
    assert main([*base, str(tmp_path / "x.json"), "--datasets", "dolly", "--quiet"]) == 2
    assert "--server-url" in _error(capsys)


def test_a_tokenizer_other_than_the_served_models_is_refused(data, tmp_path, capsys):
    fake = FakeCompletions(_answer, tokenize=lambda text: [t + 1 for t in _bytes(text)])
    try:
        assert _run(fake.url, data, tmp_path)[0] == 2
    finally:
        fake.close()
    line = _error(capsys)
    assert line.count("\n") == 0 and "--model" in line and "differ" in line and "'tiny'" in line


def test_several_served_models_need_a_name(data, tmp_path, capsys):
    fake = FakeCompletions(_answer, models=("a", "b"))
    try:
        assert _run(fake.url, data, tmp_path)[0] == 2
        line = _error(capsys)
        assert "--server-model" in line and "2 models (a, b)" in line
        assert _run(fake.url, data, tmp_path, "--server-model", "b")[0] == 0
    finally:
        fake.close()
    assert {b["model"] for b in fake.completions()} == {"b"}


def test_unreachable_server_and_a_refused_request(server):
    from adakd.errors import InputError, ServerError
    from adakd.serving.completions import CompletionsClient, Sampling
    from adakd.serving.http import Endpoint

    closed = FakeCompletions(_answer)
    closed.close()  # nothing listens on its port now
    waits = []
    with pytest.raises(ServerError) as e:
        CompletionsClient(Endpoint(closed.url, retries=2, key="--server-url", sleep=waits.append))
    assert f"--server-url {closed.url}: no answer to /v1/models after 3 tries" in str(e.value)
    assert "\n" not in str(e.value) and waits == [1.0, 2.0]
    client = CompletionsClient(Endpoint(server.url, key="--server-url"), "tiny")
    client.model = "gone"  # the server stopped serving it between the check and the request
    with pytest.raises(InputError, match=r"^--server-url .*refused the completion request: The model `gone`"):
        client.complete([[1, 2]], [4], Sampling())


def test_the_vllm_backend_without_vllm_is_one_line(data, tmp_path, capsys, monkeypatch):
    import sys

    from adakd.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    folder, _ = data
    argv = ["eval", "--backend", "vllm", "--model", "byte", "--data-dir", str(folder), "--datasets", "dolly"]
    assert main([*argv, "--output", str(tmp_path / "r.json"), "--quiet"]) == 2
    assert _error(capsys) == "adakd: error: --backend vllm: vllm is not installed (pip install vllm)"
