"""Training from an `adakd cache` folder (teacher.cache): no teacher model, the same run as the live teacher when the
cache keeps the whole vocabulary, and the refusals of what a cached teacher cannot do."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from adakd.cli import main as cli  # noqa: E402
from adakd.train import build_trainer, load_config  # noqa: E402
from adakd.train.config import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
STUDENT_ROWS = 288  # the tiny student's lm_head rows: the teacher's 320 are cropped to them, live or cached
COMMON = [
    "data.synthetic_size=24",
    "training.logging_steps=1",
    "training.disable_tqdm=true",
    "training.per_device_train_batch_size=4",
    "training.max_steps=4",
    # LATF that moves at every step, so that a cached run that drifts from the live one shows in the ratio too
    "loss.ema_decay=0.0",
    "loss.tolerance=0.0",
    "loss.step_size=0.2",
    "loss.warmup_steps=1",
    "loss.min_ratio=0.2",
]


def _cache(tmp_path: Path, k: int, *overrides: str, name: str = "cache") -> Path:
    out = tmp_path / name
    code = cli(["cache", str(TINY), "--output", str(out), "--top-k", str(k), "--dtype", "float32",
                f"training.output_dir={tmp_path / 'cache-run'}", *COMMON, *overrides])  # fmt: skip
    assert code == 0
    return out


def _train(tmp_path: Path, name: str, *overrides: str):
    trainer = build_trainer(load_config(TINY, [f"training.output_dir={tmp_path / name}", *COMMON, *overrides]))
    trainer.train()
    return trainer


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_a_whole_vocabulary_cache_trains_exactly_like_the_live_teacher(tmp_path, fused):
    cache = _cache(tmp_path, STUDENT_ROWS)
    live = _train(tmp_path, "live", f"loss.fused={str(fused).lower()}")
    cached = _train(tmp_path, "cached", f"loss.fused={str(fused).lower()}", f"teacher.cache={cache}")
    assert cached.teacher is None and cached.teacher_cache
    assert cached.loss_fn.ratio == live.loss_fn.ratio < 1.0  # LATF moved, identically
    live_rows = [r for r in live.state.log_history if "loss" in r]
    cached_rows = [r for r in cached.state.log_history if "loss" in r]
    for a, b in zip(live_rows, cached_rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["adakd/kept_tokens"] == a["adakd/kept_tokens"]
    for (name, a), (_, b) in zip(live.model.named_parameters(), cached.model.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_a_small_cache_trains_without_loading_the_teacher(tmp_path, monkeypatch):
    inputs_module = sys.modules["adakd.train.inputs"]
    cache = _cache(tmp_path, 8)
    loaded = []
    original = inputs_module.load_model
    monkeypatch.setattr(inputs_module, "load_model", lambda section, role, **kw: loaded.append(role) or original(
        section, role, **kw))  # fmt: skip
    trainer = _train(tmp_path, "k8", f"teacher.cache={cache}", "loss.fused=true")
    assert loaded == ["student"]
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 4 and all(r["loss"] > 0 and r["adakd/kept_tokens"] > 0 for r in rows)


def test_the_cache_needs_no_teacher_model_in_the_config(tmp_path):
    cache = _cache(tmp_path, 8)
    config = load_config(data={"student": {"config": {"model_type": "qwen2", "vocab_size": STUDENT_ROWS,
                               "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
                               "tokenizer": "byte", "seed": 2},
                               "teacher": {"cache": str(cache)},
                               "data": {"source": "synthetic", "synthetic_size": 24, "max_length": 320,
                                        "max_prompt_length": 256},
                               "training": {"output_dir": str(tmp_path / "r2"), "max_steps": 1, "use_cpu": True,
                                            "report_to": "none", "per_device_train_batch_size": 4}})  # fmt: skip
    trainer = build_trainer(config)  # the teacher section holds only the cache
    assert trainer.teacher is None
    trainer.train()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["onpolicy.mode=gkd"], "teacher.cache: onpolicy.mode 'gkd' .* need a live teacher"),
        (["loss.kd_ratio=0"], "teacher.cache: loss.kd_ratio is 0"),
        (["data.eval_path=x.jsonl", "data.source=minillm_jsonl", "data.path=y.jsonl"], "teacher.cache: evaluation"),
        (["student.cache=somewhere"], "student.cache: only the teacher"),
    ],
    ids=["on-policy", "no-kd", "eval-set", "student-cache"],
)
def test_what_a_cached_teacher_cannot_do_is_refused(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [f"training.output_dir={tmp_path}", f"teacher.cache={tmp_path / 'c'}", *overrides])


def test_streaming_is_refused(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(ConfigError, match="teacher.cache: data.streaming"):
        load_config(TINY, [f"training.output_dir={tmp_path}", f"teacher.cache={tmp_path / 'c'}", "data.source=hf",
                           f"data.path={data}", "data.streaming=true", "training.max_steps=1"])  # fmt: skip


def test_a_cache_for_another_student_vocabulary_is_refused(tmp_path):
    cache = _cache(tmp_path, 8)
    config = load_config(TINY, [f"training.output_dir={tmp_path / 'r'}", *COMMON, f"teacher.cache={cache}",
                                "student.config.vocab_size=320"])  # fmt: skip
    with pytest.raises(ConfigError, match="teacher.cache: .*student vocabulary of 288 rows, this student has 320"):
        build_trainer(config)


def test_the_cli_trains_from_a_cache_and_refuses_a_missing_one(tmp_path, capsys):
    cache = _cache(tmp_path, 8)
    base = ["train", str(TINY), f"training.output_dir={tmp_path / 'cli'}", *COMMON, "training.max_steps=1"]
    assert cli([*base, f"teacher.cache={cache}"]) == 0
    assert (
        "(its top-k distributions, read from an `adakd cache` folder)" in (tmp_path / "cli/final/README.md").read_text()
    )
    capsys.readouterr()
    assert (
        cli([*base[:2], f"training.output_dir={tmp_path / 'cli2'}", *COMMON, f"teacher.cache={tmp_path / 'no'}"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher.cache" in err[0] and "Traceback" not in err[0]


def test_the_manifest_reports_the_teachers_mass_outside_the_top_k(tmp_path, capsys):
    import json

    import numpy as np
    from safetensors.numpy import load_file

    small = _cache(tmp_path, 8, name="k8")
    assert "the teacher's mean mass outside the top-8: " in capsys.readouterr().out
    manifest = json.loads((small / "manifest.json").read_text())
    tails = np.concatenate([load_file(small / s["file"])["tail"] for s in manifest["shards"]]).astype(np.float64)
    assert manifest["tail_mass"]["mean"] == pytest.approx(np.exp(tails).mean(), rel=1e-9)
    assert manifest["tail_mass"]["max"] == pytest.approx(np.exp(tails).max(), rel=1e-9)
    assert 0 < manifest["tail_mass"]["mean"] < manifest["tail_mass"]["max"] < 1
    whole = json.loads((_cache(tmp_path, STUDENT_ROWS, name="all") / "manifest.json").read_text())
    assert whole["tail_mass"] == {"mean": 0.0, "max": 0.0}  # k = V: nothing outside the support


def test_any_sparse_source_is_a_teacher_and_trains_as_the_cache(tmp_path):
    """A third source of a sparse teacher (e.g. a teacher served over HTTP) is one class: a ``SparseSource`` that
    returns the batch's ``SparseTeacher``, passed as the trainer's teacher, trains exactly as ``teacher_cache=True``,
    and is refused on-policy generation like the cache."""
    from adakd.sparse import SparseTeacher
    from adakd.train import AdaKDTrainer
    from adakd.train.teacher import SparseSource

    class Served(SparseSource):
        name = "served"
        asked = 0

        def sparse(self, inputs):
            Served.asked += 1
            return SparseTeacher(inputs["teacher_ids"], inputs["teacher_logprobs"], inputs["teacher_tail"])

    cache = _cache(tmp_path, 8)
    flag = _train(tmp_path, "flag", f"teacher.cache={cache}", "loss.fused=true")
    overrides = [f"training.output_dir={tmp_path / 'served'}", *COMMON, f"teacher.cache={cache}", "loss.fused=true"]
    parts = build_trainer(load_config(TINY, overrides))
    common = {"loss_fn": parts.loss_fn, "kd_ratio": parts.kd_ratio, "fused": True, "args": parts.args}
    data = {"train_dataset": parts.train_dataset, "data_collator": parts.data_collator}
    with pytest.raises(ValueError, match="served replaces the teacher model, and cannot serve on-policy"):
        AdaKDTrainer(parts.model, Served(), onpolicy=object(), **common, **data)
    served = AdaKDTrainer(parts.model, Served(), **common, **data, processing_class=parts.processing_class)
    assert served.teacher is None and not served.teacher_cache and served.distils
    served.train()
    assert Served.asked == 4  # one micro-batch per step
    assert served.loss_fn.ratio == flag.loss_fn.ratio < 1.0
    flag_rows = [r for r in flag.state.log_history if "loss" in r]
    served_rows = [r for r in served.state.log_history if "loss" in r]
    for a, b in zip(flag_rows, served_rows, strict=True):
        assert b["loss"] == a["loss"] and b["adakd/kept_tokens"] == a["adakd/kept_tokens"]
    trained = dict(flag.model.named_parameters())
    for name, p in served.model.named_parameters():  # the same student at the end, parameter by parameter
        assert torch.equal(p, trained[name]), name
