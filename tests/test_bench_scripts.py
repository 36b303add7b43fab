"""The benchmark and GPU-check scripts run (on the CPU, at tiny shapes), so they cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_gpu_check_passes_on_the_cpu(capsys):
    # The same parity checks gpu_check.sh runs on a GPU, at small shapes (impl='compile' is covered by test_fused).
    assert _load("gpu_check").main(["--device", "cpu", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and " 0 failed" in out


def test_gpu_check_reports_a_failure():
    gpu_check = _load("gpu_check")
    report = gpu_check.Report()
    report.check("an error above its tolerance", 2e-5, 1e-5)
    report.check("a NaN", float("nan"), 1.0)
    assert report.failed == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "variants"),
    [
        ("loss_bench", ["--tokens", "64", "--vocab", "128", "--device", "cpu"], {"plain-kd", "adakd-all", "adakd"}),
        ("fused_bench", ["--tokens", "64", "--vocab", "128", "--h-student", "8", "--h-teacher", "16", "--no-liger"],
         {"naive", "fused", "fused-one-pass"}),
        ("step_bench", ["--steps", "1", "--warmup", "1", "--batch-size", "2", "--rounds", "2", "--variants",
                        "plain-kd/fused", "adakd/fused"], {"plain-kd/fused", "adakd/fused"}),
    ],
)  # fmt: skip
def test_benchmarks_run(tmp_path, script, args, variants):
    out = tmp_path / "results.json"
    timing = [] if script == "step_bench" else ["--repeats", "1", "--warmup", "0"]  # step_bench: its own --steps
    cmd = [sys.executable, str(BENCH / f"{script}.py"), *args, *timing, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {r["variant"] for r in rows} == variants
    for r in rows:
        assert r["ms"] > 0 and r["extra_bytes"] >= 0
    assert "ratios against" in proc.stdout


@pytest.mark.slow
def test_step_bench_compares_two_checkouts_variant_by_variant(tmp_path):
    """``--compare OLD_SRC``: every variant timed under both sources in every round; a folder without adakd is one
    line. Here the "old" source is a copy of this one, so both columns time the same code."""
    old = tmp_path / "old"
    import shutil

    shutil.copytree(Path(__file__).resolve().parents[1] / "src" / "adakd", old / "adakd")
    out = tmp_path / "compare.json"
    cmd = [sys.executable, str(BENCH / "step_bench.py"), "--steps", "1", "--warmup", "1", "--batch-size", "2",
           "--rounds", "2", "--variants", "plain-kd/fused", "--compare", str(old), "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())
    assert row["variant"] == "plain-kd/fused" and len(row["round_ratios"]) == 2
    assert row["old_ms"] > 0 and row["new_ms"] > 0 and row["ratio"] > 0
    assert f"old: {old}" in proc.stdout and "| new / old (median of rounds) |" in proc.stdout
    bad = subprocess.run([*cmd[:-4], "--compare", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "no adakd package there" in bad.stderr


def test_cache_fidelity_metrics_are_perfect_for_a_whole_vocabulary_cache():
    bench = _load("cache_fidelity")
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(50, generator=g)
    assert bench.spearman(scores, scores) == pytest.approx(1.0)
    assert bench.spearman(scores, -scores) == pytest.approx(-1.0)
    assert bench.spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 3, 4])) == pytest.approx(0.9486833)
    assert bench.jaccard_top(scores, scores, 0.5) == 1.0
    assert bench.jaccard_top(torch.arange(4.0), -torch.arange(4.0), 0.5) == 0.0
    hidden, weight = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    teacher, labels = torch.randn(40, 30, generator=g) * 2, torch.randint(0, 30, (40,), generator=g)
    whole = bench.batch_fidelity(hidden, weight, teacher, labels, 30, torch.float32)
    assert whole["spearman"] == pytest.approx(1.0) and whole["jaccard"] == 1.0 and whole["tail_mass"] == 0.0
    assert whole["loss_rel_err"] < 1e-5 and whole["grad_cosine"] == pytest.approx(1.0, abs=1e-6)
    small = bench.batch_fidelity(hidden, weight, teacher, labels, 2, torch.float16)
    assert small["tail_mass"] > 0.1 and small["grad_cosine"] < 0.999  # the metrics can tell a lossy cache apart


def test_profile_loss_runs_and_reports_the_floor(capsys):
    assert _load("profile_loss").main(["--tokens", "16", "--vocab", "64", "--h-student", "4", "--h-teacher", "8",
                                       "--repeats", "1"]) == 0  # fmt: skip
    assert "above it" in capsys.readouterr().out


def test_study_paired_differences_and_intervals():
    study = _load("study")
    rows = [
        {"method": "rkl", "seed": s, "rouge_sampled": v, "rouge_greedy": v, "sampling_std": 0.5}
        for s, v in enumerate([10.0, 12.0, 14.0])
    ] + [
        {"method": "ada", "seed": s, "rouge_sampled": v, "rouge_greedy": v - 1, "sampling_std": 0.7}
        for s, v in enumerate([11.0, 13.2, 15.1])
    ]
    d = study.paired(rows, "ada", "rkl", "rouge_sampled")  # differences 1.0, 1.2, 1.1
    assert d["n"] == 3 and d["mean"] == pytest.approx(1.1) and d["std"] == pytest.approx(0.1)
    assert d["high"] - d["mean"] == pytest.approx(4.303 * 0.1 / 3**0.5)  # t(0.975, 2 df)
    table = study.summary_table(rows, "rkl").splitlines()
    # sampled: +1.10 [+0.85, +1.35] excludes 0 (*); greedy: +0.10 [-0.15, +0.35] does not
    assert "| +1.10 [+0.85, +1.35] * | +0.10 [-0.15, +0.35] |" in table[-1]
    assert study.parse_method("nw=adakd-rkl:tau_weight=none,c=1.0") == (
        "nw", {"base": "rkl", "selection": "latf", "temperature": "inverse", "tau_weight": "none", "c": 1.0},
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown preset 'bar'"):
        study.parse_method("x=bar")


@pytest.mark.slow
def test_study_runs_and_resumes(tmp_path):
    """A smoke-sized study end to end; a rerun after losing a row trains only that run again."""
    out = tmp_path / "study"
    cmd = [
        sys.executable, str(BENCH / "study.py"), "--output", str(out), "--quick", "--teacher-steps", "12",
        "--init-steps", "6", "--student-steps", "4", "--n-train", "200", "--n-test", "8", "--seeds", "0", "1",
        "--eval-seeds", "10", "--method", "rkl", "--method", "nw=adakd-rkl:tau_weight=none",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    runs = [("teacher", None), ("rkl", 0), ("rkl", 1), ("nw", 0), ("nw", 1)]  # the teacher is scored once, first
    assert [(r["method"], r["seed"]) for r in rows] == runs
    assert (out / "study.md").is_file() and (out / "study.png").stat().st_size > 0
    assert "| teacher | – (one model) |" in (out / "study.md").read_text()
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]) + '{"cut')  # a lost row
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 runs to do, 4 done" in proc.stdout
    lines = (out / "results.jsonl").read_text().splitlines()
    assert lines[4] == '{"cut' and len(lines) == 6  # the cut line stays apart; the redone run is a row of its own
    again = [json.loads(line) for line in lines if line != '{"cut']
    assert [(r["method"], r["seed"]) for r in again] == runs


def _real_rows() -> list[dict]:
    """Score rows of bench/real_study.py: two methods over three training seeds, and the shared models."""
    rows = [
        {
            "name": "pruned",
            "kind": "prune",
            "chosen": {"method": "importance"},
            "prune": {
                "ce": {"teacher": {"ce": 3.4}},
                "compare": [
                    {"method": "importance", "kept": [0, 2], "ce": 6.7},
                    {"method": "even", "kept": [0, 3], "ce": 13.9},
                ],
            },
        }
    ]
    for name, ce, rouge in (("teacher", 2.7, 17.0), ("pruned", 6.9, 0.5), ("warmstart", 3.5, 8.0)):
        rows.append(
            {
                "name": f"score:{name}",
                "kind": "score",
                "model": name,
                "dev_ce": ce,
                "sampling_seeds": [10, 20],
                "sampled": {"dolly": rouge, "dolly_unseen": rouge - 0.1},
                "greedy": {"dolly": rouge + 1, "dolly_unseen": rouge + 0.9},
                "sampling_std": {"dolly": 0.5},
                "overlap": 1,
            }
        )
    for seed, (a, b) in enumerate(((9.0, 10.0), (9.5, 10.7), (8.0, 9.1))):
        for method, rouge in (("rkl", a), ("rkl-adakd", b)):
            rows.append({"name": f"{method}-seed{seed}", "kind": "train", "method": method, "seed": seed})
            rows.append(
                {
                    "name": f"score:{method}-seed{seed}",
                    "kind": "score",
                    "model": f"{method}-seed{seed}",
                    "dev_ce": 3.0 + seed / 10,
                    "sampling_seeds": [10],
                    "sampled": {"dolly": rouge, "dolly_unseen": rouge},
                    "greedy": {"dolly": rouge, "dolly_unseen": rouge},
                    "sampling_std": {"dolly": 0.0},
                }
            )
    return rows  # fmt: skip


def test_real_study_tables_pair_by_training_seed():
    real = _load("real_study")
    rows = _real_rows()
    d = real.paired(rows, "rkl-adakd", "rkl", "sampled:dolly")  # differences 1.0, 1.2, 1.1
    assert d["n"] == 3 and abs(d["mean"] - 1.1) < 1e-12
    assert abs(d["low"] - (1.1 - 4.303 * 0.1 / 3**0.5)) < 1e-9
    assert real.paired(rows, "rkl-adakd", "rkl", "dev_ce")["mean"] == 0.0
    table = real.summary_table(rows, ["dolly"])
    assert "| teacher | 1 | 2.70 | 17.00 | 16.90 | 18.00 | 17.90 | 0.50 |" in table
    assert "| rkl-adakd | 3 | 3.10 ± 0.10 | 9.93 ± 0.80 |" in table and table.rstrip().endswith("| – |")
    differences = real.differences_table(rows)
    assert "| rkl-adakd − rkl | +0.00 " in differences and "+1.10 [" in differences and "] *" in differences
    assert "| importance | 0, 2 | 6.70 |" in real.prune_table(rows)


@pytest.mark.slow
def test_server_bench_runs_against_a_fake_vllm_server(tmp_path):
    """bench/server_bench.py end to end at tiny shapes, against the fake vLLM server serving the very weights the
    in-process side loads: the fidelity it reports is exact, and all three training variants ran."""
    import transformers

    from adakd.data import tokenizer_for

    from .serving.fake_vllm import FakeVLLM

    tokenizer = tokenizer_for("byte")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path / "teacher"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "server.json"
    with FakeVLLM(model, tokenizer, name="tiny") as fake:
        cmd = [sys.executable, str(BENCH / "server_bench.py"), "--url", fake.url, "--model", "tiny", "--folder",
               str(folder), "--k", "8", "--batches", "2", "--batch-size", "2", "--length", "48", "--steps", "3",
               "--train-batch-size", "2", "--vocab", str(len(tokenizer)), "--json", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    teacher = result["teacher"]
    assert teacher["positions"] == 2 * 2 * 47 and teacher["topk_sets_equal"] == 1.0
    assert teacher["max_logprob_diff"] < 1e-5 and teacher["max_tail_mass_diff"] < 1e-5
    assert set(teacher["positions_per_s"]) == {"server", "in-process"}
    training = result["training"]
    assert set(training) == {"server, prefetch 0", "server, prefetch 2", "in-process teacher"}
    assert training["server, prefetch 2"]["teacher"]["teacher_server/requests"] >= 3
    assert "positions/s" in proc.stdout and "s/step" in proc.stdout
