"""The server teacher (adakd.serving.teacher) against the fake vLLM server: its rows equal the top-k of the same
model's own logits, every mismatch found before the first step is one ConfigError line naming its key, and the
transport's retries hold."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from adakd.errors import ConfigError, ServerError  # noqa: E402
from adakd.serving.http import Endpoint  # noqa: E402
from adakd.serving.teacher import TeacherServer  # noqa: E402
from adakd.sparse import sparse_from_logits  # noqa: E402

from .fake_vllm import FakeVLLM  # noqa: E402

ROWS = 288  # the model's lm_head rows (the byte tokenizer has 257 tokens; the rest are padding rows)


def tiny_model(vocab: int = ROWS, seed: int = 1) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def byte_tokenizer():
    from adakd.data import tokenizer_for

    return tokenizer_for("byte")


@pytest.fixture(scope="module")
def served():
    model, tokenizer = tiny_model(), byte_tokenizer()
    with FakeVLLM(model, tokenizer, max_logprobs=1000) as server:
        yield server, model, tokenizer


def _endpoint(server: FakeVLLM, **kw) -> Endpoint:
    return Endpoint(server.url, key="teacher.server.url", **{"timeout": 10, "retries": 0, **kw})


def _batch(lengths: list[int], prompts: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch (pad id 256): example b has lengths[b] tokens, the first prompts[b] unsupervised."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 256)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100)
    for b, (n, p) in enumerate(zip(lengths, prompts, strict=True)):
        ids[b, :n] = torch.randint(0, 256, (n,), generator=g)
        mask[b, :n] = 1
        labels[b, p:n] = ids[b, p:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(model, batch, k):
    """sparse_from_logits of the model's own logits (the whole padded batch in one forward) at the supervised
    positions: what the cache stores."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return sparse_from_logits(logits[batch["labels"][:, 1:] != -100], k)


@pytest.mark.parametrize("k", [1, 8, 400], ids=["k1", "k8", "k-above-vocab"])
def test_rows_equal_the_top_k_of_the_models_own_logits(served, k):
    server, model, tokenizer = served
    teacher = TeacherServer(_endpoint(server), "teacher", k, vocab_rows=ROWS)
    # ragged, one example without any supervised token, one supervised from its second token
    batch = _batch([17, 9, 12, 5], [6, 9, 1, 2])
    before = server.requests
    got = teacher.rows(**batch)
    assert server.requests == before + 1  # one request for the whole batch
    want = _reference(model, batch, k)
    assert got.ids.shape == want.ids.shape == (int((batch["labels"][:, 1:] != -100).sum()), min(k, ROWS))
    assert got.ids.dtype == torch.int64 and got.logprobs.dtype == torch.float32 and got.tail.dtype == torch.float32
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-6)
    if k >= ROWS:
        assert torch.isneginf(got.tail).all()
    else:
        torch.testing.assert_close(got.tail, want.tail, rtol=1e-4, atol=1e-5)


def test_a_batch_without_supervised_tokens_sends_nothing(served):
    server, _, _ = served
    teacher = TeacherServer(_endpoint(server), "teacher", 4, vocab_rows=ROWS)
    batch = _batch([5, 3], [5, 3])
    before = server.requests
    got = teacher.rows(**batch)
    assert server.requests == before and got.ids.shape == (0, 4) and got.tail.shape == (0,)


def test_only_the_tokens_up_to_the_last_label_are_sent(served, monkeypatch):
    server, _, _ = served
    teacher = TeacherServer(_endpoint(server), "teacher", 2, vocab_rows=ROWS)
    batch = _batch([10, 8], [2, 3])
    batch["labels"][0, 7:] = -100  # example 0 supervised through token 6 only
    sent = []
    post = teacher.endpoint.post
    monkeypatch.setattr(teacher.endpoint, "post", lambda path, body: sent.append(body) or post(path, body))
    teacher.rows(**batch)
    (body,) = sent
    assert body["prompt"] == [batch["input_ids"][0, :7].tolist(), batch["input_ids"][1, :8].tolist()]
    assert body["max_tokens"] == 1 and body["prompt_logprobs"] == 2 and body["temperature"] == 0


def test_an_id_beyond_the_students_vocabulary_is_one_server_error(served):
    server, _, _ = served
    teacher = TeacherServer(_endpoint(server), "teacher", 400, vocab_rows=270)  # the padding rows come back
    with pytest.raises(ServerError, match=r"teacher.server .*: token id 2\d\d at prompt position \d+ is outside"):
        teacher.rows(**_batch([6], [1]))


def test_fewer_entries_than_k_is_one_server_error(served):
    server, _, _ = served
    teacher = TeacherServer(_endpoint(server), "teacher", 4, vocab_rows=ROWS)
    reply = {"choices": [{"index": 0, "prompt_logprobs": [None, {"5": {"logprob": -0.1, "rank": 1}}]}]}
    teacher._ask = lambda prompts: reply
    with pytest.raises(ServerError, match="1 log-probabilities at prompt position 1, need top_k 4"):
        teacher.rows(**_batch([2], [1]))


# ---------------------------------------------------------------------------------------------------------------
def test_check_passes_and_reports_the_server(served):
    server, _, tokenizer = served
    info = TeacherServer(_endpoint(server), "teacher", 8).check(tokenizer, ROWS)
    assert info == {"max_model_len": 2048, "version": "0.32.0-fake"}


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_a_wrong_model_name_names_the_served_ones(served):
    server, _, tokenizer = served
    with pytest.raises(ConfigError) as e:
        TeacherServer(_endpoint(server), "nope", 8).check(tokenizer, ROWS)
    assert e.value.key == "teacher.server.model"
    assert "serves teacher, not 'nope'" in _one_line(e.value)


def test_another_tokenizer_is_refused_naming_the_probe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from adakd.data.examples import _bytes_to_unicode

    # The byte tokenizer plus one merge ("l" + "l"): the same alphabet, other ids for "Hello"
    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    vocab["ll"] = 256
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("l", "l")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    other = PreTrainedTokenizerFast(tokenizer_object=core)
    with FakeVLLM(tiny_model(), other) as server, pytest.raises(ConfigError) as e:
        TeacherServer(_endpoint(server), "teacher", 8).check(byte_tokenizer(), ROWS)
    assert e.value.key == "teacher.server.model"
    assert "tokenizes 'Hello world, this is a test.' as [72, 101, 256, 111" in _one_line(e.value)
    assert "the student's tokenizer as [72, 101, 108, 108, 111" in str(e.value)


def test_a_smaller_vocabulary_is_refused():
    with FakeVLLM(tiny_model(vocab=200), byte_tokenizer()) as server, pytest.raises(ConfigError) as e:
        TeacherServer(_endpoint(server), "teacher", 8).check(byte_tokenizer(), ROWS)
    assert e.value.key == "teacher.server.model"
    assert "Token id 256 is out of vocabulary" in _one_line(e.value)


def test_a_top_k_above_max_logprobs_is_refused():
    with FakeVLLM(tiny_model(), byte_tokenizer(), max_logprobs=20) as server, pytest.raises(ConfigError) as e:
        TeacherServer(_endpoint(server), "teacher", 32).check(byte_tokenizer(), ROWS)
    assert e.value.key == "teacher.server.top_k"
    assert "start vLLM with --max-logprobs 32 or lower teacher.server.top_k" in _one_line(e.value)


def test_the_api_key_is_sent_and_its_absence_is_one_line():
    with FakeVLLM(tiny_model(), byte_tokenizer(), api_key="sesame") as server:
        info = TeacherServer(_endpoint(server, api_key="sesame"), "teacher", 4).check(byte_tokenizer(), ROWS)
        assert info["version"] == "0.32.0-fake"
        with pytest.raises(ConfigError) as e:
            TeacherServer(_endpoint(server), "teacher", 4).check(byte_tokenizer(), ROWS)
        wrong = TeacherServer(_endpoint(server, api_key="open"), "teacher", 4)
        with pytest.raises(ConfigError, match="HTTP 401"):
            wrong.check(byte_tokenizer(), ROWS)
    assert e.value.key == "teacher.server.api_key_env"
    assert "(HTTP 401: Unauthorized): set teacher.server.api_key_env" in _one_line(e.value)


# ---------------------------------------------------------------------------------------------------------------
def test_retries_then_success_with_doubling_backoff(served):
    server, model, _ = served
    waits = []
    teacher = TeacherServer(_endpoint(server, retries=3, backoff=0.5, sleep=waits.append), "teacher", 4, ROWS)
    batch = _batch([7], [2])
    server.fail_next(2)
    got = teacher.rows(**batch)
    assert waits == [0.5, 1.0]
    assert torch.equal(got.ids, _reference(model, batch, 4).ids)


def test_a_slow_server_is_one_server_error_after_the_retries(served):
    server, _, _ = served
    waits = []
    teacher = TeacherServer(_endpoint(server, timeout=0.2, retries=2, sleep=waits.append), "teacher", 4, ROWS)
    server.delay = 0.5
    try:
        with pytest.raises(ServerError) as e:
            teacher.rows(**_batch([4], [1]))
    finally:
        server.delay = 0.0
    assert waits == [1.0, 2.0]
    assert "teacher.server.url" in _one_line(e.value) and "after 3 tries" in str(e.value)
    assert "(last: timed out)" in str(e.value)
