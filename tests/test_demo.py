"""The embedded demo: its data, its tokenizer, and `adakd demo --quick` end to end."""

from __future__ import annotations

import json

import pytest

from adakd.demo import FAMILIES, make_splits

pytest.importorskip("transformers")


def test_splits_are_disjoint_deterministic_and_cover_every_family():
    a = make_splits(300, 40, 40, seed=3)
    b = make_splits(300, 40, 40, seed=3)
    assert a == b
    assert make_splits(300, 40, 40, seed=4) != a
    assert [len(a[k]) for k in ("train", "validation", "test")] == [300, 40, 40]
    test_prompts = {r.prompt for r in a["test"]}
    assert not test_prompts & {r.prompt for r in a["validation"]}
    # Only the 20-entry capital table may repeat in training (it is a lookup, not a generalisation task).
    shared = test_prompts & {r.prompt for r in a["train"]}
    assert all("capital of" in p for p in shared)
    text = " ".join(r.prompt for r in a["train"])
    for marker in ("Add ", "Sort these numbers", "Reverse the order", "uppercase", "capital of", "DD/MM/YYYY"):
        assert marker in text
    assert len(FAMILIES) == 6
    add = next(r for r in a["train"] if "Add " in r.prompt)
    x, y = (int(t.rstrip(".")) for t in add.prompt.split("Add ")[1].split("\n")[0].split(" and "))
    assert add.response == f"{x} + {y} = {x + y}"


def test_trained_tokenizer_round_trips(tmp_path):
    from adakd.demo.run import train_tokenizer

    records = make_splits(200, 10, 10)["train"]
    tok = train_tokenizer(records, 300, tmp_path / "tok")
    assert len(tok) <= 300 and tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    for r in records[:20]:
        assert tok.decode(tok(r.prompt + r.response)["input_ids"]) == r.prompt + r.response
    from adakd.data import tokenizer_for

    assert tokenizer_for(str(tmp_path / "tok"))("Add 1 and 2.")["input_ids"] == tok("Add 1 and 2.")["input_ids"]


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    from adakd.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    for name in ("rouge.png", "ratio.png", "losses.png", "tau_vs_difficulty.png"):
        assert (out / "plots" / name).stat().st_size > 10_000, name
        assert f"plots/{name}" in report
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["results"]) == {"teacher", "sft", "rkl", "adakd-rkl", "latf-rkl", "idts-rkl"}
    for r in summary["results"].values():
        assert 0 <= r["rougeL"]["mean"] <= 100 and 0 <= r["exact_match"]["mean"] <= 100
    # The teacher, trained longest and largest, must have learned the tasks beyond chance.
    assert summary["results"]["teacher"]["rougeL"]["mean"] > 20
    assert 0.1 <= summary["final_ratio"] <= 1.0
    for run in ("teacher", "sft", "rkl", "adakd-rkl"):
        assert (out / "runs" / run / "final" / "config.json").is_file()
    assert (out / "eval" / "adakd-rkl.predictions" / "test.seed10.jsonl").is_file()


def test_soft_tasks_have_several_valid_answers_in_known_proportions():
    from collections import Counter

    from adakd.demo import SOFT_FAMILIES

    splits = make_splits(2000, 20, 40, seed=5, tasks="soft")
    train = splits["train"]
    assert len(SOFT_FAMILIES) == 4
    for r in train:
        assert len(r.references) >= 2 and r.response in r.references
    sums = [r for r in train if "plus" in r.prompt]
    share = Counter(r.response.startswith("The sum is") for r in sums)[True] / len(sums)
    assert share == pytest.approx(0.4, abs=0.06)  # "a + b = c" 0.6, "The sum is c." 0.4
    assert make_splits(300, 40, 40, seed=3, tasks="exact") == make_splits(300, 40, 40, seed=3)  # the demo's data
    mixed = " ".join(r.prompt for r in make_splits(600, 20, 20, seed=1, tasks="mixed")["train"])
    assert "Add " in mixed and "Join these words" in mixed
    with pytest.raises(ValueError, match="unknown task set 'hard'"):
        make_splits(10, 2, 2, tasks="hard")
