"""The offline teacher cache: ``adakd cache`` stores exactly the teacher's top-k, resumes where it stopped, shares the
shards among processes; :func:`adakd.cache.open_cache` refuses a cache made for another run; the collator places the
rows at the supervised positions."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import yaml  # noqa: E402

import adakd.cache.build as build  # noqa: E402
from adakd.cache import CachedTeacherCollator, IndexedExamples, open_cache  # noqa: E402
from adakd.cache.format import first_difference  # noqa: E402
from adakd.cache.writer import linear_head, teacher_rows  # noqa: E402
from adakd.cli import main  # noqa: E402
from adakd.data import DistillCollator  # noqa: E402
from adakd.sparse import sparse_from_logits  # noqa: E402
from adakd.train import load_config  # noqa: E402
from adakd.train.config import ConfigError  # noqa: E402
from adakd.train.examples import training_examples  # noqa: E402
from adakd.train.inputs import load_tokenizer, training_arguments  # noqa: E402
from adakd.train.models import load_model  # noqa: E402

from ..faults.common import cli, one_line_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
_PORTS = itertools.count(29900 + os.getpid() % 90)
K = 8
FLAGS = ["--top-k", str(K), "--dtype", "float32", "--shard-examples", "4", "--batch-size", "3"]
QWEN2 = {"model_type": "qwen2", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 512, "tie_word_embeddings": False}  # fmt: skip


def _write_data(path: Path, seed: int, n: int = 10) -> Path:
    rng = np.random.default_rng(seed)
    words = "red blue green sky river stone cat dog".split()
    with path.open("w") as f:
        for _ in range(n):
            text = " ".join(rng.choice(words, size=int(rng.integers(1, 6))))
            f.write(json.dumps({"instruction": f"Repeat: {text}", "response": text.upper()}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A config file (tiny Qwen2 teacher with 320 lm_head rows, byte tokenizer, 10 dolly-style records) and its cache
    made with float32 log-probabilities, 3 shards (4 + 4 + 2 examples), batches of 3."""
    root = tmp_path_factory.mktemp("cache")
    data = _write_data(root / "a.jsonl", seed=0)
    _write_data(root / "b.jsonl", seed=1)
    config = {
        "teacher": {"config": {**QWEN2, "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64},
                    "tokenizer": "byte", "seed": 1},
        "student": {"config": {**QWEN2, "vocab_size": 288, "hidden_size": 16, "intermediate_size": 32,
                               "num_hidden_layers": 1}, "tokenizer": "byte"},
        "data": {"source": "instructions", "path": str(data), "max_length": 320, "max_prompt_length": 256},
        "training": {"output_dir": str(root / "out"), "use_cpu": True, "report_to": "none"},
    }  # fmt: skip
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    cache = root / "base"
    code = main(["cache", str(path), "--output", str(cache), *FLAGS])
    assert code == 0
    return path, cache


def _inputs(config):
    """The student tokenizer and the training examples, as training builds them."""
    args = training_arguments(config.training)
    tokenizer = load_tokenizer(config.student)
    examples, _ = training_examples(config.data, args, tokenizer)
    return tokenizer, examples


def _open(path, cache, *overrides, tokenizer=None, examples=None):
    config = load_config(path, list(overrides))
    tok, made = _inputs(config)
    return open_cache(
        cache,
        student=config.student,
        data=config.data,
        onpolicy_mode=config.onpolicy.mode,
        tokenizer=tokenizer or tok,
        examples=made if examples is None else examples,
    )


def test_the_cache_holds_the_teachers_top_k_at_every_supervised_position(setup):
    path, cache_dir = setup
    config = load_config(path)
    tokenizer, examples = _inputs(config)
    cache = open_cache(
        cache_dir,
        student=config.student,
        data=config.data,
        onpolicy_mode=config.onpolicy.mode,
        tokenizer=tokenizer,
        examples=examples,
    )
    m = cache.manifest
    # The teacher's 320 rows are cropped to the student's 288, as training crops a live teacher (align_vocab).
    assert (cache.top_k, cache.vocab_size, m["teacher_vocab_size"]) == (K, 288, 320)
    assert (m["id_dtype"], m["logprob_dtype"]) == ("uint16", "float32")
    assert len(cache) == len(examples) == 10 and [s["examples"] for s in m["shards"]] == [4, 4, 2]
    teacher = load_model(config.teacher, "teacher").eval()
    total = 0
    for i, example in enumerate(examples):
        ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor(example["labels"])
        with torch.no_grad():
            logits = teacher(ids).logits[0]  # [T, V]
        positions = (labels[1:] != -100).nonzero().squeeze(1)  # position t predicts token t + 1
        want = sparse_from_logits(logits[positions][:, :288], K)
        got_ids, got_lp, got_tail = cache.rows(i)
        assert got_ids.dtype == np.int64 and got_lp.dtype == got_tail.dtype == np.float32
        np.testing.assert_array_equal(got_ids, want.ids.numpy())
        np.testing.assert_allclose(got_lp, want.logprobs.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_tail, want.tail.numpy(), rtol=0, atol=1e-6)
        total += len(positions)
    assert m["positions"] == total == sum(s["positions"] for s in m["shards"])
    assert all(cache.rows(i)[0].max() < 288 for i in range(len(cache)))


def test_the_collator_of_a_real_cache_puts_each_row_at_its_position(setup):
    path, cache_dir = setup
    cache = _open(path, cache_dir)
    config = load_config(path)
    _, examples = _inputs(config)
    dataset = IndexedExamples(examples)
    features = [dataset[i] for i in (7, 2, 9)]
    assert [f["example_index"] for f in features] == [7, 2, 9]
    batch = CachedTeacherCollator(DistillCollator(256), cache)(features)
    supervised = batch["labels"][:, 1:] != -100
    assert batch["teacher_ids"].shape == (*supervised.shape, K) and batch["teacher_tail"].shape == supervised.shape
    for b, i in enumerate((7, 2, 9)):
        ids, lp, tail = cache.rows(i)
        np.testing.assert_array_equal(batch["teacher_ids"][b][supervised[b]].numpy(), ids)
        np.testing.assert_array_equal(batch["teacher_logprobs"][b][supervised[b]].numpy(), lp)
        np.testing.assert_array_equal(batch["teacher_tail"][b][supervised[b]].numpy(), tail)


def test_the_fused_head_and_the_full_logits_give_the_same_rows(setup):
    """The cache projects only the supervised hidden states; a teacher without a plain linear head runs whole."""
    config = load_config(setup[0])
    tokenizer, examples = _inputs(config)
    teacher = load_model(config.teacher, "teacher").eval()
    batch = DistillCollator(tokenizer.pad_token_id)(examples[:3])
    head = linear_head(teacher)
    assert head is not None
    fused, whole = teacher_rows(teacher, batch, K, head), teacher_rows(teacher, batch, K, None)
    assert torch.equal(fused.ids, whole.ids)
    torch.testing.assert_close(fused.logprobs, whole.logprobs)
    torch.testing.assert_close(fused.tail, whole.tail)


def test_an_interrupted_cache_resumes_to_the_same_bytes(setup, tmp_path, monkeypatch, capsys):
    path, straight = setup
    out = tmp_path / "resumed"
    real_write, real_compute = build.write_shard, build.compute_shard

    def write_then_stop(*args, **kwargs):
        real_write(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "write_shard", write_then_stop)
    assert main(["cache", str(path), "--output", str(out), *FLAGS]) == 130  # adakd: interrupted
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "shard-00000.safetensors"]
    stray = out / "shard-00001.safetensors.tmp12345"
    stray.write_bytes(b"half a shard")

    computed = []

    def counting(model, examples, first, count, **kwargs):
        computed.append(first)
        return real_compute(model, examples, first, count, **kwargs)

    monkeypatch.setattr(build, "write_shard", real_write)
    monkeypatch.setattr(build, "compute_shard", counting)
    assert main(["cache", str(path), "--output", str(out), *FLAGS]) == 0
    assert computed == [4, 8]  # shards 1 and 2; shard 0 was kept
    assert not stray.exists()
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert (out / name).read_bytes() == (straight / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (straight, out))
    assert a["shards"] == b["shards"] and a["examples_sha256"] == b["examples_sha256"]
    # Complete: run again, nothing is computed.
    capsys.readouterr()
    assert main(["cache", str(path), "--output", str(out), *FLAGS]) == 0
    assert computed == [4, 8] and "complete already" in capsys.readouterr().out


def test_float16_log_probabilities_and_overwrite(setup, tmp_path):
    path, straight = setup
    out = tmp_path / "half"
    assert main(["cache", str(path), "--output", str(out), "--top-k", str(K), "--shard-examples", "6"]) == 0
    assert main(["cache", str(path), "--output", str(out), "--top-k", "4", "--overwrite"]) == 0
    half = _open(path, out)
    full = _open(path, straight)
    assert half.manifest["logprob_dtype"] == "float16" and half.top_k == 4 and len(half.manifest["shards"]) == 1
    for i in range(len(full)):
        ids, lp, tail = half.rows(i)
        np.testing.assert_array_equal(ids, full.rows(i)[0][:, :4])
        np.testing.assert_allclose(lp, full.rows(i)[1][:, :4], rtol=1e-3, atol=1e-3)  # float16: 11 significant bits
        assert not np.array_equal(tail, full.rows(i)[2])  # the tail holds the mass beyond k = 4 now


def _copy(cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache, tmp_path / "copy"))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.path={b}"], "data.path: the cache was made from {a}, this run reads {b}"),
        (["data.template=qwen2"], "data.template: the cache was made with none, this run uses qwen2"),
        (["data.max_length=300"], "data.max_length: the cache was made with 320, this run uses 300"),
        (["data.max_prompt_length=200"], "data.max_prompt_length: the cache was made with 256, this run uses 200"),
        (["data.limit=9"], "data.limit: the cache was made from none, this run reads 9"),
        (["onpolicy.mode=gkd"], "onpolicy.mode gkd distils on generated text"),
    ],
    ids=["data-file", "template", "max-length", "max-prompt-length", "limit", "on-policy"],
)
def test_a_cache_made_for_another_run_is_refused(setup, overrides, message):
    path, cache = setup
    a, b = path.parent / "a.jsonl", path.parent / "b.jsonl"
    overrides = [o.format(b=b) for o in overrides]
    with pytest.raises(ConfigError) as info:
        _open(path, cache, *overrides)
    text = str(info.value)
    assert text.startswith(f"teacher.cache: {cache}: ") and "\n" not in text
    assert message.format(a=a.resolve(), b=b.resolve()) in text


def test_another_tokenizer_or_other_examples_are_refused(setup):
    path, cache = setup
    config = load_config(path)
    tokenizer, examples = _inputs(config)
    other = load_tokenizer(config.student)
    other.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match=r": made with another tokenizer \(byte, 257 tokens; this run's byte, 258"):
        open_cache(
            cache,
            student=config.student,
            data=config.data,
            onpolicy_mode=config.onpolicy.mode,
            tokenizer=other,
            examples=examples,
        )
    with pytest.raises(ConfigError, match=r"the tokenised training data differ from the cache's \(9 examples, the"):
        open_cache(
            cache,
            student=config.student,
            data=config.data,
            onpolicy_mode=config.onpolicy.mode,
            tokenizer=tokenizer,
            examples=examples[:9],
        )
    changed = [dict(e) for e in examples]
    changed[3] = {**changed[3], "labels": [*changed[3]["labels"][:-1], -100]}  # the eos no longer trained
    with pytest.raises(ConfigError, match=r"differ from the cache's \(the same 10 examples in number, not in token"):
        open_cache(
            cache,
            student=config.student,
            data=config.data,
            onpolicy_mode=config.onpolicy.mode,
            tokenizer=tokenizer,
            examples=changed,
        )


_V9 = {"name": "adakd-teacher-cache", "version": 9}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: _truncate(c / "shard-00001.safetensors"), r"shard-00001.safetensors has \d+ bytes, the manifest"),
        (lambda c: _flip_last_byte(c / "shard-00002.safetensors"), "shard-00002.safetensors is corrupt"),
        (lambda c: (c / "shard-00000.safetensors").unlink(), "shard-00000.safetensors is missing"),
        (lambda c: (c / "manifest.json").unlink(), "no manifest.json"),
        (lambda c: (c / "manifest.json").write_text("{"), "manifest.json is not valid JSON"),
        (lambda c: (c / "manifest.json").write_text(json.dumps({"format": _V9})), "manifest.json has format .* 9"),
        (lambda c: shutil.rmtree(c), "no such folder"),
    ],
    ids=["truncated", "corrupt", "missing-shard", "no-manifest", "bad-json", "other-version", "no-folder"],
)
def test_a_damaged_cache_is_refused(setup, tmp_path, damage, message):
    path, cache = setup
    copy = _copy(cache, tmp_path)
    damage(copy)
    with pytest.raises(ConfigError, match=f"^teacher.cache: {copy}: {message}"):
        _open(path, copy)


def test_a_truncated_shard_is_computed_again_by_the_same_command(setup, tmp_path):
    path, cache = setup
    copy = _copy(cache, tmp_path)
    _truncate(copy / "shard-00001.safetensors")
    assert main(["cache", str(path), "--output", str(copy), *FLAGS]) == 0
    assert (copy / "shard-00001.safetensors").read_bytes() == (cache / "shard-00001.safetensors").read_bytes()
    _open(path, copy)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["data.source=hf", "data.streaming=true", "training.max_steps=2"], "data.streaming"),
        (["onpolicy.mode=gkd"], "onpolicy.mode"),
        (["--top-k", "4"], "--output"),
        (["--batch-size", "0"], "--batch-size"),
        (["--dtype", "bfloat16"], "--dtype"),
        (["teacher=null", "loss.kd_ratio=0"], "teacher"),
        (["teacher.cache=elsewhere"], "teacher.cache"),
    ],
    ids=["streaming", "on-policy", "other-plan", "batch-size", "dtype", "no-teacher", "teacher-cache"],
)
def test_adakd_cache_refusals_are_one_line_naming_the_key(setup, capsys, args, flag):
    path, cache = setup
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    line = one_line_error(*cli(capsys, "cache", str(path), "--output", str(cache), *args))
    assert f": {flag}" in line or line.startswith(f"adakd: error: {flag}"), line
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before  # the cache is left as it was


def test_an_output_folder_holding_something_else_is_refused(setup, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    line = one_line_error(*cli(capsys, "cache", str(setup[0]), "--output", str(tmp_path)))
    want = f"adakd: error: --output {tmp_path}: not empty and holds no adakd cache (notes.txt); use another folder"
    assert line == want


class _FakeCache:
    top_k = 2

    def __init__(self, rows: dict[int, int]) -> None:
        self.counts = rows

    def rows(self, i: int):
        n = self.counts[i]
        ids = np.arange(n * 2, dtype=np.int64).reshape(n, 2) + 100 * i
        return ids, -ids.astype(np.float32), np.full(n, -float(i), dtype=np.float32)


def test_the_collator_places_rows_at_the_supervised_positions():
    # Example 5: a prompt of 2 tokens, 3 trained tokens: positions 1, 2, 3 predict them. Example 8: two trained
    # turns with an untrained token between (a conversation): positions 0 and 2.
    features = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5], "example_index": 5},
        {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4], "example_index": 8},
    ]
    batch = CachedTeacherCollator(DistillCollator(0), _FakeCache({5: 3, 8: 2}))(features)
    assert batch["teacher_ids"].shape == (2, 4, 2) and batch["teacher_tail"].shape == (2, 4)
    assert batch["teacher_ids"][0, :, 0].tolist() == [0, 500, 502, 504]
    assert batch["teacher_ids"][1, :, 0].tolist() == [800, 0, 802, 0]
    assert batch["teacher_logprobs"][1, :, 1].tolist() == [-801, 0, -803, 0]
    assert batch["teacher_tail"].tolist() == [[0, -5, -5, -5], [-8, 0, -8, 0]]
    assert batch["input_ids"].shape == (2, 5) and batch["labels"][1, 4] == -100
    with pytest.raises(ConfigError, match="^teacher.cache: example 8: 2 supervised positions but the cache holds 3$"):
        CachedTeacherCollator(DistillCollator(0), _FakeCache({5: 3, 8: 3}))(features)


def test_the_first_difference_is_named_by_its_dotted_key():
    old = {"format": {"version": 1}, "teacher": {"config": {"hidden_size": 64}}, "top_k": 8}
    assert first_difference(old, {**old, "top_k": 32}) == ("top_k", 8, 32)
    assert first_difference(old, {**old, "teacher": {"config": {"hidden_size": 32}}})[0] == "teacher.config.hidden_size"
    assert first_difference(old, {"format": {"version": 1}}) is None  # only the new plan's keys are compared


def _run(cmd: list[str], log: Path, timeout: float = 120) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as sink:
        proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout)
    assert proc.returncode == 0, log.read_text()[-4000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_write_the_same_shards_as_one(setup, tmp_path):
    path, _ = setup
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "adakd", "cache", str(path), "--output", str(one), *FLAGS], tmp_path / "one.log")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    launch = [torchrun, "--nproc_per_node=2", f"--master_port={next(_PORTS)}", "-m", "adakd"]
    _run([*launch, "cache", str(path), "--output", str(two), *FLAGS], tmp_path / "two.log")
    names = sorted(p.name for p in one.glob("shard-*"))
    assert names == sorted(p.name for p in two.glob("shard-*")) and len(names) == 3
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert a["shards"] == b["shards"]
    assert "train from it" in (tmp_path / "two.log").read_text()


def test_a_top_k_above_the_vocabulary_is_reported_as_the_k_kept(setup, tmp_path, capsys):
    path, _ = setup
    out = tmp_path / "all"
    assert main(["cache", str(path), "--output", str(out), "--top-k", "100000"]) == 0
    assert json.loads((out / "manifest.json").read_text())["top_k"] == 288  # the student's rows
    printed = capsys.readouterr().out
    assert "outside the top-288:" in printed and "top-100000" not in printed
