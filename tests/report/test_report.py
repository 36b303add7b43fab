"""``adakd report`` and :mod:`adakd.report`: reading metrics.jsonl, the summary by hand, the PNGs, the CLI.

Every metrics file is written by hand here; no model is trained.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from adakd.cli import report as report_cmd
from adakd.report import (
    plot_losses,
    plot_ratio,
    plot_tau_vs_difficulty,
    plot_temperatures,
    read_metrics,
    summarize,
    write_comparison_report,
    write_run_report,
)
from adakd.report.metrics import read_rows
from adakd.report.run_report import run_labels, summary_line

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _adakd_row(step, loss, ratio, tau, tau_min, tau_max, kept, valid) -> dict:
    return {
        "step": step,
        "loss": loss,
        "grad_norm": 0.5,
        "learning_rate": 1e-3,
        "kd_loss": loss,
        "adakd/ratio": ratio,
        "adakd/kept_tokens": kept,
        "adakd/valid_tokens": valid,
        "adakd/tau_mean": tau,
        "adakd/tau_min": tau_min,
        "adakd/tau_max": tau_max,
        "epoch": step / 20,
    }


# Steps 5, 10, 15, 19, 20; the last 10 % of 20 steps are the rows with step > 18: 19 and 20.
ADAKD_ROWS = [
    _adakd_row(5, 2.0, 1.0, 1.0, 0.9, 1.1, 100, 100),
    _adakd_row(10, 1.5, 1.0, 1.1, 0.8, 1.3, 100, 100),
    _adakd_row(15, 1.0, 0.8, 0.9, 0.85, 1.2, 80, 100),
    _adakd_row(19, 0.6, 0.6, 1.0, 0.7, 1.25, 60, 100),
    _adakd_row(20, 0.4, 0.5, 1.0, 0.75, 1.2, 100, 200),
]
END_ROW = {"step": 20, "train_runtime": 12.5, "train_samples_per_second": 32.0, "train_loss": 0.9, "epoch": 1.0}
SFT_ROWS = [
    {"step": 10, "loss": 3.0, "ce_loss": 3.0, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.5},
    {"step": 20, "loss": 2.5, "ce_loss": 2.5, "grad_norm": 1.0, "learning_rate": 5e-4, "epoch": 1.0},
]


def _write_run(folder: Path, rows: list[dict], *, extra_lines: list[str] = (), final: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if final:
        (folder / "final").mkdir()
        (folder / "checkpoint-10").mkdir()
        (folder / "checkpoint-5").mkdir()
    return folder


@pytest.fixture
def adakd_run(tmp_path) -> Path:
    return _write_run(tmp_path / "adakd-run", [*ADAKD_ROWS, END_ROW], final=True)


@pytest.fixture
def sft_run(tmp_path) -> Path:
    return _write_run(tmp_path / "sft-run", SFT_ROWS)


def _assert_png(path: Path, min_width: int = 600, min_height: int = 400) -> None:
    from matplotlib.image import imread

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height, image.shape
    assert image.shape[2] in (3, 4)
    assert image.std() > 0.01  # not a blank canvas


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adakd")
    report_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _cli(*argv: str) -> int:
    args = _parser().parse_args(["report", *argv])
    return args.handler(args)


# --- reading -----------------------------------------------------------------------------------------------------


def test_read_metrics_keeps_training_rows_sorted_and_the_later_of_a_repeated_step(tmp_path):
    resumed = dict(ADAKD_ROWS[2], loss=0.95)  # a resumed run re-logs step 15
    rows = [ADAKD_ROWS[1], ADAKD_ROWS[0], ADAKD_ROWS[2], END_ROW, resumed, {**ADAKD_ROWS[3], "new/key": "ignored"}]
    run = _write_run(tmp_path / "run", rows, extra_lines=["", "   "])
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics] == [5, 10, 15, 19]
    assert metrics[2]["loss"] == 0.95
    assert all("loss" in r for r in metrics)
    assert read_metrics(run / "metrics.jsonl") == metrics  # the file itself is as good as its folder
    assert len(read_rows(run)) == len(rows)


def test_read_metrics_missing_and_empty_files_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere[/\\]metrics\.jsonl: no such file"):
        read_metrics(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty[/\\]metrics\.jsonl: empty file"):
        read_metrics(empty)
    only_end = _write_run(tmp_path / "only-end", [END_ROW])
    with pytest.raises(ValueError, match=r"only-end[/\\]metrics\.jsonl: no training rows"):
        read_metrics(only_end)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ('{"step": 7, "loss": 0.3', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"loss": 0.3}', "'step'"),
        ('{"step": 7, "loss": "nan?"}', "'loss' must be a number"),
    ],
)
def test_a_corrupt_line_is_named_by_path_and_line(tmp_path, bad, why):
    run = _write_run(tmp_path / "run", ADAKD_ROWS[:2], extra_lines=[bad])
    with pytest.raises(ValueError) as info:
        read_metrics(run)
    message = str(info.value)
    assert message.startswith(f"{run / 'metrics.jsonl'}:3: ")
    assert why in message
    assert "\n" not in message


# --- the summary -------------------------------------------------------------------------------------------------


def test_summarize_adakd_by_hand():
    s = summarize([*ADAKD_ROWS, END_ROW])
    assert s["kind"] == "adakd"
    assert s["steps"] == 20 and s["logged"] == 5
    assert s["final_loss"] == 0.4
    assert s["tail_loss"] == pytest.approx((0.6 + 0.4) / 2) and s["tail_rows"] == 2
    assert s["ratio_final"] == 0.5
    assert s["ratio_mean"] == pytest.approx((1.0 + 1.0 + 0.8 + 0.6 + 0.5) / 5)
    assert s["ratio_min"] == 0.5
    assert s["tau_mean"] == pytest.approx(1.0)
    assert (s["tau_min"], s["tau_max"]) == (0.7, 1.3)
    # Σ kept / Σ valid, not the mean of the per-row fractions (which would be 0.78).
    assert s["kept_fraction"] == pytest.approx(440 / 600)
    assert (s["train_runtime"], s["train_loss"], s["train_samples_per_second"]) == (12.5, 0.9, 32.0)


def test_summarize_sft_and_a_run_without_end_row():
    s = summarize(SFT_ROWS)
    assert s["kind"] == "sft"
    assert (s["steps"], s["final_loss"], s["tail_loss"], s["tail_rows"]) == (20, 2.5, 2.5, 1)
    for key in ("ratio_final", "ratio_mean", "ratio_min", "tau_mean", "tau_min", "kept_fraction", "train_runtime"):
        assert s[key] is None, key
    assert summary_line("sft", s) == "sft: SFT, 20 steps, final loss 2.5 (last 10%: 2.5)"
    with pytest.raises(ValueError, match="no training rows"):
        summarize([END_ROW])


def test_summary_line_of_an_adakd_run():
    line = summary_line("run", summarize([*ADAKD_ROWS, END_ROW]))
    assert line == (
        "run: AdaKD, 20 steps, final loss 0.4 (last 10%: 0.5), r 0.500 (min 0.500, mean 0.780), mean τ 1.000, "
        "kept 73.3 %, 12.5 s"
    )


# --- the plots ---------------------------------------------------------------------------------------------------


def test_training_plots_are_readable_pngs(tmp_path):
    ce_rows = [dict(r, loss=0.5 * r["loss"] + 2.0, ce_loss=4.0 - 0.1 * i) for i, r in enumerate(ADAKD_ROWS)]
    runs = {"adakd": ADAKD_ROWS, "ce": ce_rows, "sft": SFT_ROWS}
    for fn, name in ((plot_ratio, "ratio.png"), (plot_losses, "loss.png"), (plot_temperatures, "tau.png")):
        out = fn(runs, tmp_path / "sub" / name)
        assert out == tmp_path / "sub" / name
        _assert_png(out)
    _assert_png(plot_losses({"sft": SFT_ROWS}, tmp_path / "sft-loss.png"))


def test_sft_only_runs_have_no_ratio_or_temperature_plot(tmp_path):
    with pytest.raises(ValueError, match="adakd/ratio"):
        plot_ratio({"sft": SFT_ROWS}, tmp_path / "ratio.png")
    with pytest.raises(ValueError, match="adakd/tau_mean"):
        plot_temperatures({"sft": SFT_ROWS}, tmp_path / "tau.png")
    assert not (tmp_path / "ratio.png").exists() and not (tmp_path / "tau.png").exists()


def _tokens(n: int = 200, ratio: float = 0.3):
    from adakd import idts_temperatures
    from adakd.adaptive import keep_count

    scores = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.05
    kept = torch.zeros(n, dtype=torch.bool)
    kept[scores.topk(keep_count(n, ratio)).indices] = True
    return scores, kept, idts_temperatures(scores[kept], c=0.5)


def test_tau_vs_difficulty_plots_kept_only_and_per_token_taus(tmp_path):
    from adakd.adaptive import idts_from_median

    scores, kept, kept_taus = _tokens()
    # τ for the kept tokens only, without the run's c: no curve, dropped tokens become a rug.
    _assert_png(plot_tau_vs_difficulty(scores, kept_taus, kept, tmp_path / "a.png", ratio=0.3))
    # With the run's c: the curve, and dropped tokens at their would-be τ.
    _assert_png(plot_tau_vs_difficulty(scores, kept_taus, kept, tmp_path / "a2.png", ratio=0.3, c=0.5))
    # One τ per token, from plain Python lists.
    all_taus = idts_from_median(scores, scores[kept].median(), c=0.5)
    _assert_png(plot_tau_vs_difficulty(scores.tolist(), all_taus.tolist(), kept.tolist(), tmp_path / "b.png"))
    # The curve given outright; everything kept.
    everything = torch.ones_like(kept)
    taus = idts_from_median(scores, 0.4, c=0.8)
    _assert_png(plot_tau_vs_difficulty(scores, taus, everything, tmp_path / "d.png", median=0.4, c=0.8))


def test_select_tokens_is_the_losss_rule():
    """The one selection/IDTS rule (the loss, the inspector and the demo call it) against a float64 re-derivation."""
    from adakd import select_tokens
    from adakd.adaptive import keep_count

    scores = torch.rand(37, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    scores[5] = scores[9]  # a tie: the earlier position wins
    sel = select_tokens(scores, 0.4, c=0.7, tau_base=1.3)
    k = keep_count(37, 0.4)
    order = sorted(range(37), key=lambda i: (-float(scores[i]), i))[:k]
    assert (
        sel.index.tolist() == order and sel.kept.sum() == k and set(sel.kept.nonzero().flatten().tolist()) == set(order)
    )
    kept_sorted = sorted(float(scores[i]) for i in order)
    m = kept_sorted[(k - 1) // 2]  # the lower median
    want = [1.3 * math.exp(-0.7 * math.tanh(math.log(max(float(scores[i]) / m, 1e-8)))) for i in order]
    assert float(sel.median) == m and sel.tau.tolist() == pytest.approx(want, rel=1e-12)
    assert select_tokens(scores, 0.4, temperature="fixed", tau_base=2.0).tau == 2.0
    with pytest.raises(ValueError, match="at least one score"):
        select_tokens(scores[:0], 0.5)


def test_tau_vs_difficulty_rejects_mismatched_inputs(tmp_path):
    scores, kept, kept_taus = _tokens()
    with pytest.raises(ValueError, match="^kept: "):
        plot_tau_vs_difficulty(scores, kept_taus, kept[:-1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="^taus: "):
        plot_tau_vs_difficulty(scores, kept_taus[:-1], kept, tmp_path / "x.png")
    with pytest.raises(ValueError, match="^kept: expected booleans"):
        plot_tau_vs_difficulty(scores, kept_taus, torch.full_like(scores, 0.5), tmp_path / "x.png")
    with pytest.raises(ValueError, match="^scores: "):
        plot_tau_vs_difficulty(scores.reshape(20, -1), kept_taus, kept, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# --- the report --------------------------------------------------------------------------------------------------


def test_run_report_of_an_adakd_run(adakd_run):
    report = write_run_report(adakd_run)
    assert report == adakd_run / "report" / "report.md"
    text = report.read_text()
    assert text.startswith("# Training report: adakd-run\n")
    for name in ("loss.png", "ratio.png", "temperatures.png"):
        assert f"]({name})" in text
        _assert_png(report.parent / name)
    assert "| final loss | 0.4 |" in text
    assert "| mean loss, last 10 % of steps | 0.5 (2 rows) |" in text
    assert "| final ratio r | 0.500 |" in text and "| min ratio r | 0.500 |" in text
    assert "| mean ratio r | 0.780 |" in text
    assert "| kept fraction (Σ kept / Σ valid tokens) | 73.3 % |" in text
    assert "| mean τ | 1.0000 |" in text
    assert "| train runtime | 12.5 s |" in text
    assert "[metrics.jsonl](../metrics.jsonl)" in text and "[final/](../final)" in text
    # Checkpoints in step order, not string order.
    assert "[checkpoint-5](../checkpoint-5), [checkpoint-10](../checkpoint-10)" in text


def test_run_report_of_an_sft_run_has_no_ratio_plot(sft_run, tmp_path):
    report = write_run_report(sft_run, tmp_path / "elsewhere")
    assert report == tmp_path / "elsewhere" / "report.md"
    assert sorted(p.name for p in report.parent.iterdir()) == ["loss.png", "report.md"]
    text = report.read_text()
    assert "ratio.png" not in text and "temperatures.png" not in text
    assert "| kind | SFT (no distillation terms) |" in text
    assert "| final ratio r | — |" in text
    assert "[metrics.jsonl](../sft-run/metrics.jsonl)" in text
    assert "final model: none" in text


def test_a_corrupt_run_writes_no_report(tmp_path, adakd_run):
    bad = _write_run(tmp_path / "bad", ADAKD_ROWS, extra_lines=["{oops"])
    with pytest.raises(ValueError, match=r"bad[/\\]metrics\.jsonl:6: "):
        write_comparison_report([adakd_run, bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_labels_are_folder_names_made_unique():
    assert run_labels(["x/a", "y/b/"]) == ["a", "b"]
    assert run_labels(["x/run", "y/run"]) == ["x/run", "y/run"]
    assert run_labels(["x/run", "x/run"]) == ["x/run #0", "x/run #1"]


# --- the CLI -----------------------------------------------------------------------------------------------------


def test_cli_one_run(adakd_run, capsys):
    assert _cli(str(adakd_run)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"report: {adakd_run / 'report' / 'report.md'}"
    assert out[1].startswith("adakd-run: AdaKD, 20 steps, final loss 0.4 (last 10%: 0.5), r 0.500")
    assert len(out) == 2
    assert (adakd_run / "report" / "ratio.png").is_file()


def test_cli_two_runs_make_one_combined_report(adakd_run, sft_run, tmp_path, capsys):
    out_dir = tmp_path / "combined"
    assert _cli(str(adakd_run), str(sft_run), "--output", str(out_dir)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"report: {out_dir / 'report.md'}"
    assert out[1].startswith("adakd-run: AdaKD") and out[2].startswith("sft-run: SFT")
    text = (out_dir / "report.md").read_text()
    assert text.startswith("# Training report: adakd-run vs sft-run\n")
    assert "|  | adakd-run | sft-run |" in text
    assert "| final loss | 0.4 | 2.5 |" in text
    assert "| final ratio r | 0.500 | — |" in text
    for name in ("loss.png", "ratio.png", "temperatures.png"):
        _assert_png(out_dir / name)
    assert not (adakd_run / "report").exists()


def test_cli_two_runs_default_to_a_folder_in_the_working_directory(adakd_run, sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cli(str(adakd_run), str(sft_run)) == 0
    assert (tmp_path / "adakd-report" / "report.md").is_file()


def test_cli_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"missing: no such run directory"):
        _cli(str(tmp_path / "missing"))
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    with pytest.raises(ValueError, match=r"not-a-run[/\\]metrics\.jsonl: no such file"):
        _cli(str(not_a_run))
    run = _write_run(tmp_path / "run", SFT_ROWS)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^--output: .*file exists and is not a directory"):
        _cli(str(run), "--output", str(tmp_path / "file"))
