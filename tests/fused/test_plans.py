"""The fused package's plans: logit-product counts per mode, and the measurement plans (evaluation sums, teacher
top-k, entropy) against the functions they replace (train/evaluation.py, cache/writer.py, integrations/trl.py)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adakd
from adakd import fused
from adakd.sparse import sparse_from_logits

N, H_S, H_T, V_S, V_T = 37, 13, 19, 50, 56
SRC = Path(__file__).resolve().parents[2] / "src" / "adakd"


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
# Measurement plans against float64 re-derivations
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_teacher", [False, True])
@pytest.mark.parametrize("chunk_size", [3, None])
def test_evaluation_sums_are_the_float64_sums_of_every_valid_token(with_teacher, chunk_size):
    """Per sequence: the token count, Σ CE, Σ D(p, q) at τ = 1 and Σ Hellinger, re-derived in float64 from the
    whole logits at once; the hidden-state version equals the logits version."""
    hs, ws, bs, ht, wt, bt, labels = _inputs(3)
    b, t = 4, 9
    shape = lambda x: x[: b * t].reshape(b, t, x.shape[-1])  # noqa: E731
    lab = labels[: b * t].reshape(b, t)
    lam = 0.3
    div = adakd.AdaKDLoss(base="jsd", base_params={"lam": lam}).div
    zs, zt = torch.addmm(bs, hs, ws.t()), torch.addmm(bt, ht, wt.t())
    teacher = shape(zt) if with_teacher else None
    got = fused.evaluation_sums(shape(zs), teacher, lab, div, V_S, chunk_size)
    assert got.dtype == torch.float64
    t_parts = (shape(ht), wt, bt) if with_teacher else None
    from_hidden = fused.evaluation_sums_hidden((shape(hs), ws, bs), t_parts, lab, div, V_S, chunk_size)
    torch.testing.assert_close(from_hidden, got, rtol=1e-6, atol=1e-6)  # float32 products, in another order

    valid = lab.reshape(-1) != -100
    lq = torch.log_softmax(shape(zs).reshape(-1, V_S)[valid].double(), -1)
    ce = -lq.gather(1, lab.reshape(-1)[valid].unsqueeze(1)).squeeze(1)
    seq = torch.arange(b).repeat_interleave(t)[valid]
    per_sequence = lambda x: torch.zeros(b, dtype=torch.float64).index_add_(0, seq, x)  # noqa: E731
    assert torch.equal(got[:, 0], (lab != -100).sum(1).double())
    torch.testing.assert_close(got[:, 1], per_sequence(ce))
    if not with_teacher:
        assert torch.equal(got[:, 2:], torch.zeros(b, 2, dtype=torch.float64))
        return
    lp = torch.log_softmax(shape(zt).reshape(-1, zt.shape[-1])[valid][:, :V_S].double(), -1)  # padding rows cropped
    p, q = lp.exp(), lq.exp()
    m = (1 - lam) * p + lam * q  # JSD: λ·KL(q ‖ m) + (1 − λ)·KL(p ‖ m)
    jsd = lam * (q * (lq - m.log())).sum(-1) + (1 - lam) * (p * (lp - m.log())).sum(-1)
    hellinger = (1 - (p * q).sqrt().sum(-1)).clamp_min(0).sqrt()
    torch.testing.assert_close(got[:, 2], per_sequence(jsd))
    torch.testing.assert_close(got[:, 3], per_sequence(hellinger))


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
def test_teacher_top_k_and_the_cache_writer_give_the_top_k_of_the_models_own_logits(linear_head):
    """The top-k rows, chunk by chunk (from hidden states and the lm_head's weight, or from logits), are
    sparse_from_logits of the model's own logits at the supervised positions taken at once; the cache writer's rows
    are the same."""
    writer = pytest.importorskip("adakd.cache.writer")
    teacher = _Teacher().eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V_T, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 8:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    width, k = V_S, 6
    supervised = labels[:, 1:] != -100
    with torch.no_grad():
        logits = teacher(ids).logits[:, :-1][supervised]  # the model's own lm_head call, every row at once
        want = sparse_from_logits(logits[:, :width], k)
        if linear_head:
            rows = teacher.decoder(ids).last_hidden_state[:, :-1][supervised]
            got = fused.teacher_top_k(
                rows, k, weight=teacher.lm_head.weight, bias=teacher.lm_head.bias, width=width, chunk_size=4
            )
        else:
            got = fused.teacher_top_k(logits, k, width=width, chunk_size=4)  # several chunks of 4 rows
    head = writer.LinearHead(teacher.decoder, teacher.lm_head) if linear_head else None
    written = writer.teacher_rows(teacher, batch, k, head, width)
    for sparse in (got, written):
        assert torch.equal(sparse.ids, want.ids)
        torch.testing.assert_close(sparse.logprobs, want.logprobs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sparse.tail, want.tail, rtol=1e-6, atol=1e-6)
    # The top-k is the largest k of each row of the cropped logits, its tail the rest of the mass.
    lp = torch.log_softmax(logits[:, :width].double(), -1)
    torch.testing.assert_close(got.logprobs.double(), lp.topk(k, -1).values, rtol=1e-5, atol=1e-6)
    empty = fused.teacher_top_k(logits[:0], k, width=width)
    assert empty.ids.shape == (0, k) and empty.tail.shape == (0,)


@pytest.mark.parametrize("rows", [0, 5, 2500])
def test_entropy_sum_is_the_float64_entropy_of_every_row(rows):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(rows, 33, generator=g).bfloat16()
    got = fused.entropy_sum(logits)
    assert got.dtype == torch.float32
    lp = torch.log_softmax(logits.double(), -1)
    want = -(lp.exp() * lp).sum()  # H = −Σ p log p, every row
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.entropy_sum(logits, chunk_size=7), got)  # chunking does not matter
