"""Bad input reaches the user as one line naming the file and line, the key or the flag (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adakd.data import read_instruction_jsonl, read_minillm_jsonl
from adakd.errors import InputError
from adakd.train import build_trainer
from adakd.train.config import ConfigError
from adakd.train.inputs import check_tokenizers

from .common import TINY, cli, cli_subprocess, one_line_error, tiny


def _train(capsys, tmp_path, *overrides: str) -> str:
    return one_line_error(*cli(capsys, "train", str(TINY), f"training.output_dir={tmp_path / 'out'}", *overrides))


def test_missing_config_file(capsys, tmp_path):
    line = one_line_error(*cli(capsys, "train", str(tmp_path / "nope.yaml")))
    assert "nope.yaml: cannot read" in line


def test_missing_data_file(capsys, tmp_path):
    line = _train(capsys, tmp_path, "data.source=minillm_jsonl", f"data.path={tmp_path / 'gone.jsonl'}")
    assert "data.path:" in line and "gone.jsonl: no such file" in line


def test_unreadable_data_file(capsys, tmp_path):
    folder = tmp_path / "adir.jsonl"
    folder.mkdir()  # a directory where a file is expected (chmod does not stop root)
    line = _train(capsys, tmp_path, "data.source=minillm_jsonl", f"data.path={folder}")
    assert f"data.path: {folder}: cannot read (Is a directory)" in line


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "a", "output": "b"}\n{"prompt": "a", "output": \n', ":2: invalid JSON"),
        ('{"prompt": "a", "output": "b"}\n\n[1, 2]\n', ":3: expected a JSON object"),
        ('{"prompt": "a", "output": ""}\n', ":1: key 'output': empty response"),
        ('{"prompt": "a", "output": ["  ", "x"]}\n', ":1: key 'output': empty response"),
        ('{"prompt": "a"}\n', ":1: missing key 'output'"),
    ],
)
def test_bad_jsonl_line_names_path_and_line(capsys, tmp_path, content, expected):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=f"^{path}{expected}"):
        read_minillm_jsonl(path)
    line = _train(capsys, tmp_path, "data.source=minillm_jsonl", f"data.path={path}")
    assert f"{path}{expected}" in line


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"instruction": "a", "response": "b"}\n{"instruction": "\xff"}\n')
    with pytest.raises(InputError, match=f"^{path}:2: not UTF-8"):
        read_instruction_jsonl(path)


def test_instruction_record_without_response(tmp_path):
    path = tmp_path / "inst.jsonl"
    path.write_text(json.dumps({"instruction": "a", "response": "   "}) + "\n")
    with pytest.raises(InputError, match=r":1: key 'response': empty response"):
        read_instruction_jsonl(path)


def test_unknown_key_suggests(capsys, tmp_path):
    line = _train(capsys, tmp_path, "loss.selecton=fixed")
    assert "loss.selecton: unknown key (did you mean 'selection'?); valid:" in line
    line = _train(capsys, tmp_path, "trainig.max_steps=3")
    assert "trainig: unknown key (did you mean 'training'?)" in line


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("loss.ratio=1.5", "loss.ratio: must be in (0, 1]"),
        ("loss.ratio=0", "loss.ratio: must be in (0, 1]"),
        ("loss.min_ratio=-0.1", "loss.min_ratio: must be in (0, 1]"),
        ("loss.max_ratio=2", "loss.max_ratio: must be in (0, 1], got 2.0"),
        ("loss.min_ratio=0.5", None),  # valid: r_min 0.5 <= r_max 1
        ("loss.max_ratio=0.05", "loss.max_ratio: (0.05) must be >= min_ratio (0.1)"),
        ("loss.c=-1", "loss.c: must be a number in [0, 10]"),
        ("loss.c=50", "loss.c: must be a number in [0, 10]"),
        ("loss.tau_base=0", "loss.tau_base: must be a positive finite number"),
        ("loss.tau_base=-2", "loss.tau_base: must be a positive finite number"),
        ("loss.base_params={lam: 1.5}", "loss.base_params: unknown parameter(s) lam for 'rkl'; valid: none"),
        ("loss.base=sfkl", None),
        ("loss.base=sfkl loss.base_params={lam: 1.5}", "loss.base_params.lam: must be in [0, 1], got 1.5"),
        ("loss.base=jsd loss.base_params={lam: 1.0}", "loss.base_params.lam: must be in (0, 1) for jsd"),
        ("loss.selection=fixd", "loss.selection: unknown 'fixd'; valid: latf, fixed"),
        ("loss.ema_decay=1.5", "loss.ema_decay: must be in [0, 1), got 1.5"),
        ("loss.one_pass=true loss.detach_tau=false", "loss.detach_tau: false needs one_pass off"),
        ("loss.kd_ratio=2", "loss.kd_ratio: must be in [0, 1]"),
        ("loss.nonfinite=ignore", "loss.nonfinite: unknown policy 'ignore'; valid: error, skip"),
        ("onpolicy.mode=gkd", None),  # valid: no error from the config
    ],
)
def test_out_of_range_values_name_the_key(tmp_path, override, key):
    """Each value is checked once, where it is used (the loss's constructor for the loss's options), and the
    config names the dotted key."""
    overrides = override.split(" loss.")
    overrides = [overrides[0], *(f"loss.{o}" for o in overrides[1:])]
    if key is None:
        tiny(tmp_path, *overrides)
        return
    with pytest.raises(ConfigError) as info:
        tiny(tmp_path, *overrides)
    message = str(info.value)
    assert "\n" not in message and str(TINY) in message and key in message, message


def test_out_of_range_reaches_cli_as_one_line(capsys, tmp_path):
    line = _train(capsys, tmp_path, "onpolicy.mode=gkd", "onpolicy.temperature=0")
    assert "onpolicy.temperature: must be > 0" in line


def test_top_level_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        from adakd.train import load_config

        load_config(bad)


def _other_tokenizer(folder):
    from adakd.data.examples import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_tokens(["<not-in-the-student>"])
    tok.save_pretrained(folder)
    return folder


def test_tokenizer_mismatch(capsys, tmp_path):
    other = _other_tokenizer(tmp_path / "tok")
    line = _train(capsys, tmp_path, f"teacher.tokenizer={other}")
    assert "teacher.tokenizer: the teacher's vocabulary (258 tokens) differs from the student's (257" in line
    assert "loss.allow_tokenizer_mismatch" in line
    config = tiny(tmp_path, f"teacher.tokenizer={other}", "loss.allow_tokenizer_mismatch=true")
    from adakd.data.examples import byte_tokenizer

    check_tokenizers(config.teacher, config.loss, byte_tokenizer())  # allowed: no error


def test_vocabulary_crop_that_drops_real_tokens(capsys, tmp_path):
    line = _train(capsys, tmp_path, "teacher.config.vocab_size=200")
    assert "teacher: the student's vocabulary (288) is larger than the teacher's (200)" in line


def test_output_dir_not_creatable(capsys, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    config = tiny(tmp_path, f"training.output_dir={blocker / 'run'}")
    with pytest.raises(ConfigError, match=r"training.output_dir: .*file.txt/run: not writable"):
        build_trainer(config)
    line = one_line_error(*cli(capsys, "train", str(TINY), f"training.output_dir={blocker / 'run'}"))
    assert "not writable" in line


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = cli_subprocess("train", str(TINY), "loss.selecton=fixed")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    proc = cli_subprocess("--debug", "train", str(TINY), "loss.selecton=fixed")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_a_second_run_into_the_same_output_dir_is_refused_and_changes_nothing(capsys, tmp_path):
    out = tmp_path / "out"
    args = ("train", str(TINY), f"training.output_dir={out}", "training.max_steps=2", "training.save_steps=1")
    assert cli(capsys, *args)[0] == 0
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    metrics = (out / "metrics.jsonl").read_text()
    line = one_line_error(*cli(capsys, *args))
    assert f"training.output_dir: {out} already holds a run (checkpoint-1, checkpoint-2, final, metrics.jsonl)" in line
    assert "--resume" in line and "--overwrite" in line
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # --overwrite starts over: the earlier run's metrics are gone, not appended to.
    assert cli(capsys, *args, "--overwrite")[0] == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(metrics.splitlines()) and sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2",
    ]  # fmt: skip
    line = one_line_error(*cli(capsys, *args, "--overwrite", "--resume"))
    assert "--resume and --overwrite: give one" in line


@pytest.mark.parametrize(
    "bad",
    [
        ("data.source=hf", "data.path=does/not/exist.jsonl"),  # refused while the data loads
        ("student.config=null", "student.tokenizer=null", "student.name_or_path=does/not/exist"),  # while models load
    ],
)
def test_overwrite_keeps_the_earlier_run_when_the_new_one_is_refused(capsys, tmp_path, bad):
    """--overwrite deletes the earlier run only once the new run's data and models have loaded: a typo in a path
    must not cost the user their checkpoints, final model and metrics."""
    out = tmp_path / "out"
    args = ("train", str(TINY), f"training.output_dir={out}", "training.max_steps=2", "training.save_steps=1")
    assert cli(capsys, *args)[0] == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    one_line_error(*cli(capsys, *args, *bad, "--overwrite"))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_resuming_a_finished_run_says_so_and_changes_nothing(capsys, tmp_path):
    out = tmp_path / "out"
    args = ("train", str(TINY), f"training.output_dir={out}", "training.logging_steps=1", "training.max_steps=2",
            "training.save_steps=1")  # fmt: skip
    assert cli(capsys, *args)[0] == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = one_line_error(*cli(capsys, *args, "--resume"))
    assert (
        f"--resume: {out / 'checkpoint-2'} is at step 2, the end of the run (training.max_steps gives 2 steps)" in line
    )
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the same run made longer continues from there
    assert cli(capsys, *args[:-2], "training.max_steps=3", "training.save_steps=1", "--resume")[0] == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps[-1] == 3 and (out / "checkpoint-3").is_dir()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("training.learning_rate=-0.05", "training.learning_rate: must be a number >= 0, got -0.05"),
        ("training.weight_decay=-1", "training.weight_decay: must be a number >= 0, got -1"),
        ("data.max_length=128", "data.max_length: need max_length > max_prompt_length >= 1, got max_length 128 and "
                                "max_prompt_length 256 (its default when unset: set data.max_prompt_length too)"),
    ],
)  # fmt: skip
def test_values_torch_would_refuse_late_are_refused_at_load(capsys, tmp_path, override, expected):
    line = one_line_error(*cli(capsys, "train", str(TINY), f"training.output_dir={tmp_path / 'o'}", override))
    assert expected in line
    assert not (tmp_path / "o").exists()  # refused before anything was written or loaded


def test_an_unset_variable_in_a_path_is_an_error_naming_it(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("ADAKD_NOT_SET", raising=False)
    line = one_line_error(*cli(capsys, "train", str(TINY), "training.output_dir=${ADAKD_NOT_SET}/run"))
    assert "tiny-cpu.yaml: training.output_dir: $ADAKD_NOT_SET is not set (in '${ADAKD_NOT_SET}/run')" in line
    assert not (Path.cwd() / "${ADAKD_NOT_SET}").exists()  # nothing was created under the literal name
    monkeypatch.setenv("ADAKD_SET", str(tmp_path))
    config = tiny(
        tmp_path, "training.output_dir=$ADAKD_SET/run", "data.source=minillm_jsonl", "data.path=${ADAKD_SET}/d"
    )
    assert config.training["output_dir"] == f"{tmp_path}/run" and config.data.path == f"{tmp_path}/d"
    with pytest.raises(ConfigError, match=r"data.path: \$NOPE_X is not set"):
        tiny(tmp_path, "data.source=minillm_jsonl", "data.path=$NOPE_X/d.jsonl")


def test_loss_ratio_under_latf_is_refused_naming_max_ratio(capsys, tmp_path):
    line = _train(capsys, tmp_path, "loss.ratio=0.5")  # the tiny config uses selection: latf
    assert "loss.ratio: applies to selection 'fixed', 'linear' and 'cosine'; LATF starts at max_ratio" in line
    assert tiny(tmp_path, "loss.selection=fixed", "loss.ratio=0.5").build_loss(total_steps=4).ratio == 0.5


@pytest.mark.parametrize(("command", "extras"), [("train", "train"), ("demo", "train,eval")])
def test_a_missing_extra_is_named_in_one_line(capsys, tmp_path, monkeypatch, command, extras):
    import builtins

    real_import = builtins.__import__

    def no_yaml(name, *args, **kwargs):  # as after `pip install adakd`, without the extras
        if name == "yaml" or name.startswith("yaml."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_yaml)
    for module in [m for m in __import__("sys").modules if m == "yaml" or m.startswith(("yaml.", "adakd.train"))]:
        monkeypatch.delitem(__import__("sys").modules, module)
    argv = [command, str(TINY)] if command == "train" else [command, "--quick", "--output", str(tmp_path / "d")]
    line = one_line_error(*cli(capsys, *argv))
    assert line == f"adakd: error: adakd {command} needs the Python module 'yaml', which is not installed: " + (
        f"pip install 'adakd[{extras}]'"
    )


# A fresh interpreter in which every third-party module but torch (and what torch itself needs) is missing, as after
# a bare `pip install adakd`; each command must still end in its one line.
TORCH_ONLY = """
import importlib.abc, importlib.metadata, re, sys

torch_needs = {re.split(r"[ ;<>=!~\\[]", r)[0].lower().replace("-", "_") for r in importlib.metadata.requires("torch")}
allowed = set(sys.stdlib_module_names) | {"adakd", "torch", "torchgen", "functorch", "_distutils_hack"} | torch_needs


class TorchOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in allowed:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, TorchOnly())
from adakd.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("argv", "extras"),
    [
        (["train", str(TINY)], "train"),
        (["cache", str(TINY), "--output", "{tmp}/cache"], "train"),
        (["demo", "--quick", "--output", "{tmp}/demo"], "train,eval"),
        (["inspect", "--teacher", "t", "--student", "s", "--text", "x", "--output", "{tmp}/t.html"], "train,eval"),
    ],
)
def test_every_command_names_its_extra_when_only_torch_is_installed(tmp_path, argv, extras):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = subprocess.run([sys.executable, "-c", TORCH_ONLY, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr  # the whole stderr is the one line
    assert out.stderr.startswith(f"adakd: error: adakd {argv[0]} needs the Python module "), out.stderr
    assert out.stderr.rstrip().endswith(f"pip install 'adakd[{extras}]'"), out.stderr
    assert not (tmp_path / "cache").exists()


def test_the_losses_and_help_work_when_only_torch_is_installed():
    code = TORCH_ONLY.replace("sys.exit(main(sys.argv[1:]))", "")
    code += """
import contextlib, io
import torch
from adakd import AdaKDLoss

s = torch.randn(2, 5, 11, requires_grad=True)
loss = AdaKDLoss()(s, torch.randn(2, 5, 11), torch.ones(2, 5).long())
loss.backward()
buf = io.StringIO()
with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
    main(["--help"])
print(bool(torch.isfinite(loss)), bool(torch.isfinite(s.grad).all()), "COMMAND" in buf.getvalue())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.split() == ["True", "True", "True"], out.stdout
