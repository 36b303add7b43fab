"""``adakd compare`` and :mod:`adakd.eval.tables`: exact table text, labels, file errors, the CLI, the PNG chart."""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import pytest

from adakd.cli import compare as compare_cmd
from adakd.errors import InputError
from adakd.eval.tables import MINUS, compare_table, load_results, rouge_groups, summary_line, validate_results
from adakd.report.plots import plot_rouge

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _entry(mean: float, std: float | None, n: int = 500) -> dict:
    return {"n": n, "rougeL": {"mean": mean, "std": std, "per_seed": {"10": mean - 0.1, "20": mean + 0.1}}}


SFT = {
    "model": "gpt2-sft",
    "protocol": "paper",  # unknown keys are ignored
    "datasets": {"dolly": _entry(26.1, 0.3), "sinst": _entry(20.0, 0.5)},
    "average": {"mean": 23.05, "std": 0.2},
}
ADAKD = {
    "model": "gpt2-adakd",
    "generation": {"max_new_tokens": 256},
    "datasets": {"dolly": _entry(26.94, 0.25), "sinst": _entry(19.69, 0.4), "vicuna": _entry(17.5, 0.1)},
    "average": {"mean": 21.38, "std": 0.15},
}

EXPECTED = f"""\
| dataset | gpt2-sft | gpt2-adakd | Δ vs gpt2-sft |
| :--- | ---: | ---: | ---: |
| dolly | 26.10 ± 0.30 | 26.94 ± 0.25 | +0.84 |
| sinst | 20.00 ± 0.50 | 19.69 ± 0.40 | {MINUS}0.31 |
| vicuna | — | 17.50 ± 0.10 | — |
| average | 23.05 ± 0.20 | 21.38 ± 0.15 | {MINUS}1.67 |

Note: the averages are over different datasets (gpt2-sft lacks vicuna)."""


def _write(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adakd")
    compare_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(["compare", *argv])
    return args.handler(args)


# --- the table ---------------------------------------------------------------------------------------------------


def test_table_exact_text_with_deltas_missing_dataset_and_average():
    assert MINUS == "\u2212"
    assert compare_table([SFT, ADAKD]) == EXPECTED


def test_table_from_files_matches_dicts(tmp_path):
    results = [load_results(_write(tmp_path, "sft.json", SFT)), load_results(_write(tmp_path, "adakd.json", ADAKD))]
    assert compare_table(results) == EXPECTED


def test_table_baseline_not_first_gets_no_delta_column_of_its_own():
    table = compare_table([SFT, ADAKD], labels=["SFT", "AdaKD"], baseline=1)
    lines = table.splitlines()
    assert lines[0] == "| dataset | SFT | Δ vs AdaKD | AdaKD |"
    assert lines[2] == "| dolly | 26.10 ± 0.30 | \u22120.84 | 26.94 ± 0.25 |"
    assert lines[3] == "| sinst | 20.00 ± 0.50 | +0.31 | 19.69 ± 0.40 |"
    assert lines[5] == "| average | 23.05 ± 0.20 | +1.67 | 21.38 ± 0.15 |"


def test_table_single_file_same_datasets_and_edge_formats():
    other = copy.deepcopy(SFT)
    other["model"] = "other"
    other["datasets"]["dolly"]["rougeL"]["mean"] = 26.099  # rounds to a zero delta: "+0.00", never "−0.00"
    other["datasets"]["sinst"]["rougeL"]["std"] = None  # one seed: no spread
    assert compare_table([SFT]).splitlines() == [
        "| dataset | gpt2-sft |",
        "| :--- | ---: |",
        "| dolly | 26.10 ± 0.30 |",
        "| sinst | 20.00 ± 0.50 |",
        "| average | 23.05 ± 0.20 |",
    ]
    table = compare_table([SFT, other])
    assert "| dolly | 26.10 ± 0.30 | 26.10 ± 0.30 | +0.00 |" in table
    assert "| sinst | 20.00 ± 0.50 | 20.00 | +0.00 |" in table
    assert "Note:" not in table  # same datasets: the averages are comparable


def test_labels_default_to_model_and_are_disambiguated(tmp_path):
    a = load_results(_write(tmp_path, "a.json", SFT))
    b = load_results(_write(tmp_path, "b.json", SFT))
    header = compare_table([a, b]).splitlines()[0]
    assert header == "| dataset | gpt2-sft (a.json) | gpt2-sft (b.json) | Δ vs gpt2-sft (a.json) |"

    # Same file name in two folders: the path tells them apart.
    c = load_results(_write(tmp_path, "run1/results.json", SFT))
    d = load_results(_write(tmp_path, "run2/results.json", SFT))
    header = compare_table([c, d]).splitlines()[0]
    assert f"gpt2-sft ({tmp_path / 'run1/results.json'})" in header
    assert f"gpt2-sft ({tmp_path / 'run2/results.json'})" in header

    # Dicts not read from files, and the same file twice, fall back to the position.
    assert compare_table([SFT, SFT]).splitlines()[0].startswith("| dataset | gpt2-sft (#0) | gpt2-sft (#1) |")
    header = compare_table([a, a]).splitlines()[0]
    assert "gpt2-sft (a.json) #0" in header and "gpt2-sft (a.json) #1" in header


def test_labels_are_escaped_and_checked():
    assert compare_table([SFT], labels=["a|b"]).splitlines()[0] == "| dataset | a\\|b |"
    with pytest.raises(ValueError, match="labels: got 1 label"):
        compare_table([SFT, ADAKD], labels=["only-one"])
    with pytest.raises(ValueError, match="more than once"):
        compare_table([SFT, ADAKD], labels=["x", "x"])
    with pytest.raises(ValueError, match="baseline"):
        compare_table([SFT, ADAKD], baseline=2)
    with pytest.raises(ValueError, match="at least one"):
        compare_table([])


def test_summary_line():
    assert summary_line(SFT) == "gpt2-sft: dolly 26.10 ± 0.30, sinst 20.00 ± 0.50 | average 23.05 ± 0.20 (2 seeds)"


# --- malformed files ---------------------------------------------------------------------------------------------


def _broken(edit) -> dict:
    data = copy.deepcopy(SFT)
    edit(data)
    return data


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (_broken(lambda d: d.pop("model")), "'model'"),
        (_broken(lambda d: d.update(model=3)), "'model'"),
        (_broken(lambda d: d.pop("datasets")), "'datasets'"),
        (_broken(lambda d: d.update(datasets=[])), "'datasets'"),
        (_broken(lambda d: d.update(datasets={})), "'datasets'"),
        (_broken(lambda d: d["datasets"].update(dolly=26.1)), "'datasets.dolly'"),
        (_broken(lambda d: d["datasets"]["dolly"].pop("rougeL")), "'datasets.dolly.rougeL'"),
        (_broken(lambda d: d["datasets"]["dolly"]["rougeL"].pop("mean")), "'datasets.dolly.rougeL.mean'"),
        (_broken(lambda d: d["datasets"]["dolly"]["rougeL"].update(mean="26.1")), "'datasets.dolly.rougeL.mean'"),
        (_broken(lambda d: d["datasets"]["dolly"]["rougeL"].update(mean=True)), "'datasets.dolly.rougeL.mean'"),
        (_broken(lambda d: d["datasets"]["sinst"]["rougeL"].pop("std")), "'datasets.sinst.rougeL.std'"),
        (_broken(lambda d: d["datasets"]["sinst"]["rougeL"].update(std=[0.1])), "'datasets.sinst.rougeL.std'"),
        (_broken(lambda d: d["datasets"]["sinst"].update(n="500")), "'datasets.sinst.n'"),
        (_broken(lambda d: d["datasets"]["sinst"]["rougeL"]["per_seed"].update({"30": None})), "per_seed.30'"),
        (_broken(lambda d: d.pop("average")), "'average'"),
        (_broken(lambda d: d.update(average=23.05)), "'average'"),
        (_broken(lambda d: d["average"].pop("std")), "'average.std'"),
        ([SFT], "top level"),
    ],
)
def test_malformed_file_errors_name_file_and_key(tmp_path, data, key):
    path = _write(tmp_path, "bad.json", data)
    with pytest.raises(ValueError) as info:
        load_results(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert key in message


def test_unreadable_files(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(InputError, match="missing.json: cannot read"):
        load_results(missing)
    bad_json = _write(tmp_path, "truncated.json", '{"model": "x", "datasets": {')
    with pytest.raises(ValueError, match=r"truncated\.json: not valid JSON \(line 1"):
        load_results(bad_json)


def test_validate_names_the_source_for_in_memory_dicts():
    with pytest.raises(ValueError, match=r"^results #1: missing key 'average'$"):
        compare_table([SFT, _broken(lambda d: d.pop("average"))])
    assert validate_results(SFT) is SFT


# --- the CLI -----------------------------------------------------------------------------------------------------


def test_cli_prints_and_writes_table(tmp_path, capsys):
    a, b = _write(tmp_path, "sft.json", SFT), _write(tmp_path, "adakd.json", ADAKD)
    out = tmp_path / "tables" / "table.md"
    assert _run(str(a), str(b), "--output", str(out)) == 0
    assert capsys.readouterr().out == EXPECTED + "\n"
    assert out.read_text() == EXPECTED + "\n"

    assert _run(str(a), str(b), "--labels", "SFT, AdaKD", "--baseline", "1") == 0
    assert capsys.readouterr().out.splitlines()[0] == "| dataset | SFT | Δ vs AdaKD | AdaKD |"


def test_cli_plot_writes_a_png(tmp_path, capsys):
    a, b = _write(tmp_path, "sft.json", SFT), _write(tmp_path, "adakd.json", ADAKD)
    png = tmp_path / "plots" / "chart.png"
    assert _run(str(a), str(b), "--plot", str(png)) == 0
    assert capsys.readouterr().out == EXPECTED + "\n"
    assert png.read_bytes()[:8] == PNG_SIGNATURE

    from matplotlib.image import imread

    height, width, _channels = imread(png).shape
    assert 400 <= height <= 2000 and 600 <= width <= 4000


def test_rouge_chart_single_file_default_labels(tmp_path):
    png = tmp_path / "one.png"
    assert plot_rouge([SFT], None, png) == png
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_rouge_groups_leave_a_gap_for_a_missing_dataset():
    lacking = _broken(lambda d: d["datasets"].pop("sinst"))
    names, bars = rouge_groups([SFT, lacking], ["a", "b"])
    assert names == ["dolly", "sinst", "average"]
    assert bars[0] == ("a", [26.1, 20.0, 23.05], [0.3, 0.5, 0.2])
    label, means, stds = bars[1]
    assert label == "b" and means[0] == 26.1 and math.isnan(means[1]) and stds[1] == 0.0


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--labels", "only-one"], r"^--labels: got 1 label\(s\) for 2 results file\(s\)$"),
        (["--labels", "A,"], r"^--labels: empty label"),
        (["--labels", "A,A"], r"^--labels: label 'A' is given more than once$"),
        (["--baseline", "2"], r"^--baseline: index 2 is out of range"),
        (["--baseline", "-1"], r"^--baseline: index -1 is out of range"),
    ],
)
def test_cli_flag_errors_name_the_flag(tmp_path, extra, match):
    a, b = _write(tmp_path, "sft.json", SFT), _write(tmp_path, "adakd.json", ADAKD)
    with pytest.raises(ValueError, match=match):
        _run(str(a), str(b), *extra)


def test_cli_file_errors_and_no_partial_outputs(tmp_path, capsys):
    a = _write(tmp_path, "sft.json", SFT)
    bad = _write(tmp_path, "bad.json", _broken(lambda d: d["datasets"]["dolly"].pop("rougeL")))
    out, png = tmp_path / "table.md", tmp_path / "chart.png"
    with pytest.raises(ValueError, match=rf"^{bad}: missing key 'datasets\.dolly\.rougeL'$"):
        _run(str(a), str(bad), "--output", str(out), "--plot", str(png))
    with pytest.raises(InputError, match="nope.json: cannot read"):
        _run(str(a), str(tmp_path / "nope.json"))
    assert not out.exists() and not png.exists()
    assert capsys.readouterr().out == ""

    with pytest.raises(ValueError, match="^--output: .* is one of the results files"):
        _run(str(a), "--output", str(a))
    assert json.loads(a.read_text()) == SFT


def test_cli_needs_at_least_one_file(capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["compare"])
    assert info.value.code == 2
    assert "RESULTS.json" in capsys.readouterr().err
