"""Property fuzzing: the JSONL readers, the config loader and the loss never fail with an unexpected exception."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adakd import AdaKDLoss
from adakd.data import read_instruction_jsonl, read_minillm_jsonl
from adakd.errors import InputError
from adakd.loss import NonFiniteLossError
from adakd.train.config import ConfigError, DistillConfig, load_config

from .common import TINY

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_rows = st.dictionaries(st.sampled_from(["prompt", "output", "instruction", "context", "response", "x"]), _json_values)
_lines = st.lists(
    st.one_of(
        _rows.map(lambda row: yaml.safe_dump(row, default_flow_style=True, width=10**6).strip().encode()),
        st.binary(max_size=30),
        st.just(b""),
        st.just(b'{"prompt": "p", "output": "o"}'),
        st.just(b'{"instruction": "i", "response": "r"}'),
    ),
    max_size=6,
)


@FUZZ
@given(lines=_lines)
def test_jsonl_readers_give_records_or_a_located_error(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_bytes(b"\n".join(lines))
        for reader in (read_minillm_jsonl, read_instruction_jsonl):
            try:
                records = reader(path)
            except InputError as e:
                assert re.match(rf"^{re.escape(str(path))}:\d+: ", str(e)), str(e)
            else:
                assert all(r.response.strip() for r in records)


_scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=6)
_keys = st.sampled_from(
    [
        "loss.ratio", "loss.c", "loss.tau_base", "loss.base", "loss.selection", "loss.nonfinite", "loss.kd_ratio",
        "loss.base_params", "loss.min_ratio", "loss.chunk_size", "data.source", "data.max_length", "student.dtype",
        "teacher", "onpolicy.mode", "onpolicy.temperature", "training.max_steps", "training", "loss", "bogus.key",
        "loss.selekton", "student.lora",
    ]
)  # fmt: skip


@FUZZ
@given(
    pairs=st.lists(st.tuples(_keys, _scalars | st.dictionaries(st.text(max_size=4), _scalars, max_size=2)), max_size=4)
)
def test_config_overrides_give_a_config_or_a_config_error(pairs):
    overrides = [f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()}" for key, value in pairs]
    try:
        assert isinstance(load_config(TINY, overrides), DistillConfig)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e), str(e)  # one line (naming the file, or the override's key)


@FUZZ
@given(
    data=st.dictionaries(st.text(max_size=8) | st.integers(), _scalars | st.dictionaries(st.text(max_size=6), _scalars))
)
def test_config_mappings_give_a_config_or_a_config_error(data):
    try:
        load_config(data=data)
    except ConfigError:
        pass


@FUZZ
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5)),
    vocab=st.integers(2, 12),
    extra=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    base=st.sampled_from(["rkl", "fkl", "jsd", "tvd", "srkl", "akl"]),
    selection=st.sampled_from(["latf", "fixed", "all"]),
    temperature=st.sampled_from(["inverse", "fixed"]),
    mask=st.sampled_from(["none", "some", "all"]),
    poison=st.sampled_from(["none", "student_row", "teacher_row", "student_col", "teacher_col", "both_col"]),
    seed=st.integers(0, 2**16),
)
def test_loss_is_finite_or_refuses(shape, vocab, extra, dtype, base, selection, temperature, mask, poison, seed):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, vocab, generator=gen) * 5).to(dtype)
    teacher = (torch.randn(*shape, vocab + extra, generator=gen) * 5).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    if mask == "all":
        labels[:] = -100
    elif mask == "some":
        labels[..., 0] = -100
    s, t = student.detach().clone(), teacher.clone()
    if poison == "student_row":
        s[(0,) * len(shape)] = -math.inf
    elif poison == "teacher_row":
        t[(0,) * len(shape)] = -math.inf
    if poison in ("student_col", "both_col"):
        s[..., 0] = -math.inf
    if poison in ("teacher_col", "both_col"):
        t[..., 0] = -math.inf
    s.requires_grad_()
    ratio = None if selection == "latf" else 0.5  # LATF takes no ratio: it starts at max_ratio
    fn = AdaKDLoss(base, selection=selection, ratio=ratio, temperature=temperature, vocab_size=vocab)
    try:
        loss = fn(s, t, labels)
    except NonFiniteLossError as e:
        # The one refusal allowed here, and only for poisoned logits; any other error is a bug and fails the test.
        assert poison != "none" and "non-finite AdaKD loss" in str(e), (poison, str(e))
        return
    assert torch.isfinite(loss), loss
    loss.backward()
    assert not torch.isnan(s.grad).any()
