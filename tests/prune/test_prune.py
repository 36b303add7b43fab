"""``adakd prune``: the layer scores against float64 re-derivations, the choices, the pruned model against the
teacher's own layers run by hand, the saved folder (load, tied weights, generation), the CLI's refusals.

Tiny models built from configs: a 6-layer Llama with tied embeddings and a 4-layer Qwen2 with sliding-window layers
(a per-layer ``layer_types`` list), hidden size 32, saved with the byte tokenizer and a ChatML template.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adakd.cli import main  # noqa: E402
from adakd.data.chat import chat_example  # noqa: E402
from adakd.data.examples import byte_tokenizer  # noqa: E402
from adakd.errors import InputError  # noqa: E402
from adakd.prune import (  # noqa: E402
    ScoreSums,
    angular_distance,
    block_influence,
    choose_layers,
    even_layers,
    layer_scores,
    mean_cross_entropy,
    prune_layers,
    token_cosines,
)
from adakd.prune.calibration import batches, read_calibration  # noqa: E402

from ..faults.common import cli, one_line_error  # noqa: E402

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
COMMON = dict(
    vocab_size=260, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, initializer_range=0.2, bos_token_id=256, eos_token_id=256, pad_token_id=256,
)  # fmt: skip
WORDS = "apple river stone cloud green quick music light table tiger paper ocean happy dream forest".split()


def _tokenizer():
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=6, tie_word_embeddings=True, **COMMON)
    return transformers.LlamaForCausalLM(config).eval()


def _qwen2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        num_hidden_layers=4, tie_word_embeddings=False, use_sliding_window=True, sliding_window=8,
        max_window_layers=2, **COMMON,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(config).eval()


def _identity_llama():
    """The 6-layer Llama with layers 2 and 3 made identity blocks: their attention and MLP write nothing."""
    model = _llama(1)
    for i in (2, 3):
        with torch.no_grad():
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("prune")


@pytest.fixture(scope="module")
def llama_dir(root):
    return _save(_llama(), root / "llama")


@pytest.fixture(scope="module")
def identity_dir(root):
    return _save(_identity_llama(), root / "identity")


@pytest.fixture(scope="module")
def calib(root):
    """12 conversations of varied length: the first 8 score, the last 4 measure the CE."""
    rows = []
    for i in range(12):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 5)]
        rows.append({"messages": [{"role": "user", "content": f"Repeat {i}: " + " ".join(words[:2])},
                                  {"role": "assistant", "content": " ".join(words)}]})  # fmt: skip
    path = root / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _batches(path: Path, limit: int = 8, batch_size: int = 3):
    examples = read_calibration(str(path), _tokenizer(), limit=limit, max_length=64)
    return batches(examples, batch_size, 256)


# ------------------------------------------------------------------------------------------------- the scores


def _cos64(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_scores_equal_a_float64_rederivation_with_padding_masked_out():
    torch.manual_seed(0)
    S, H = 5, 8
    sums = ScoreSums()
    tokens = []  # every real token's S states, for the reference
    for B, T in ((2, 6), (3, 4)):
        states = torch.randn(S, B, T, H)
        # Nearly idle layers (BI ~ 1e-4), where float32 cancellation would show.
        states[2] = states[1] + 1e-2 * torch.randn(B, T, H)
        mask = torch.ones(B, T, dtype=torch.int64)
        mask[0, T - 2 :] = 0
        states[:, 0, T - 2 :] = 1e6 * torch.randn(S, 2, H)  # padding: huge, and must not count
        sums.add(states, mask)
        tokens += [states[:, b, t] for b in range(B) for t in range(T) if mask[b, t]]
    influence, distance = sums.means()
    assert sums.tokens == len(tokens) == (2 * 6 - 2) + (3 * 4 - 2)
    for layer in range(S - 1):
        expected = 1 - sum(_cos64(h[layer], h[layer + 1]) for h in tokens) / len(tokens)
        assert influence[layer].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    for i in range(S):
        for j in range(S):
            cosines = [min(1.0, max(-1.0, _cos64(h[i], h[j]))) for h in tokens]
            expected = sum(math.acos(c) for c in cosines) / math.pi / len(tokens)
            assert distance[i, j].item() == pytest.approx(expected, rel=1e-9, abs=1e-7)
    assert influence[1] < 1e-3 < influence[0]


def test_angular_distance_on_known_angles():
    states = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]], [[-3.0, 0.0]], [[1.0, 1.0]]])  # [S=4, N=1, H=2]
    d = angular_distance(token_cosines(states))[0]
    assert d[0, 1].item() == pytest.approx(0.5) and d[0, 2].item() == pytest.approx(1.0)
    assert d[0, 3].item() == pytest.approx(0.25) and d[0, 0].item() == pytest.approx(0.0, abs=1e-7)
    assert block_influence(token_cosines(states))[0].tolist() == pytest.approx([1.0, 1.0, 1 + math.sqrt(0.5)])


def _by_hand_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """h_0 .. h_L of one unpadded sequence, running the teacher's embed and layers one by one."""
    inner = model.model
    T = ids.shape[1]
    positions = torch.arange(T)[None]
    h = inner.embed_tokens(ids)
    rope = inner.rotary_emb(h, position_ids=positions)
    mask = torch.full((T, T), float("-inf"), dtype=h.dtype).triu(1)[None, None]
    states = [h]
    for layer in inner.layers:
        h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=positions)
        h = h[0] if isinstance(h, tuple) else h
        states.append(h)
    return states


def test_layer_scores_read_the_states_entering_each_layer_and_the_final_norm():
    model = _llama().double()
    ids = torch.tensor([[5, 80, 17, 99, 200, 3, 45, 66, 7, 12]])
    with torch.no_grad():
        states = _by_hand_states(model, ids)
    reference = ScoreSums()
    reference.add(torch.stack(states), torch.ones_like(ids))
    influence, distance = reference.means()
    got = layer_scores(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert got["tokens"] == 10 and len(got["block_influence"]) == 6
    # The last layer is scored against its own output before the final norm, not the normed state.
    assert got["block_influence"] == pytest.approx(influence.tolist(), rel=1e-9, abs=1e-12)
    assert torch.tensor(got["angular_distance"], dtype=torch.float64).allclose(distance, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------- the choices


def test_even_keeps_the_first_and_the_last_evenly():
    assert even_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert even_layers(6, 2) == [0, 5] and even_layers(6, 1) == [5] and even_layers(6, 5) == [0, 1, 3, 4, 5]
    for L in range(2, 41):
        for N in range(2, L):
            kept = even_layers(L, N)
            assert kept[0] == 0 and kept[-1] == L - 1 and len(set(kept)) == N and kept == sorted(kept)
            gaps = [b - a for a, b in zip(kept, kept[1:], strict=False)]
            assert max(gaps) - min(gaps) <= 1


def test_importance_keeps_the_largest_influence_and_contiguous_the_closest_block():
    scores = {"block_influence": [0.5, 0.1, 0.3, 0.05, 0.3, 0.9]}
    assert choose_layers("importance", 3, 6, scores) == [0, 2, 5]  # the tie 0.3 / 0.3 goes to the lower index
    distance = torch.full((7, 7), 0.5)
    distance[1, 3] = 0.1  # block [1, 3)
    distance[4, 6] = 0.01  # block [4, 6) would remove the last layer: never chosen
    assert choose_layers("contiguous", 4, 6, {"angular_distance": distance.tolist()}) == [0, 3, 4, 5]
    with pytest.raises(InputError, match="--calibration"):
        choose_layers("importance", 3, 6, None)
    with pytest.raises(InputError, match="--method nope"):
        choose_layers("nope", 3, 6, scores)


def test_identity_layers_are_found_by_both_measures_and_removing_them_changes_nothing(calib):
    model = _identity_llama()
    data = _batches(calib, limit=12)
    scores = layer_scores(model, data)
    ranked = sorted(range(6), key=lambda i: scores["block_influence"][i])
    assert set(ranked[:2]) == {2, 3} and max(scores["block_influence"][2:4]) < 1e-6
    assert min(scores["block_influence"][i] for i in (0, 1, 4, 5)) > 1e-4
    assert choose_layers("importance", 4, 6, scores) == [0, 1, 4, 5]
    assert choose_layers("contiguous", 4, 6, scores) == [0, 1, 4, 5]
    pruned = prune_layers(model, [0, 1, 4, 5])
    with torch.no_grad():
        for batch in data:
            mask = batch["attention_mask"].bool()
            want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            got = pruned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert torch.equal(got[mask], want[mask])
    assert mean_cross_entropy(pruned, data) == mean_cross_entropy(model, data)


# ------------------------------------------------------------------------------------------------- the model


def test_the_pruned_model_keeps_the_teachers_tensors_exactly_and_leaves_the_teacher_alone():
    teacher = _llama()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    keep = [0, 2, 5]
    pruned = prune_layers(teacher, keep)
    assert len(teacher.model.layers) == 6 and teacher.config.num_hidden_layers == 6
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    sd = pruned.state_dict()
    for new, old in enumerate(keep):
        theirs = {k.split(".", 3)[3]: v for k, v in before.items() if k.startswith(f"model.layers.{old}.")}
        ours = {k.split(".", 3)[3]: v for k, v in sd.items() if k.startswith(f"model.layers.{new}.")}
        assert theirs.keys() == ours.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(sd[key], before[key])
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # still tied
    assert pruned.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()  # a copy
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    assert [layer.self_attn.layer_idx for layer in teacher.model.layers] == list(range(6))
    shared = prune_layers(teacher, keep, share_weights=True)
    assert shared.model.layers[1].mlp.up_proj.weight is teacher.model.layers[2].mlp.up_proj.weight


def test_the_saved_folder_loads_ties_and_equals_the_teachers_layers_run_by_hand(llama_dir, calib, tmp_path, capsys):
    out = tmp_path / "student"
    held = ["--calibration", str(calib), "--calibration-examples", "8", "--eval-examples", "4"]
    assert main(["prune", str(llama_dir), "--keep", "0,2,5", *held, "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "3 of 6 layers kept (0,2,5)" in printed and "CE" in printed
    student = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert student.config.num_hidden_layers == 3 and student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHATML and "<|im_end|>" in tok.all_special_tokens

    teacher = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).double().eval()
    ids = torch.tensor([[5, 80, 17, 99, 200, 3, 45, 66, 7, 12, 257, 258]])
    with torch.no_grad():
        inner = teacher.model
        positions = torch.arange(ids.shape[1])[None]
        h = inner.embed_tokens(ids)
        rope = inner.rotary_emb(h, position_ids=positions)
        mask = torch.full((ids.shape[1],) * 2, float("-inf"), dtype=h.dtype).triu(1)[None, None]
        for i in (0, 2, 5):
            h = inner.layers[i](h, attention_mask=mask, position_embeddings=rope, position_ids=positions)
            h = h[0] if isinstance(h, tuple) else h
        reference = teacher.lm_head(inner.norm(h))
        got = student.double()(input_ids=ids).logits
    assert torch.allclose(got, reference, rtol=0, atol=1e-10)

    record = json.loads((out / "prune.json").read_text())
    assert record["kept"] == [0, 2, 5] and record["removed"] == [1, 3, 4] and record["method"] == "keep"
    assert len(record["scores"]["block_influence"]) == 6 and record["teacher"] == str(llama_dir)
    # The CE is measured on the held-out records 8..11: the teacher's, recomputed record by record, unbatched.
    held_out = read_calibration(str(calib), _tokenizer(), limit=12, max_length=256)[8:]
    total = count = 0.0
    with torch.no_grad():
        for ex in held_out:
            ids = torch.tensor([ex["input_ids"]])
            logits = teacher(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert record["ce"]["teacher"]["tokens"] == count
    assert record["ce"]["teacher"]["ce"] == pytest.approx(total / count, rel=1e-5)


def test_generation_with_the_kv_cache_equals_greedy_decoding_without_it(llama_dir, tmp_path):
    out = tmp_path / "gen"
    assert main(["prune", str(llama_dir), "--method", "even", "--layers", "3", "--output", str(out), "--quiet"]) == 0
    student = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert json.loads((out / "prune.json").read_text())["kept"] == [0, 3, 5]  # 2.5 rounds up
    prompt = torch.tensor([[5, 80, 17, 99]])
    with torch.no_grad():
        cached = student.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=256)
        ids = prompt
        for _ in range(12):  # the reference: a full forward per token, no cache
            ids = torch.cat([ids, student(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert cached.shape == (1, 16) and torch.equal(cached, ids)


def test_per_layer_config_lists_are_cut_to_the_kept_layers(root, tmp_path):
    teacher = _qwen2()
    assert teacher.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    pruned = prune_layers(teacher, [1, 2])
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
    assert pruned.config.max_window_layers == 1
    pruned.save_pretrained(tmp_path / "q")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert loaded.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.sliding_window for layer in loaded.model.layers] == [None, 8]
    assert not loaded.config.tie_word_embeddings and torch.equal(loaded.lm_head.weight, teacher.lm_head.weight)
    ids = torch.randint(0, 256, (1, 20))  # longer than the window: the sliding layer's mask matters
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, pruned(input_ids=ids).logits)
        cached = loaded.generate(ids[:, :4], max_new_tokens=16, do_sample=False, pad_token_id=256)
        greedy = ids[:, :4]
        for _ in range(16):  # past the window: the sliding layer's cache must drop what its mask drops
            greedy = torch.cat([greedy, loaded(input_ids=greedy, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert cached.shape == (1, 20) and torch.equal(cached, greedy)


def test_compare_prints_every_method_and_saves_the_chosen_one(identity_dir, calib, tmp_path, capsys):
    out = tmp_path / "cmp"
    held = ["--calibration", str(calib), "--calibration-examples", "8", "--eval-examples", "4"]
    argv = ["prune", str(identity_dir), "--layers", "4", "--method", "contiguous", "--compare", *held,
            "--output", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| method | kept layers | CE | response CE |" in printed
    for row in ("| importance | 0,1,4,5 |", "| contiguous | 0,1,4,5 |", "| even | 0,2,3,5 |"):
        assert row in printed
    record = json.loads((out / "prune.json").read_text())
    assert record["method"] == "contiguous" and record["kept"] == [0, 1, 4, 5]
    assert [row["method"] for row in record["compare"]] == ["contiguous", "importance", "even"]
    assert record["scores"]["contiguous_block"]["start"] == 2
    # Removing two identity blocks changes no logit: the same CE as the teacher's.
    assert record["ce"]["pruned"]["ce"] == pytest.approx(record["ce"]["teacher"]["ce"], rel=1e-6)
    # even drops real layers: another CE
    assert record["compare"][2]["ce"] != pytest.approx(record["ce"]["teacher"]["ce"], rel=1e-3)


def test_calibration_reads_minillm_records_and_messages_as_training_does(calib, tmp_path):
    tok = _tokenizer()
    examples = read_calibration(str(calib), tok, limit=3, max_length=20)
    first = json.loads(calib.read_text().splitlines()[0])["messages"]
    ids, labels = chat_example(first, tok, CHATML)
    assert examples[0] == {"input_ids": ids[:20], "labels": labels[:20]} and len(examples) == 3
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"prompt": "Q: hi\nA:", "output": [" hello", "hey"]}) + "\n")
    (ex,) = read_calibration(str(path), tok, limit=5, max_length=64)
    assert tok.decode(ex["input_ids"]) == "Q: hi\nA: hello<|endoftext|>"
    assert ex["labels"][: len("Q: hi\nA:")] == [-100] * len("Q: hi\nA:")


# ------------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def gpt2_dir(root):
    config = transformers.GPT2Config(vocab_size=260, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return _save(transformers.GPT2LMHeadModel(config), root / "gpt2")


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--layers", "0"], "--layers 0: must be at least 1"),
        (["--layers", "6", "--method", "even"], "--layers 6: must be below the teacher's 6 layers"),
        (["--layers", "3", "--method", "random"], "--method random: unknown; valid: importance, contiguous, even"),
        (["--keep", "0,2", "--layers", "3"], "--keep 0,2: 2 layers, but --layers 3"),
        (["--keep", "0,6"], "--keep 0,6: index 6 is out of range"),
        (["--keep", "1,1"], "--keep 1,1: layer 1 is named twice"),
        (["--keep", "1,x"], "--keep 1,x: expected comma-separated layer indices"),
        (["--keep", "0,1,2,3,4,5"], "--keep 0,1,2,3,4,5: keeps all 6 layers"),
        (["--keep", "1", "--method", "even"], "--keep and --method even"),
        (["--layers", "3"], "--method importance measures the layers on data: give --calibration FILE"),
        (["--layers", "3", "--method", "contiguous"], "--method contiguous measures the layers on data"),
        (["--layers", "3", "--method", "even", "--compare"], "--compare measures the layers on data"),
        (["--layers", "3", "--calibration", "MISSING"], "--calibration MISSING: no such file"),
        (["--layers", "3", "--calibration", "BAD"], "BAD:2: invalid JSON"),
        (["--layers", "3", "--calibration", "CALIB", "--calibration-examples", "12"], "none left after"),
        (["--layers", "3", "--dtype", "float8"], "--dtype float8: unknown"),
    ],
)
def test_refusals_are_one_line_naming_the_flag(llama_dir, calib, tmp_path, capsys, extra, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(calib.read_text().splitlines()[0] + "\n{not json\n")
    names = {"MISSING": str(tmp_path / "gone.jsonl"), "BAD": str(bad), "CALIB": str(calib)}
    extra = [names.get(a, a) for a in extra]
    expected = expected.replace("BAD", str(bad)).replace("MISSING", names["MISSING"])
    line = one_line_error(*cli(capsys, "prune", str(llama_dir), *extra, "--output", str(tmp_path / "o"), "--quiet"))
    assert expected in line
    assert not (tmp_path / "o").exists()


def test_other_architectures_are_refused_naming_teacher_and_architecture(gpt2_dir, tmp_path, capsys):
    line = one_line_error(
        *cli(capsys, "prune", str(gpt2_dir), "--layers", "1", "--method", "even", "--output", str(tmp_path / "o"))
    )
    assert f"TEACHER {gpt2_dir}: cannot prune a GPT2LMHeadModel" in line and not (tmp_path / "o").exists()
    line = one_line_error(*cli(capsys, "prune", str(tmp_path / "nowhere"), "--layers", "1", "--method", "even",
                               "--output", str(tmp_path / "o")))  # fmt: skip
    assert f"TEACHER {tmp_path / 'nowhere'}" in line


def test_an_existing_output_is_refused_untouched_and_replaced_only_with_overwrite(llama_dir, calib, tmp_path, capsys):
    out = tmp_path / "student"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    base = ["prune", str(llama_dir), "--keep", "0,5", "--output", str(out), "--quiet"]
    line = one_line_error(*cli(capsys, *base))
    assert f"--output {out}: exists; pass --overwrite" in line and (out / "mine.txt").read_text() == "keep me"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": 3}\n')
    line = one_line_error(*cli(capsys, *base, "--overwrite", "--calibration", str(bad)))
    assert f"{bad}:1" in line and (out / "mine.txt").read_text() == "keep me"  # refused before anything was written
    assert main([*base, "--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and (out / "prune.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    (tmp_path / "file").write_text("x")
    line = one_line_error(*cli(capsys, "prune", str(llama_dir), "--keep", "0", "--output", str(tmp_path / "file"),
                               "--overwrite"))  # fmt: skip
    assert "exists and is not a folder" in line
