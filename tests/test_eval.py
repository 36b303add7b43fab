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
SHARED = Path(os.environ.get("ADAKD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
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
