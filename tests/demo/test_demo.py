"""The embedded demo: its data, its tokenizer, and `adakd demo --quick` end to end."""

from __future__ import annotations

import json

import pytest
import torch

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
def test_demo_quick_end_to_end_with_two_training_seeds(tmp_path):
    from adakd.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--train-seeds", "0", "1", "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    for name in ("rouge.png", "paired.png", "ratio.png", "losses.png", "tau_vs_difficulty.png"):
        assert (out / "plots" / name).stat().st_size > 10_000, name
        assert f"plots/{name}" in report
    summary = json.loads((out / "demo.json").read_text())
    assert summary["methods"] == ["rkl", "adakd-rkl"]
    assert {k: sorted(v) for k, v in summary["results"].items()} == {
        "teacher": ["model"], "warm-start": ["model"], "rkl": ["0", "1"], "adakd-rkl": ["0", "1"],
    }  # fmt: skip
    for by_seed in summary["results"].values():
        for r in by_seed.values():
            for decoding in ("sampled", "greedy"):
                assert set(r[decoding]) == {"all", "exact", "soft"}
                assert all(0 <= v <= 100 for v in r[decoding].values())
    # The teacher, trained longest and largest, must have learned the tasks beyond chance.
    assert summary["results"]["teacher"]["model"]["sampled"]["all"] > 20
    diffs = summary["comparison"]["adakd-rkl"]
    assert set(diffs) == {"exact/sampled", "exact/greedy", "soft/sampled", "soft/greedy"}
    r = summary["results"]
    mean = (r["adakd-rkl"]["0"]["greedy"]["soft"] - r["rkl"]["0"]["greedy"]["soft"]
            + r["adakd-rkl"]["1"]["greedy"]["soft"] - r["rkl"]["1"]["greedy"]["soft"]) / 2  # fmt: skip
    assert diffs["soft/greedy"]["mean"] == pytest.approx(mean) and diffs["soft/greedy"]["n"] == 2
    assert "## AdaKD-RKL against RKL" in report and "On the single-answer tasks, AdaKD-RKL is" in report
    assert all(0.1 <= v <= 1.0 for v in summary["final_ratios"].values())
    for run in ("teacher", "warm-start", "rkl-seed0", "adakd-rkl-seed1"):
        assert (out / "runs" / run / "final" / "config.json").is_file()
    assert (out / "eval" / "adakd-rkl-seed0.predictions" / "test.seed10.jsonl").is_file()


@pytest.mark.slow
def test_demo_ablations_train_every_student_from_the_warm_start(tmp_path):
    from adakd.demo import ABLATIONS, DemoSettings, run_demo

    s = DemoSettings(n_train=200, n_val=16, n_test=12, teacher_steps=6, init_steps=4, student_steps=3, batch_size=8)
    summary = run_demo(tmp_path, settings=s, ablations=True, train_seeds=(3, 4), log=lambda *_: None)
    assert summary["methods"] == ["rkl", "adakd-rkl", *ABLATIONS]
    assert set(summary["comparison"]) == {"adakd-rkl", *ABLATIONS}  # each against RKL, paired by seed
    for name in summary["methods"]:
        for seed in (3, 4):
            assert (tmp_path / "runs" / f"{name}-seed{seed}" / "final" / "config.json").is_file(), name
    from safetensors.torch import load_file

    # The training seed reaches the run: the two RKL students saw the data in another order.
    a, b = (load_file(tmp_path / "runs" / f"rkl-seed{k}" / "final" / "model.safetensors") for k in (3, 4))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    report = (tmp_path / "report.md").read_text()
    assert "| ablation: AdaKD-RKL, tau_weight none |" in report and "| student, SFT continued |" in report


def test_a_rerun_into_the_same_folder_starts_over(tmp_path):
    from adakd.demo.run import DemoSettings, _train, _write_jsonl, train_tokenizer

    s = DemoSettings(n_train=64, batch_size=4)
    records = make_splits(64, 2, 2)["train"]
    _write_jsonl(tmp_path / "train.jsonl", records)
    train_tokenizer(records, 300, tmp_path / "tok")
    for _ in range(2):
        _, rows, _, _ = _train(
            "sft", tmp_path / "runs", s, tmp_path / "tok", tmp_path / "train.jsonl", steps=2, loss={"kd_ratio": 0.0},
            sizes=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        )  # fmt: skip
        assert [r["step"] for r in rows] == [2]  # the second run's metrics alone, not appended to the first's


def _fake(sampled_exact: float, greedy_exact: float, soft: float = 30.0) -> dict:
    kinds = lambda e: {"all": (e + soft) / 2, "exact": e, "soft": soft}  # noqa: E731
    return {
        "sampled": kinds(sampled_exact), "greedy": kinds(greedy_exact), "sampling_std": kinds(0.5),
        "exact_match_sampled": kinds(1.0), "exact_match_greedy": kinds(1.0), "families": {"arithmetic": 1.0},
    }  # fmt: skip


def test_comparison_claims_a_difference_only_when_its_interval_excludes_zero():
    from adakd.demo.report import comparison_table, comparisons, reading, scores_table

    results = {
        "teacher": {None: _fake(80, 80)},
        "warm-start": {None: _fake(50, 50)},
        "rkl": {0: _fake(60, 60), 1: _fake(62, 61), 2: _fake(64, 62)},
        # sampled: −2.0, −2.2, −2.1 (a clear loss); greedy: +1, −1, +0.5 (noise)
        "adakd-rkl": {0: _fake(58, 61), 1: _fake(59.8, 60), 2: _fake(61.9, 62.5)},
    }
    comparison = comparisons(results, (0, 1, 2))
    d = comparison["adakd-rkl"]["exact/sampled"]
    assert d["mean"] == pytest.approx(-2.1) and d["high"] < 0
    assert comparison["adakd-rkl"]["soft/greedy"]["mean"] == 0 and set(comparison) == {"adakd-rkl"}
    text = reading(comparison)
    assert text[0].startswith("On the single-answer tasks, AdaKD-RKL is below RKL sampled (-2.10 [")
    assert "not distinguishable from RKL greedy (+0.17 [" in text[0] and "contains 0" in text[0]
    assert "| student AdaKD-RKL | -2.10 [" in comparison_table(comparison)
    assert "| teacher (SFT) | – | 80.00 | 80.00 | 30.00 |" in scores_table(results)
    assert "| student RKL KD | 3 | 62.00 ± 2.00 | 61.00 ± 1.00 |" in scores_table(results)
    assert comparisons(results, (0,)) == {}  # one training seed: nothing is compared


def test_one_training_seed_claims_no_comparison(tmp_path):
    from adakd.demo.report import write_report
    from adakd.demo.run import DemoSettings

    s = DemoSettings.for_run(quick=True, seed=0)
    results = {"teacher": {None: _fake(80, 80)}, "warm-start": {None: _fake(50, 50)}, "rkl": {0: _fake(60, 60)},
               "adakd-rkl": {0: _fake(58, 61)}}  # fmt: skip
    report = write_report(tmp_path, s, results, {}, {"total": 1.0}, {"0": 0.5}, 448, quick=True).read_text()
    assert "Quick run (a smoke check)" in report and "## No comparison" in report and "none is claimed" in report
    assert "against RKL" not in report and "paired.png" not in report


def test_demo_rejects_repeated_training_seeds(tmp_path, capsys):
    from adakd.cli import main

    assert main(["demo", "--quick", "--train-seeds", "1", "1", "--output", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "adakd: error: --train-seeds: expected distinct seeds, got 1 1"
    assert not (tmp_path / "d").exists()


def test_demo_output_that_cannot_be_created_is_one_line(tmp_path, capsys):
    from adakd.cli import main

    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    assert main(["demo", "--quick", "--output", str(blocker / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"adakd: error: --output {blocker / 'd'}: cannot create the folder (Not a directory)"


def test_every_demo_record_knows_its_family_and_kind():
    from adakd.demo import SOFT_FAMILIES

    splits = make_splits(1500, 50, 100, seed=2, tasks="mixed")
    seen = {(r.family, r.kind) for recs in splits.values() for r in recs}
    assert seen == {(f, "exact") for f in FAMILIES} | {(f, "soft") for f in SOFT_FAMILIES}
    assert all(("Greet " in r.prompt) == (r.family == "greeting") for recs in splits.values() for r in recs)
    # The greeting table (20 names) is trained on although its prompts are also held out, like the capitals.
    assert sum(r.family == "greeting" for r in splits["train"]) > 50


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
