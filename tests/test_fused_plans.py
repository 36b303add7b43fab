"""The fused package's plans: logit-product counts per mode, and the measurement plans (evaluation sums, teacher
top-k, entropy) against the functions they replace (train/evaluation.py, cache/writer.py, integrations/trl.py)."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adakd
from adakd import fused

N, H_S, H_T, V_S, V_T = 37, 13, 19, 50, 56
SRC = Path(__file__).resolve().parents[1] / "src" / "adakd"


def _inputs(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H_S, generator=g, dtype=dtype)
    ws = torch.randn(V_S, H_S, generator=g, dtype=dtype) * 0.6
    bs = torch.randn(V_S, generator=g, dtype=dtype) * 0.5
    ht = torch.randn(N, H_T, generator=g, dtype=dtype)
    wt = torch.randn(V_T, H_T, generator=g, dtype=dtype) * 0.6
    bt = torch.randn(V_T, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, V_S, (N,), generator=g)
    labels[:6] = -100
    labels[20:23] = -100
    return hs, ws, bs, ht, wt, bt, labels


class _LogitProducts(TorchDispatchMode):
    """Counts matrix products whose output has ``vocab`` columns: the logit products."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.count = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and out.shape[-1] == self.vocab:
            self.count += 1
        return out


def _chunks(rows: int, chunk: int) -> int:
    return math.ceil(rows / chunk)


# (kwargs, logit products of forward + backward as a function of n valid rows, k kept rows, chunk size c): each
# pass over r rows makes one student and one teacher product per chunk.
COUNTS = [
    ({"selection": "fixed", "ratio": 0.6}, lambda n, k, c: 2 * _chunks(n, c) + 2 * _chunks(k, c)),  # exact
    ({"selection": "all", "temperature": "fixed"}, lambda n, k, c: 2 * _chunks(n, c)),  # plain KD: pass 2 only
    ({"selection": "all"}, lambda n, k, c: 4 * _chunks(n, c)),  # keep all, IDTS: pass 1 and pass 2
    ({"selection": "fixed", "ratio": 0.6, "detach_tau": False}, lambda n, k, c: 2 * _chunks(n, c) + 4 * _chunks(k, c)),
]


@pytest.mark.parametrize("mix", [None, 0.5])
@pytest.mark.parametrize("chunk_size", [4, 7, 1000])
@pytest.mark.parametrize(("kwargs", "count"), COUNTS, ids=["exact", "plain-kd", "keep-all", "tau-grad"])
def test_logit_products_per_mode(kwargs, count, chunk_size, mix):
    hs, ws, bs, ht, wt, bt, labels = _inputs(1)
    p = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    loss_fn = adakd.AdaKDLoss(**kwargs)
    options = {} if mix is None else {"mix": adakd.Mix(mix)}
    with _LogitProducts(V_S) as mode:
        loss, report = loss_fn.forward_hidden(
            p[0],
            p[1],
            ht,
            wt,
            labels,
            student_bias=p[2],
            teacher_bias=bt,
            chunk_size=chunk_size,
            return_report=True,
            **options,
        )
        loss.backward()
    assert mode.count == count(report.valid_tokens, report.kept_tokens, chunk_size)


@pytest.mark.parametrize("chunk_size", [4, 1000])
def test_one_pass_and_cross_entropy_make_each_product_once(chunk_size):
    hs, ws, bs, ht, wt, bt, labels = _inputs(2)
    n = int((labels != -100).sum())
    loss_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.5, one_pass=True)
    loss_fn.forward_hidden(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, chunk_size=chunk_size)
    h = hs.clone().requires_grad_(True)
    with _LogitProducts(V_S) as mode:
        loss_fn.forward_hidden(
            h, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, chunk_size=chunk_size
        ).backward()
    assert mode.count == 2 * _chunks(n, chunk_size)
    with _LogitProducts(V_S) as mode:
        fused.fused_cross_entropy(h, ws, bs, labels, chunk_size).backward()
    assert mode.count == _chunks(n, chunk_size)


def test_the_package_has_one_chunk_loop_and_one_autograd_function():
    text = "".join(p.read_text() for p in (SRC / "fused").glob("*.py"))
    assert text.count("for start in range(0, ") == 1
    assert text.count("(torch.autograd.Function)") == 1


# ---------------------------------------------------------------------------------------------------------------
# Measurement plans against the functions they replace
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_teacher", [False, True])
@pytest.mark.parametrize("chunk_size", [3, None])
def test_evaluation_sums_equal_train_evaluation(with_teacher, chunk_size):
    evaluation = pytest.importorskip("adakd.train.evaluation")
    hs, ws, bs, ht, wt, bt, labels = _inputs(3)
    b, t = 4, 9
    shape = lambda x: x[: b * t].reshape(b, t, x.shape[-1])  # noqa: E731
    lab = labels[: b * t].reshape(b, t)
    div = adakd.AdaKDLoss(base="jsd").div
    zs, zt = torch.addmm(bs, hs, ws.t()), torch.addmm(bt, ht, wt.t())
    teacher = shape(zt) if with_teacher else None
    want = evaluation.sequence_sums(shape(zs), teacher, lab, div, V_S, chunk_size)
    got = fused.evaluation_sums(shape(zs), teacher, lab, div, V_S, chunk_size)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    t_parts = (shape(ht), wt, bt) if with_teacher else (None, None, None)
    want = evaluation.sequence_sums_hidden(shape(hs), ws, bs, *t_parts, lab, div, V_S, chunk_size)
    got = fused.evaluation_sums_hidden(
        (shape(hs), ws, bs), t_parts if with_teacher else None, lab, div, V_S, chunk_size
    )
    assert torch.equal(got, want)
    # And against a float64 re-derivation: CE, the divergence and the Hellinger distance of every valid token.
    valid = lab.reshape(-1) != -100
    lq = torch.log_softmax(shape(zs).reshape(-1, V_S)[valid].double(), -1)
    ce = -lq.gather(1, lab.reshape(-1)[valid].unsqueeze(1)).squeeze(1)
    seq = torch.arange(b).repeat_interleave(t)[valid]
    torch.testing.assert_close(got[:, 1], torch.zeros(b, dtype=torch.float64).index_add_(0, seq, ce))
    assert torch.equal(got[:, 0], (lab != -100).sum(1).double())


class _Decoder(torch.nn.Module):
    def __init__(self, embed: torch.nn.Embedding) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(last_hidden_state=torch.tanh(self.embed(input_ids)))


class _Teacher(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.embed = torch.nn.Embedding(V_T, H_T)
        self.embed.weight.data = torch.randn(V_T, H_T, generator=g)
        self.lm_head = torch.nn.Linear(H_T, V_T)
        self.lm_head.weight.data = torch.randn(V_T, H_T, generator=g)
        self.decoder = _Decoder(self.embed)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.lm_head(self.decoder(input_ids).last_hidden_state))


@pytest.mark.parametrize("linear_head", [False, True])
def test_teacher_top_k_equals_the_cache_writers_rows(linear_head, monkeypatch):
    writer = pytest.importorskip("adakd.cache.writer")
    teacher = _Teacher().eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V_T, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 8:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    width, k = V_S, 6
    monkeypatch.setattr(writer, "_CHUNK_LOGITS", 4 * width)  # several chunks of 4 rows
    head = writer.LinearHead(teacher.decoder, teacher.lm_head) if linear_head else None
    want = writer.teacher_rows(teacher, batch, k, head, width)
    supervised = labels[:, 1:] != -100
    with torch.no_grad():
        if linear_head:
            rows = teacher.decoder(ids).last_hidden_state[:, :-1][supervised]
            got = fused.teacher_top_k(
                rows, k, weight=teacher.lm_head.weight, bias=teacher.lm_head.bias, width=width, chunk_size=4
            )
        else:
            rows = teacher(ids).logits[:, :-1][supervised]
            got = fused.teacher_top_k(rows, k, width=width, chunk_size=4)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    # The top-k is the largest k of each row of the cropped logits, its tail the rest of the mass.
    logits = rows[:, :width] if not linear_head else torch.nn.functional.linear(rows, teacher.lm_head.weight)[:, :width]
    if linear_head:
        logits = logits + teacher.lm_head.bias[:width]
    lp = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(got.logprobs.double(), lp.topk(k, -1).values, rtol=1e-5, atol=1e-6)
    empty = fused.teacher_top_k(rows[:0], k, width=width)
    assert empty.ids.shape == (0, k) and empty.tail.shape == (0,)


def _trl_entropy_sum():
    """``_entropy_sum`` of src/adakd/integrations/trl.py, read from its source (the module imports trl)."""
    tree = ast.parse((SRC / "integrations" / "trl.py").read_text())
    keep = [
        node
        for node in tree.body
        if (isinstance(node, ast.FunctionDef) and node.name == "_entropy_sum")
        or (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_ENTROPY_CHUNK" for t in node.targets))
    ]
    assert len(keep) == 2
    scope = {"torch": torch}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "trl.py", "exec"), scope)
    return scope["_entropy_sum"]


@pytest.mark.parametrize("rows", [0, 5, 2500])
def test_entropy_sum_equals_the_trl_integrations(rows):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(rows, 33, generator=g).bfloat16()
    got = fused.entropy_sum(logits)
    assert torch.equal(got, _trl_entropy_sum()(logits))
    want = torch.distributions.Categorical(logits=logits.double()).entropy().sum()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
