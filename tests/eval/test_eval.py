"""ROUGE-L against rouge_score and by hand, the evaluation sets, and `adakd eval` end to end on a tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adakd
from adakd.eval.rouge import lcs_length, tokenize

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
SHARED = Path(os.environ.get("ADAKD_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
EVAL_DIR = SHARED / "minillm-eval"


def _reference(prediction: str, references: list[str]) -> float:
    """MiniLLM's metric with rouge_score itself: max over references of the RougeL F-measure, × 100."""
    return 100 * max(SCORER.score(target=r, prediction=prediction)["rougeL"].fmeasure for r in references)


def test_hand_computed_cases():
    # "the cat sat on the mat" vs "the cat is on the mat": LCS "the cat on the mat" = 5 of 6 and 6 tokens.
    assert adakd.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(100 * 5 / 6)
    # Case, punctuation and the stemmer: "Running!" and "runs" both stem to "run".
    assert adakd.rouge_l("Running!", "runs") == pytest.approx(100.0)
    # Several references: the best counts.
    assert adakd.rouge_l("a b c", ["x y z", "a b c d"]) == pytest.approx(100 * 2 * (1 * 0.75) / 1.75)
    # Empty prediction, empty reference, no overlap.
    assert adakd.rouge_l("", ["anything"]) == 0.0
    assert adakd.rouge_l("something", "") == 0.0
    assert adakd.rouge_l("...", "!!!") == 0.0
    assert adakd.rouge_l("alpha", "beta") == 0.0


_words = st.lists(st.sampled_from(["the", "cat", "cats", "sat", "running", "runs", "on", "mat", "A", "b", "x!"]))


@settings(max_examples=300, deadline=None)
@given(_words, st.lists(_words, min_size=1, max_size=4))
def test_matches_rouge_score(pred_words, refs_words):
    prediction = " ".join(pred_words)
    references = [" ".join(w) for w in refs_words]
    assert adakd.rouge_l(prediction, references) == pytest.approx(_reference(prediction, references), abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=40), st.lists(st.integers(0, 5), max_size=40))
def test_bit_parallel_lcs_matches_the_table(a, b):
    from rouge_score.rouge_scorer import _lcs_table

    a, b = [str(x) for x in a], [str(x) for x in b]
    want = _lcs_table(a, b)[-1][-1] if a and b else 0
    assert lcs_length(a, b) == want


def test_tokenizer_is_rouge_scores():
    from nltk.stem import porter
    from rouge_score import tokenize as rouge_tokenize

    text = "Distillation's teachers RUNNING, e-mail 42x: généralisation!"
    assert list(tokenize(text)) == rouge_tokenize.tokenize(text, porter.PorterStemmer())


def _shared_sets():
    if not EVAL_DIR.is_dir():
        pytest.skip(f"shared evaluation data not found at {EVAL_DIR} (set ADAKD_SHARED_DATA)")
    from adakd.eval.sets import load_eval_set, resolve_eval_sets

    paths = resolve_eval_sets(EVAL_DIR, ["dolly", "self-inst", "vicuna", "sinst", "uinst"])
    return paths, [load_eval_set(n, p) for n, p in paths.items()]


def test_shared_sets_and_full_parity_with_rouge_score():
    paths, sets = _shared_sets()
    assert paths["uinst"].parent.name == "uinst-subset1050"  # the fallback when uinst/11_ is absent
    assert [len(s.records) for s in sets] == [500, 242, 80, 1694, 1050]
    assert max(len(r.references) for r in sets[3].records) > 1  # S-NI: several references
    # Every example, scored with the next example's first reference as the "prediction": identical to rouge_score.
    records = [r for s in sets for r in s.records]
    for i in range(0, len(records), 7):
        prediction = records[(i + 1) % len(records)].references[0]
        assert adakd.rouge_l(prediction, list(records[i].references)) == pytest.approx(
            _reference(prediction, list(records[i].references)), abs=1e-9
        )


def test_set_resolution_errors(tmp_path):
    from adakd.eval.sets import resolve_eval_sets

    with pytest.raises(ValueError, match="unknown set 'dolly2'"):
        resolve_eval_sets(tmp_path, ["dolly2"])
    with pytest.raises(ValueError, match="dolly/valid.jsonl"):
        resolve_eval_sets(tmp_path, ["dolly"])
    with pytest.raises(ValueError, match="does not exist"):
        resolve_eval_sets(None, [f"mine={tmp_path / 'x.jsonl'}"])
    (tmp_path / "mine.jsonl").write_text('{"prompt": "p", "output": "o"}\n')
    assert resolve_eval_sets(None, [f"mine={tmp_path / 'mine.jsonl'}"])["mine"] == tmp_path / "mine.jsonl"


# --------------------------------------------------------------------------------------------------------------
# adakd eval end to end
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from adakd.data import format_prompt, tokenizer_for

    folder = tmp_path_factory.mktemp("tiny-model")
    config = transformers.Qwen2Config(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer_for("byte").save_pretrained(folder)
    data = tmp_path_factory.mktemp("eval-data")
    for name, rel in (("dolly", "dolly"), ("vicuna", "vicuna"), ("uinst", "uinst-subset1050")):
        (data / rel).mkdir(parents=True)
        with open(data / rel / "valid.jsonl", "w") as f:
            for i in range(5):
                prompt = format_prompt(f"Say {name} {i}.")
                output = [f"{name} {i}", f"{name} number {i}"] if name == "uinst" else f"{name} {i}"
                f.write(json.dumps({"prompt": prompt, "output": output}) + "\n")
    return folder, data


def _eval(tiny_model, tmp_path, name, *extra):
    from adakd.cli import main

    folder, data = tiny_model
    out = tmp_path / f"{name}.json"
    argv = [
        "eval", "--model", str(folder), "--data-dir", str(data), "--datasets", "dolly,vicuna,uinst",
        "--seeds", "1,2", "--limit", "4", "--batch-size", "3", "--max-length", "220", "--max-prompt-length", "200",
        "--output", str(out), "--quiet", "--device", "cpu", *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.read_text()), out


def test_adakd_eval_end_to_end_and_deterministic(tiny_model, tmp_path, capsys):
    results, out = _eval(tiny_model, tmp_path, "a")
    assert set(results["datasets"]) == {"dolly", "vicuna", "uinst"}
    for d in results["datasets"].values():
        assert d["n"] == 4 and set(d["rougeL"]["per_seed"]) == {"1", "2"}
        values = list(d["rougeL"]["per_seed"].values())
        assert d["rougeL"]["mean"] == pytest.approx(sum(values) / 2)
    assert results["datasets"]["uinst"]["path"].endswith("uinst-subset1050/valid.jsonl")
    assert results["generation"]["tokens_per_second"] > 0
    assert results["generation"]["backend"] == "hf" and "server" not in results["generation"]
    printed = capsys.readouterr()
    assert "| average |" in printed.out and "tokens/s" in printed.err
    pred = out.with_name("a.predictions") / "dolly.seed1.jsonl"
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert len(rows) == 4 and {"prompt", "prediction", "references", "rougeL"} <= set(rows[0])
    for row in rows:
        assert row["rougeL"] == pytest.approx(adakd.rouge_l(row["prediction"], row["references"]))
    # The same seed gives the same predictions; another seed gives others.
    again, out_b = _eval(tiny_model, tmp_path, "b")
    pred_b = out_b.with_name("b.predictions") / "dolly.seed1.jsonl"
    assert pred.read_text() == pred_b.read_text()
    seed2 = (out.with_name("a.predictions") / "dolly.seed2.jsonl").read_text()
    assert seed2 != pred.read_text()
    assert again["datasets"] == results["datasets"] or all(
        again["datasets"][k]["rougeL"]["per_seed"] == results["datasets"][k]["rougeL"]["per_seed"]
        for k in again["datasets"]
    )


def test_adakd_eval_greedy_ignores_the_seed(tiny_model, tmp_path):
    _, out = _eval(tiny_model, tmp_path, "g", "--greedy")
    folder = out.with_name("g.predictions")
    assert (folder / "vicuna.seed1.jsonl").read_text().replace('"rougeL"', "") == (
        folder / "vicuna.seed2.jsonl"
    ).read_text().replace('"rougeL"', "")


def test_adakd_eval_errors(tiny_model, tmp_path, capsys):
    from adakd.cli import main

    folder, data = tiny_model
    base = ["eval", "--model", str(folder), "--output", str(tmp_path / "r.json"), "--quiet"]
    assert main([*base, "--data-dir", str(data), "--datasets", "sinst"]) == 2
    assert "sinst/11_/valid.jsonl" in capsys.readouterr().err
    assert main([*base, "--data-dir", str(data), "--datasets", "dolly", "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert main([*base[:2], str(tmp_path / "nope"), *base[3:], "--data-dir", str(data), "--datasets", "dolly"]) == 2
    assert "nope" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# adakd eval --chat-template
# --------------------------------------------------------------------------------------------------------------

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Records as in the MiniLLM files (instruction, input, prompt, output), and one with only its prompt.
CHAT_ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "red"},
    {"instruction": "When did it start?", "input": "It started in 2000.\n\nThen it grew.", "output": "2000"},
    {"instruction": "Say hi.", "output": "hi"},  # no input key (vicuna)
]


def _chat_rows():
    from adakd.data import format_prompt

    rows = [{**r, "prompt": format_prompt(r["instruction"], r.get("input"))} for r in CHAT_ROWS]
    # Only a prompt: instruction and input are read back out of the Alpaca template.
    rows.append({"prompt": format_prompt("Add 2 and 3.", "Use digits."), "output": "5"})
    users = [r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "") for r in CHAT_ROWS]
    return rows, [*users, "Add 2 and 3.\n\nUse digits."]


@pytest.fixture(scope="module")
def chat_model(tiny_model, tmp_path_factory):
    """The tiny model with a ChatML tokenizer: the byte tokenizer plus <|im_start|> (257) and <|im_end|> (258) and a
    chat template; its eos stays <|endoftext|> (256), so the end of turn is another token, as for a base model's
    tokenizer with ChatML added."""
    import shutil

    from adakd.data import tokenizer_for

    folder = tmp_path_factory.mktemp("tiny-chat-model")
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_model[0] / name).is_file():
            shutil.copy(tiny_model[0] / name, folder / name)
    from tokenizers.processors import TemplateProcessing

    tok = tokenizer_for("byte")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    # Plain tokenisation adds a BOS (as Llama's tokenizers do): text rendered by the template must not get one more.
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 256)]
    )
    tok.save_pretrained(folder)
    rows, users = _chat_rows()
    data = tmp_path_factory.mktemp("chat-data") / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, data, users


def _chat_eval(folder, data, out, *extra):
    from adakd.cli import main

    argv = [
        "eval", "--model", str(folder), "--datasets", f"chat={data}", "--seeds", "1", "--batch-size", "2",
        "--max-length", "400", "--max-prompt-length", "380", "--output", str(out), "--quiet", "--device", "cpu",
        *extra,
    ]  # fmt: skip
    return main(argv)


def _spy_generate(monkeypatch, answer: list[int]):
    """Replace the tiny model's generate: record the prompts it is fed (left padding removed) and its kwargs, and
    answer every prompt with ``answer``."""
    import torch
    import transformers

    calls = []

    def generate(self, input_ids, attention_mask, **kwargs):
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
        calls.append((rows, kwargs))
        return torch.cat([input_ids, torch.tensor([answer] * len(rows))], 1)

    monkeypatch.setattr(transformers.Qwen2ForCausalLM, "generate", generate)
    return calls


def test_chat_template_feeds_the_chat_templates_ids_and_stops_at_the_end_of_turn(chat_model, tmp_path, monkeypatch):
    from adakd.data import tokenizer_for

    folder, data, users = chat_model
    tok = tokenizer_for(str(folder))
    # The model "answers" A <|im_end|> B: the answer is "A", without the end marker or what follows it.
    calls = _spy_generate(monkeypatch, [ord("A"), 258, ord("B")])
    assert _chat_eval(folder, data, tmp_path / "chat.json", "--chat-template") == 0
    fed = [row for rows, _ in calls for row in rows]
    want = [
        list(
            tok.apply_chat_template([{"role": "user", "content": u}], tokenize=True, add_generation_prompt=True)[
                "input_ids"
            ]
        )
        for u in users
    ]
    assert fed == want
    assert tok.decode(fed[1]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhen did it start?\n\nIt started in 2000.\n\n"
        "Then it grew.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert fed[0].count(257) == 3  # the template's own special tokens, none added or doubled
    assert tok("x")["input_ids"] == [256, ord("x")] and 256 not in fed[0]  # no BOS added to the rendered text
    assert all(kwargs["eos_token_id"] == [256, 258] for _, kwargs in calls)  # the eos and the end of turn
    results = json.loads((tmp_path / "chat.json").read_text())
    assert results["generation"]["chat_template"] == "tokenizer"
    assert results["generation"]["stop_tokens"] == ["<|endoftext|>", "<|im_end|>"]
    rows = [json.loads(line) for line in (tmp_path / "chat.predictions" / "chat.seed1.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == ["A"] * 4
    assert [r["chat_prompt"] for r in rows] == [tok.decode(ids) for ids in want]
    assert [r["prompt"] for r in rows] == [json.loads(line)["prompt"] for line in data.read_text().splitlines()]

    # Without the flag: the raw prompts, the eos alone, and the results say so.
    calls.clear()
    assert _chat_eval(folder, data, tmp_path / "raw.json") == 0
    fed = [row for rows, _ in calls for row in rows]
    assert fed == [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    assert all(kwargs["eos_token_id"] == 256 for _, kwargs in calls)
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert raw["generation"]["chat_template"] is None and raw["generation"]["stop_tokens"] == ["<|endoftext|>"]
    raw_rows = [
        json.loads(line) for line in (tmp_path / "raw.predictions" / "chat.seed1.jsonl").read_text().splitlines()
    ]
    # <|im_end|> ends nothing here: decoding drops it (a special token) and keeps what follows.
    assert [r["prediction"] for r in raw_rows] == ["AB"] * 4 and not any("chat_prompt" in r for r in raw_rows)


def test_chat_template_by_name_and_a_real_generation(chat_model, tiny_model, tmp_path):
    from adakd.data import format_prompt, tokenizer_for

    folder, data, users = chat_model
    # The real tiny model, sampling: HF generate with two end tokens; no end marker is left in an answer.
    assert _chat_eval(folder, data, tmp_path / "real.json", "--chat-template") == 0
    rows = (tmp_path / "real.predictions" / "chat.seed1.jsonl").read_text().splitlines()
    assert len(rows) == 4 and not any("<|im_end|>" in json.loads(line)["prediction"] for line in rows)
    # A named template on a tokenizer without one: qwen2's single turn is format_prompt(..., "qwen2").
    byte_model = tiny_model[0]
    assert _chat_eval(byte_model, data, tmp_path / "qwen2.json", "--chat-template", "qwen2") == 0
    results = json.loads((tmp_path / "qwen2.json").read_text())
    assert results["generation"]["chat_template"] == "qwen2"
    rows = [json.loads(line) for line in (tmp_path / "qwen2.predictions" / "chat.seed1.jsonl").read_text().splitlines()]
    assert [r["chat_prompt"] for r in rows] == [format_prompt(u, template="qwen2") for u in users]
    assert tokenizer_for(str(byte_model)).chat_template is None


def test_chat_template_refusals_are_one_line(chat_model, tiny_model, tmp_path, capsys):
    from ..faults.common import one_line_error

    folder, data, _ = chat_model
    # A tokenizer without a chat template.
    line = one_line_error(
        _chat_eval(tiny_model[0], data, tmp_path / "a.json", "--chat-template"), capsys.readouterr().err
    )
    assert "--chat-template" in line and str(tiny_model[0]) in line and "has no chat template" in line
    # A record that is neither an instruction nor an Alpaca prompt: its file and line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + json.dumps({"prompt": "Question: why?\nAnswer:", "output": "x"}) + "\n")
    line = one_line_error(_chat_eval(folder, bad, tmp_path / "b.json", "--chat-template"), capsys.readouterr().err)
    assert f"{bad}:5: --chat-template needs the record's 'instruction'" in line
    assert _chat_eval(folder, bad, tmp_path / "c.json") == 0  # the raw prompts need no instruction
    # An instruction template's name, and a file that does not exist.
    line = one_line_error(
        _chat_eval(folder, data, tmp_path / "d.json", "--chat-template", "minillm"), capsys.readouterr().err
    )
    assert "'minillm' is an instruction template" in line
    missing = tmp_path / "none.jinja"
    line = one_line_error(
        _chat_eval(folder, data, tmp_path / "e.json", "--chat-template", str(missing)), capsys.readouterr().err
    )
    assert f"--chat-template {missing}: no such file" in line
    assert not any((tmp_path / f"{x}.json").exists() for x in "abde")


def test_a_jinja_file_and_the_end_of_turn_of_other_templates(chat_model, tmp_path):
    from adakd.data import tokenizer_for
    from adakd.eval.sets import ChatTemplate, chat_template_for, end_of_turn_ids

    folder, _, _ = chat_model
    tok = tokenizer_for(str(folder))
    jinja = tmp_path / "t.jinja"
    jinja.write_text(CHATML)
    assert chat_template_for(tok, str(jinja), "x") == ChatTemplate(CHATML, str(jinja))
    assert end_of_turn_ids(tok, ChatTemplate(CHATML, "x")) == [258]
    # A template that ends the answer with the eos, or with plain text: nothing more than the eos to stop at.
    eos_after = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    assert end_of_turn_ids(tok, ChatTemplate(eos_after, "x")) == [256]
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    assert end_of_turn_ids(tok, ChatTemplate(plain, "x")) == []
    failing = "{{ raise_exception('user/assistant must alternate') }}"
    assert end_of_turn_ids(tok, ChatTemplate(failing, "x")) == []


def test_user_turns_are_read_back_from_the_alpaca_prompts():
    from adakd.data import format_prompt
    from adakd.eval.sets import user_turn

    # Headings inside the input are the input's (the instruction ends at the first "### Input:").
    tricky = ("Step 1.\n\nStep 2.", "the input\n\n### Input:\nstill input\n\n### Response:\nnot the end")
    for instruction, context in [("Do it.", None), ("Do it.", ""), ("Do it.", "ctx"), tricky, ("", "only input")]:
        want = instruction + ("\n\n" + context if context else "")
        assert user_turn({"prompt": format_prompt(instruction, context)}) == want
        assert user_turn({"instruction": instruction, "input": context, "prompt": "anything"}) == want
    assert user_turn({"prompt": "Q: why?"}) is None
    assert user_turn({"prompt": format_prompt("x") + " trailing"}) is None
    assert user_turn({"instruction": ["a list"], "output": "o"}) is None
    assert user_turn({"instruction": "ok", "context": "dolly's key"}) == "ok\n\ndolly's key"


def test_shared_sets_user_turns_from_prompts_equal_those_from_instructions():
    from adakd.eval.sets import user_turn

    paths, sets = _shared_sets()
    for path in paths.values():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert user_turn({"prompt": row["prompt"]}) == user_turn(row) is not None


def test_compare_notes_results_generated_differently():
    from adakd.eval.tables import compare_table

    def result(model, **generation):
        entry = {"n": 4, "rougeL": {"mean": 10.0, "std": 0.0}}
        return {"model": model, "datasets": {"dolly": entry}, "average": {"mean": 10.0, "std": 0.0},
                "generation": {"greedy": False, **generation}}  # fmt: skip

    raw, chat = result("raw", chat_template=None), result("chat", chat_template="tokenizer")
    table = compare_table([raw, chat])
    assert table.endswith(
        "Note: the answers were generated differently (raw: raw prompts; chat: chat template tokenizer)."
    )
    old = result("old")  # written before --chat-template: raw prompts
    assert "generated differently" not in compare_table([old, raw])
    table = compare_table([old, result("greedy", greedy=True, chat_template="qwen2")])
    assert "(old: raw prompts, sampled; greedy: chat template qwen2, greedy)" in table


def test_tokens_per_second_counts_every_decoded_token(monkeypatch):
    """Each decoding step counts, the one that produced the answer's end included; the answers' own tokens are
    reported apart. (The end token used to be left out, so runs that decoded as many tokens read as different
    speeds, and the HF and vLLM backends counted differently.)"""
    import time

    import torch

    import adakd.generation as generation
    from adakd.data import tokenizer_for
    from adakd.generation import GenerationConfig, HFBackend

    tok = tokenizer_for("byte")
    ends = tok.eos_token_id

    def decode(model, batch, **kwargs):
        time.sleep(0.01)
        return [[65, 66, ends], [67]][: len(batch)]

    monkeypatch.setattr(generation, "generate_ids", decode)
    config = GenerationConfig(batch_size=2)
    texts = HFBackend(torch.nn.Linear(1, 1), tok).generate(["a", "b"], 0, config)
    assert texts == ["AB", "C"]
    assert config.stats["tokens"] == 4 and config.stats["answer_tokens"] == 3 and config.stats["seconds"] >= 0.01
