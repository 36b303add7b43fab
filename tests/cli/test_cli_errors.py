"""The command line's error contract: bad input is one line and exit 2, adakd's other errors one line and exit 1,
and anything else is a bug that keeps its traceback."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

import adakd.data  # noqa: E402
from adakd import AdaKDLoss  # noqa: E402
from adakd.cli import main  # noqa: E402
from adakd.errors import InputError, NonFiniteLossError  # noqa: E402
from adakd.models import load_causal_lm  # noqa: E402

from ..faults.common import TINY, cli, one_line_error  # noqa: E402


def _train(tmp_path, *overrides: str) -> list[str]:
    base = [f"training.output_dir={tmp_path / 'out'}", "training.max_steps=1", "training.disable_tqdm=true"]
    return ["train", str(TINY), *base, *overrides]


@pytest.mark.parametrize("bug", [ValueError("an internal invariant broke"), KeyError("input_ids")])
def test_an_internal_bug_is_not_turned_into_an_input_error(tmp_path, monkeypatch, capsys, bug):
    """A ValueError or KeyError from adakd's own code is a bug: it propagates (traceback), not exit 2."""

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(adakd.data, "build_examples", broken)  # what `adakd train` calls to tokenise the data
    with pytest.raises(type(bug)) as info:
        main(_train(tmp_path))
    assert info.value is bug
    assert "adakd: error:" not in capsys.readouterr().err


def test_an_input_error_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    def bad_input(*args, **kwargs):
        raise InputError("data.jsonl:3: invalid JSON\n(a second line that is not shown)")

    monkeypatch.setattr(adakd.data, "build_examples", bad_input)
    line = one_line_error(*cli(capsys, *_train(tmp_path)))
    assert line == "adakd: error: data.jsonl:3: invalid JSON"


def test_a_nonfinite_loss_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    """Not the user's input (the run diverged), but not a bug either: one line, exit 1; --debug shows the
    traceback."""

    def nonfinite(*args, **kwargs):
        raise NonFiniteLossError("non-finite AdaKD loss")

    monkeypatch.setattr(AdaKDLoss, "forward", nonfinite)
    monkeypatch.setattr(AdaKDLoss, "forward_hidden", nonfinite)  # loss.fused: auto takes the fused path here
    code, err = cli(capsys, *_train(tmp_path))
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("adakd: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("adakd: error: step 1: non-finite loss (NaN or inf)") and "loss.nonfinite: skip" in err
    with pytest.raises(NonFiniteLossError, match="^step 1: non-finite loss"):
        main(["--debug", *_train(tmp_path, "--overwrite")])


@pytest.mark.parametrize("source", ["minillm_jsonl", "instructions", "shards"])
def test_a_missing_data_file_names_the_key_and_the_path(tmp_path, capsys, source):
    gone = tmp_path / "gone"
    line = one_line_error(*cli(capsys, *_train(tmp_path, f"data.source={source}", f"data.path={gone}")))
    missing = f"{gone}.idx" if source == "shards" else str(gone)
    assert line == f"adakd: error: data.path: {missing}: no such file"


def test_a_dataset_that_cannot_load_names_the_key_and_the_path(tmp_path, capsys):
    pytest.importorskip("datasets")
    gone = tmp_path / "gone.jsonl"
    line = one_line_error(*cli(capsys, *_train(tmp_path, "data.source=hf", f"data.path=json:{gone}")))
    assert line.startswith(f"adakd: error: data.path: json:{gone} (train): cannot load (")


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_model_path_that_does_not_exist_names_the_key_and_the_path(tmp_path, capsys, role):
    gone = tmp_path / "no-model"
    line = one_line_error(*cli(capsys, *_train(tmp_path, f"{role}.config=null", f"{role}.name_or_path={gone}")))
    assert line == f"adakd: error: {role}.name_or_path: cannot load '{gone}' (no such folder)"


def test_a_model_folder_without_a_config_names_the_key_and_the_path(tmp_path, capsys):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    line = one_line_error(*cli(capsys, *_train(tmp_path, "student.config=null", f"student.name_or_path={empty}")))
    assert line.startswith(f"adakd: error: student.name_or_path: cannot load '{empty}' (")


def test_a_tokenizer_path_that_does_not_exist_names_the_key_and_the_path(tmp_path, capsys):
    gone = tmp_path / "no-tokenizer"
    line = one_line_error(*cli(capsys, *_train(tmp_path, f"student.tokenizer={gone}")))
    assert line == f"adakd: error: student.tokenizer: {gone}: cannot load the tokenizer (no such folder)"


def test_lora_target_modules_that_match_nothing_name_the_key(tmp_path, capsys):
    pytest.importorskip("peft")
    line = one_line_error(*cli(capsys, *_train(tmp_path, "student.lora={target_modules: [no_such_layer]}")))
    assert line.startswith("adakd: error: student.lora: ") and "no_such_layer" in line


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.template=chatml", "data.template: unknown template 'chatml'; valid: minillm, qwen2"),
        ("data.limit=-1", "data.limit: must be >= 0, got -1"),
        ("data.synthetic_size=-5", "data.synthetic_size: must be >= 0, got -5"),
    ],
)
def test_data_values_are_checked_by_key(tmp_path, capsys, override, expected):
    line = one_line_error(*cli(capsys, *_train(tmp_path, override)))
    assert line == f"adakd: error: {TINY}: {expected}"


def test_load_causal_lm_names_the_flag_and_chains_the_cause(tmp_path):
    gone = tmp_path / "no-model"
    with pytest.raises(InputError, match=f"^--model {gone}: cannot load \\(no such folder\\)$") as info:
        load_causal_lm(str(gone))
    assert isinstance(info.value.__cause__, OSError)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"^--student {empty}: cannot load \\(") as info:
        load_causal_lm(str(empty), name="--student")
    assert info.value.__cause__ is not None


def test_a_bad_record_reaches_the_cli_with_its_file_and_line(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "p", "output": "o"}) + "\n{not json\n")
    line = one_line_error(*cli(capsys, *_train(tmp_path, "data.source=minillm_jsonl", f"data.path={path}")))
    assert line.startswith(f"adakd: error: {path}:2: invalid JSON")
