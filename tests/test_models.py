"""Model loading options: from_pretrained arguments (model_kwargs, tokenizer revision), bitsandbytes quantisation
(the config reaching from_pretrained, the up-front refusals, and, where bitsandbytes is installed, a real 4-bit
teacher and QLoRA student), and LoRA-adapted teachers merged once at load."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from adakd.errors import InputError  # noqa: E402
from adakd.models import load_causal_lm  # noqa: E402
from adakd.train import build_trainer, load_config  # noqa: E402
from adakd.train import models as train_models  # noqa: E402
from adakd.train.config import ConfigError, ModelSection  # noqa: E402
from adakd.train.inputs import load_tokenizer  # noqa: E402
from adakd.train.models import check_quantization_backend, load_model, prepare_teacher, tokenizer_kwargs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
# The tiny teacher of configs/tiny-cpu.yaml, as a pretrained folder.
TEACHER = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
)  # fmt: skip
IDS = torch.tensor([[5, 17, 99, 200, 3, 45, 66, 7], [1, 2, 250, 4, 120, 6, 31, 8]])


def _save_model(folder: Path, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **TEACHER)).save_pretrained(folder)
    return folder


def _save_adapter(base: Path, folder: Path) -> Path:
    """A LoRA adapter on ``base`` whose B matrices are random (PEFT's default B = 0 would make the merge a no-op)."""
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


class _Recorder:
    """Wraps ``AutoModelForCausalLM.from_pretrained``: records each call's path and keyword arguments, then calls
    the real loader."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, dict]] = []
        real = AutoModelForCausalLM.from_pretrained.__func__

        def wrapper(cls, path, *args, **kwargs):
            self.calls.append((str(path), dict(kwargs)))
            return real(cls, path, *args, **kwargs)

        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(wrapper))


def _config(tmp_path: Path, *overrides: str):
    base = [f"training.output_dir={tmp_path / 'run'}", "training.disable_tqdm=true", "data.synthetic_size=16"]
    return load_config(TINY, [*base, *overrides])


def _error(tmp_path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, *overrides)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------- model_kwargs


def test_model_kwargs_reach_from_pretrained_and_take_effect(tmp_path, monkeypatch):
    folder = _save_model(tmp_path / "teacher")
    recorder = _Recorder(monkeypatch)
    config = _config(
        tmp_path,
        "teacher.config=null",
        f"teacher.name_or_path={folder}",
        "teacher.model_kwargs={attn_implementation: eager, revision: main, low_cpu_mem_usage: true}",
    )
    model = load_model(config.teacher, "teacher")
    assert recorder.calls == [
        (str(folder), {"dtype": torch.float32, "attn_implementation": "eager", "revision": "main",
                       "low_cpu_mem_usage": True}),
    ]  # fmt: skip
    assert model.config._attn_implementation == "eager"
    default = load_model(ModelSection(name_or_path=str(folder)), "teacher")
    assert default.config._attn_implementation != "eager"  # so the argument, not a default, chose it


def test_model_kwargs_reach_an_inline_config():
    section = ModelSection(config={"model_type": "qwen2", **TEACHER}, seed=1)
    assert load_model(section, "teacher").config._attn_implementation != "eager"
    section.model_kwargs = {"attn_implementation": "eager"}
    eager = load_model(section, "teacher")
    assert eager.config._attn_implementation == "eager"
    plain = load_model(ModelSection(config={"model_type": "qwen2", **TEACHER}, seed=1), "teacher")
    assert torch.allclose(_logits(eager), _logits(plain), atol=1e-5)  # same seed, same weights


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("student.model_kwargs={dtype: bfloat16}", "student.model_kwargs.dtype: adakd sets it from student.dtype"),
        ("teacher.model_kwargs={torch_dtype: float16}", "teacher.model_kwargs.torch_dtype: adakd sets it from "
                                                        "teacher.dtype: set teacher.dtype instead"),
        ("teacher.model_kwargs={load_in_4bit: true}", "teacher.model_kwargs.load_in_4bit: adakd sets it from "
                                                      "teacher.quantization"),
        ("teacher.model_kwargs={device_map: auto}", "teacher.model_kwargs.device_map: adakd places the models"),
        ("student.model_kwargs={revision: v1}", "student.model_kwargs.revision: applies to a pretrained model "
                                                "(name_or_path); an inline config takes only attn_implementation"),
        ("teacher.adapter=some/adapter", "teacher.adapter: applies to a pretrained model (name_or_path)"),
        ("teacher.quantization={load_in_8bit: true}", "teacher.quantization: applies to a pretrained model"),
        ("teacher.license=mit", "teacher.license: the model card describes the student: set student.license"),
        ("student.tokenizer_revision=v2", "student.tokenizer_revision: the built-in byte tokenizer has no revision"),
    ],
)  # fmt: skip
def test_loading_keys_are_checked_by_key(tmp_path, override, expected):
    assert f"{TINY}: {expected}" in _error(tmp_path, override)


def test_tokenizer_revision_follows_the_model_unless_the_tokenizer_is_elsewhere():
    own = ModelSection(name_or_path="org/model", model_kwargs={"revision": "abc", "trust_remote_code": True})
    assert tokenizer_kwargs(own) == {"revision": "abc", "trust_remote_code": True}
    elsewhere = ModelSection(name_or_path="org/model", tokenizer="org/tok", model_kwargs={"revision": "abc"})
    assert tokenizer_kwargs(elsewhere) == {}
    elsewhere.tokenizer_revision = "t1"
    assert tokenizer_kwargs(elsewhere) == {"revision": "t1"}
    own.tokenizer_revision = "t2"
    assert tokenizer_kwargs(own)["revision"] == "t2"
    assert tokenizer_kwargs(ModelSection(name_or_path="org/model")) == {}


def test_the_tokenizer_revision_reaches_from_pretrained(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from adakd.data.examples import byte_tokenizer

    folder = tmp_path / "tok"
    byte_tokenizer().save_pretrained(folder)
    calls = []
    real = AutoTokenizer.from_pretrained.__func__

    def wrapper(cls, path, *args, **kwargs):
        calls.append((str(path), dict(kwargs)))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(wrapper))
    config = _config(tmp_path, f"student.tokenizer={folder}", "student.tokenizer_revision=main")
    assert len(load_tokenizer(config.student)) == 257
    assert calls == [(str(folder), {"revision": "main"})]


# ---------------------------------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize(
    ("quantization", "expected"),
    [
        ("{load_in_4bit: true, bnb_4bit_compute_dtyp: bfloat16}",
         "teacher.quantization.bnb_4bit_compute_dtyp: unknown BitsAndBytesConfig argument (did you mean "
         "'bnb_4bit_compute_dtype'?)"),
        ("{bnb_4bit_quant_type: nf4}", "teacher.quantization: set exactly one of load_in_4bit: true and load_in_8bit"),
        ("{load_in_4bit: true, load_in_8bit: true}", "teacher.quantization: set exactly one of load_in_4bit"),
        ("{load_in_4bit: yes}", "teacher.quantization.load_in_4bit: expected true or false, got 'yes'"),
        ("{load_in_4bit: true, bnb_4bit_compute_dtype: bf16}",
         "teacher.quantization.bnb_4bit_compute_dtype: unknown dtype 'bf16'; valid: float32, float16, bfloat16"),
        ("{load_in_8bit: true, llm_int8_threshold: high}", "teacher.quantization: llm_int8_threshold must be a float"),
    ],
)  # fmt: skip
def test_quantization_is_checked_by_key(tmp_path, quantization, expected):
    message = _error(
        tmp_path, "teacher.config=null", "teacher.name_or_path=org/teacher", f"teacher.quantization={quantization}"
    )
    assert f"{TINY}: {expected}" in message


def test_a_quantised_student_needs_lora(tmp_path):
    args = ["student.config=null", "student.name_or_path=org/student", "student.quantization={load_in_4bit: true}"]
    assert "student.quantization: a quantised student trains LoRA adapters on its frozen base (QLoRA): set " \
           "student.lora" in _error(tmp_path, *args)  # fmt: skip
    _config(tmp_path, *args, "student.lora=true")  # with LoRA: valid


def _fake_bnb(monkeypatch, version: str, devices: set[str]) -> None:
    fake = types.ModuleType("bitsandbytes")
    fake.__version__ = version
    fake.supported_torch_devices = devices
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)


def test_the_backend_check_says_what_is_missing(monkeypatch):
    section = ModelSection(name_or_path="org/teacher", quantization={"load_in_4bit": True})
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now fails, installed or not
    with pytest.raises(ConfigError) as info:
        check_quantization_backend(section, "teacher", "cpu")
    assert str(info.value) == (
        "teacher.quantization: 4-bit loading needs bitsandbytes >= 0.46.1, which is not installed: "
        "pip install 'bitsandbytes>=0.46.1'"
    )
    _fake_bnb(monkeypatch, "0.45.0", {"cuda", "cpu"})
    section.quantization = {"load_in_8bit": True}
    with pytest.raises(ConfigError, match=r"^teacher.quantization: 8-bit loading needs bitsandbytes >= 0\.46\.1; "
                                          r"0\.45\.0 is installed: pip install -U bitsandbytes$"):  # fmt: skip
        check_quantization_backend(section, "teacher", "cpu")
    _fake_bnb(monkeypatch, "0.47.0", {"cuda"})
    with pytest.raises(ConfigError) as info:
        check_quantization_backend(section, "student", torch.device("cpu"))
    assert str(info.value) == "student.quantization: bitsandbytes 0.47.0 runs on cuda, not on this run's device (cpu)"
    _fake_bnb(monkeypatch, "0.47.0", {"cuda", "cpu"})
    check_quantization_backend(section, "teacher", "cpu")  # supported: no error
    check_quantization_backend(ModelSection(name_or_path="x"), "teacher", "cpu")  # nothing quantised


def test_a_run_refuses_quantisation_it_cannot_load_before_loading_any_model(tmp_path, monkeypatch, capsys):
    from tests.faults.common import cli, one_line_error

    folder = _save_model(tmp_path / "teacher")
    recorder = _Recorder(monkeypatch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    line = one_line_error(
        *cli(
            capsys,
            "train",
            str(TINY),
            f"training.output_dir={tmp_path / 'run'}",
            "teacher.config=null",
            f"teacher.name_or_path={folder}",
            "teacher.quantization={load_in_4bit: true, bnb_4bit_compute_dtype: float32}",
        )
    )
    assert line == (
        "adakd: error: teacher.quantization: 4-bit loading needs bitsandbytes >= 0.46.1, which is not installed: "
        "pip install 'bitsandbytes>=0.46.1'"
    )
    assert recorder.calls == []  # refused before any model was read


def test_the_quantization_config_reaching_from_pretrained(tmp_path, monkeypatch):
    folder = _save_model(tmp_path / "teacher")
    recorder = _Recorder(monkeypatch)
    options = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_type": "nf4",
               "bnb_4bit_use_double_quant": True}  # fmt: skip
    section = ModelSection(
        name_or_path=str(folder), quantization=options, model_kwargs={"attn_implementation": "eager"}
    )
    if HAS_BNB:
        model = load_model(section, "teacher", device="cpu")
        import bitsandbytes as bnb

        assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    else:
        # The loader past adakd's own check: transformers then needs bitsandbytes, which is why the check exists.
        monkeypatch.setattr(train_models, "check_quantization_backend", lambda *args: None)
        with pytest.raises(ImportError, match="bitsandbytes"):
            load_model(section, "teacher", device="cpu")
    ((path, kwargs),) = recorder.calls
    assert path == str(folder)
    assert set(kwargs) == {"dtype", "attn_implementation", "quantization_config", "device_map"}
    assert kwargs["dtype"] == torch.float32 and kwargs["attn_implementation"] == "eager"
    assert kwargs["device_map"] == {"": torch.device("cpu")}
    expected = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
    )  # fmt: skip
    assert isinstance(kwargs["quantization_config"], BitsAndBytesConfig)
    assert kwargs["quantization_config"].to_dict() == expected.to_dict()


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_a_4bit_teacher_and_a_qlora_student_train(tmp_path):
    import bitsandbytes as bnb

    teacher_dir = _save_model(tmp_path / "teacher", seed=1)
    student_dir = tmp_path / "student"
    torch.manual_seed(2)
    student_cfg = {**TEACHER, "hidden_size": 32, "intermediate_size": 64, "vocab_size": 288}
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **student_cfg)).save_pretrained(student_dir)
    config = _config(
        tmp_path,
        "teacher.config=null",
        f"teacher.name_or_path={teacher_dir}",
        "teacher.quantization={load_in_4bit: true, bnb_4bit_compute_dtype: float32, bnb_4bit_quant_type: nf4}",
        "student.config=null",
        f"student.name_or_path={student_dir}",
        "student.quantization={load_in_4bit: true, bnb_4bit_compute_dtype: float32}",
        "student.lora={r: 4, alpha: 8, dropout: 0.0}",
        "training.max_steps=3",
        "training.save_strategy=no",
        "training.logging_steps=1",
    )
    trainer = build_trainer(config)
    teacher = trainer.teacher
    assert isinstance(teacher.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    full = AutoModelForCausalLM.from_pretrained(teacher_dir)
    ref, quantised = _logits(full), _logits(teacher)
    # nf4 keeps the logits close to the float teacher's (a quantisation error, not another model).
    assert (quantised - ref).abs().max() < 0.2 * ref.abs().max()
    assert (quantised - ref).abs().max() > 0  # it is quantised
    base = trainer.model.get_base_model()
    assert isinstance(base.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert moved  # the adapters trained
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_a_quantised_teacher_stays_on_its_device_and_is_refused_under_sharding(tmp_path):
    from accelerate.utils import DistributedType

    section = ModelSection(name_or_path=str(_save_model(tmp_path / "t")), quantization={"load_in_8bit": True})
    teacher = load_model(section, "teacher", device="cpu")
    single = types.SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1, device=torch.device("cpu"))
    assert prepare_teacher(teacher, single) is teacher and not teacher.training
    for kind, name in ((DistributedType.DEEPSPEED, "deepspeed"), (DistributedType.FSDP, "fsdp2")):
        sharded = types.SimpleNamespace(distributed_type=kind, is_fsdp2=True, num_processes=2)
        with pytest.raises(ConfigError, match=f"^teacher.quantization: a quantised teacher .* not under {name}"):
            prepare_teacher(teacher, sharded)


# ---------------------------------------------------------------------------------------------------- LoRA teacher


def _no_peft(model) -> bool:
    """No PEFT wrapper and no PEFT layer anywhere in the model: the adapter was merged away."""
    return not isinstance(model, PeftModel) and not any(type(m).__module__.startswith("peft.") for m in model.modules())


@pytest.mark.parametrize("how", ["adapter folder as name_or_path", "teacher.adapter on the base"])
def test_a_lora_teacher_is_merged_once_at_load(tmp_path, how):
    base = _save_model(tmp_path / "base")
    adapter = _save_adapter(base, tmp_path / "adapter")
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    reference = _logits(unmerged)
    assert not torch.allclose(reference, _logits(AutoModelForCausalLM.from_pretrained(base)), atol=1e-3)
    if how == "teacher.adapter on the base":
        overrides = [f"teacher.name_or_path={base}", f"teacher.adapter={adapter}"]
    else:
        overrides = [f"teacher.name_or_path={adapter}"]
    config = _config(tmp_path, "teacher.config=null", *overrides, "training.max_steps=1")
    trainer = build_trainer(config)
    teacher = trainer.teacher
    assert _no_peft(teacher) and type(teacher).__name__ == "Qwen2ForCausalLM"
    torch.testing.assert_close(_logits(teacher), reference, rtol=0, atol=1e-5)


def test_load_causal_lm_merges_an_adapter_onto_its_recorded_base(tmp_path):
    base = _save_model(tmp_path / "base")
    adapter = _save_adapter(base, tmp_path / "adapter")
    reference = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter))
    model = load_causal_lm(str(adapter))
    assert _no_peft(model)
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=1e-5)


def test_adapter_failures_name_the_key(tmp_path):
    base = _save_model(tmp_path / "base")
    adapter = _save_adapter(base, tmp_path / "adapter")
    other = tmp_path / "other"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **{**TEACHER, "hidden_size": 32})).save_pretrained(
        other
    )
    section = ModelSection(name_or_path=str(other), adapter=str(adapter))
    with pytest.raises(ConfigError, match=rf"^teacher.adapter: cannot load '{adapter}' \(it does not fit the base "
                                          rf"model '{other}': size mismatch for "):  # fmt: skip
        load_model(section, "teacher")
    gone = tmp_path / "gone"
    with pytest.raises(ConfigError, match=rf"^teacher.adapter: cannot load '{gone}' \("):
        load_model(ModelSection(name_or_path=str(base), adapter=str(gone)), "teacher")
    # An adapter whose config names no base (a model built in memory) cannot stand alone.
    orphan = tmp_path / "orphan"
    torch.manual_seed(0)
    in_memory = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **TEACHER))
    get_peft_model(in_memory, LoraConfig(r=2, target_modules="all-linear")).save_pretrained(orphan)
    with pytest.raises(ConfigError) as info:
        load_model(ModelSection(name_or_path=str(orphan)), "teacher")
    assert str(info.value) == f"teacher.name_or_path: cannot load '{orphan}' (a LoRA adapter that does not name its " \
                              "base model)"  # fmt: skip
    with pytest.raises(InputError, match=rf"^--model {orphan}: cannot load \(a LoRA adapter that does not name"):
        load_causal_lm(str(orphan))
    # The base the adapter names is gone: the message names both.
    moved = _save_adapter(base, tmp_path / "adapter2")
    import shutil

    shutil.rmtree(base)
    with pytest.raises(ConfigError, match=rf"^teacher.name_or_path: cannot load '{base}', the base model of the "
                                          rf"adapter '{moved}' \(no such folder\)$"):  # fmt: skip
        load_model(ModelSection(name_or_path=str(moved)), "teacher")


def test_the_python_example_of_docs_models_runs(capsys):
    import re

    text = (ROOT / "docs" / "models.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    exec(compile(code, "docs/models.md", "exec"), {"__name__": "__docs__"})
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("Qwen2ForCausalLM max |merged - unmerged| = ") for line in lines), lines
