"""The sparse teacher (top-k + tail bucket): equal to the dense teacher at k = V, an independent float64
re-derivation of the coarse distributions below it, and both loss paths on it."""

from __future__ import annotations

import math

import pytest
import torch

import adakd
from adakd.sparse import (
    SparseTeacher,
    coarse_student,
    sparse_difficulty_scores,
    sparse_divergence,
    sparse_from_logits,
)

from . import reference as ref
from .fused.test_forward_hidden import _LargestTensor

N, H_S, H_T, V = 29, 11, 17, 40


def _inputs(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H_S, generator=g, dtype=dtype)
    ws = torch.randn(V, H_S, generator=g, dtype=dtype) * 0.7
    bs = torch.randn(V, generator=g, dtype=dtype) * 0.5
    ht = torch.randn(N, H_T, generator=g, dtype=dtype)
    wt = torch.randn(V, H_T, generator=g, dtype=dtype) * 0.9
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:4] = -100
    labels[15:17] = -100
    return hs, ws, bs, ht, wt, labels


def _loss_and_grads(kwargs, hs, ws, bs, teacher, labels, *, fused=False, chunk_size=None):
    loss_fn = adakd.AdaKDLoss(**kwargs)
    p = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    if fused:
        if isinstance(teacher, SparseTeacher):
            loss = loss_fn.forward_hidden(p[0], p[1], teacher, None, labels, student_bias=p[2], chunk_size=chunk_size)
        else:
            ht, wt = teacher
            loss = loss_fn.forward_hidden(p[0], p[1], ht, wt, labels, student_bias=p[2], chunk_size=chunk_size)
    else:
        zs = torch.addmm(p[2], p[0], p[1].t())
        loss = loss_fn(zs, teacher, labels)
    return loss, torch.autograd.grad(loss, p), loss_fn.stats


def _assert_same(a, b, rtol=1e-9, stats_rtol=1e-9):
    (l0, g0, s0), (l1, g1, s1) = a, b
    torch.testing.assert_close(l1, l0, rtol=rtol, atol=1e-12)
    for x, y in zip(g1, g0, strict=True):
        assert (x - y).abs().max() <= rtol * 10 * y.abs().max() + 1e-12
    assert s1.keys() == s0.keys()
    for key in s0:
        assert s1[key] == pytest.approx(s0[key], rel=stats_rtol, abs=1e-12, nan_ok=True), key


MODES = [
    {"selection": "fixed", "ratio": 0.6, "c": 0.8},
    {"selection": "latf"},
    {"selection": "all", "temperature": "fixed", "tau_base": 2.0},
    {"selection": "fixed", "ratio": 0.5, "temperature": "reverse"},
    {"selection": "fixed", "ratio": 0.5, "detach_tau": False},
]


# ---------------------------------------------------------------------------------------------------------------
# k = V: the sparse teacher is the dense teacher
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", list(adakd.DIVERGENCES))
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_k_equal_to_the_vocabulary_is_the_dense_loss_for_every_divergence(base, fused):
    hs, ws, bs, ht, wt, labels = _inputs(1)
    sparse = sparse_from_logits(ht @ wt.t(), V)
    kwargs = {"base": base, "selection": "fixed", "ratio": 0.6, "c": 0.8}
    dense = _loss_and_grads(kwargs, hs, ws, bs, ht @ wt.t(), labels)
    got = _loss_and_grads(kwargs, hs, ws, bs, sparse, labels, fused=fused, chunk_size=6)
    _assert_same(dense, got)


@pytest.mark.parametrize("indicator", list(adakd.INDICATORS))
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_k_equal_to_the_vocabulary_is_the_dense_loss_for_every_indicator(indicator, fused):
    hs, ws, bs, ht, wt, labels = _inputs(2)
    zt = ht @ wt.t()
    kwargs = {"indicator": indicator, "selection": "fixed", "ratio": 0.5}
    dense = _loss_and_grads(kwargs, hs, ws, bs, zt, labels)
    got = _loss_and_grads(kwargs, hs, ws, bs, sparse_from_logits(zt, V), labels, fused=fused, chunk_size=5)
    _assert_same(dense, got)
    zs = torch.addmm(bs, hs, ws.t())
    valid = labels != -100
    scores = adakd.difficulty_scores(indicator, zs[valid], zt[valid], labels[valid])
    sparse_scores = sparse_difficulty_scores(indicator, zs[valid], sparse_from_logits(zt[valid], V), labels[valid])
    torch.testing.assert_close(sparse_scores, scores, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kwargs", MODES, ids=["fixed", "latf", "plain-tau2", "reverse", "tau-grad"])
def test_k_equal_to_the_vocabulary_is_the_dense_loss_in_every_mode(kwargs):
    hs, ws, bs, ht, wt, labels = _inputs(3)
    sparse = sparse_from_logits(ht @ wt.t(), V)
    dense = _loss_and_grads(kwargs, hs, ws, bs, (ht, wt), labels, fused=True, chunk_size=7)
    for fused in (False, True):
        _assert_same(dense, _loss_and_grads(kwargs, hs, ws, bs, sparse, labels, fused=fused, chunk_size=7))


def test_k_equal_to_the_vocabulary_in_float32():
    hs, ws, bs, ht, wt, labels = (t.float() if t.is_floating_point() else t for t in _inputs(4))
    kwargs = {"selection": "fixed", "ratio": 0.6}
    dense = _loss_and_grads(kwargs, hs, ws, bs, ht @ wt.t(), labels)
    got = _loss_and_grads(kwargs, hs, ws, bs, sparse_from_logits(ht @ wt.t(), V), labels, fused=True)
    torch.testing.assert_close(got[0], dense[0], rtol=2e-5, atol=1e-6)
    for x, y in zip(got[1], dense[1], strict=True):
        assert (x - y).abs().max() <= 1e-4 * y.abs().max()


# ---------------------------------------------------------------------------------------------------------------
# k < V: the coarse distributions, re-derived in float64 probabilities
# ---------------------------------------------------------------------------------------------------------------


def _coarse_reference(zs, zt, k, tau):
    """(p̃^τ, q̃^τ) by hand: the teacher's k most probable tokens, the rest summed into one outcome, then every
    outcome's probability raised to 1/τ and renormalised."""
    p, q = ref.probs(zt), ref.probs(zs)
    out_p, out_q = [], []
    for i in range(zt.shape[0]):
        order = sorted(range(p.shape[1]), key=lambda j: -float(p[i, j]))[:k]
        rest = [j for j in range(p.shape[1]) if j not in order]
        cp = torch.stack([p[i, j] for j in order] + [p[i, rest].sum()])
        cq = torch.stack([q[i, j] for j in order] + [q[i, rest].sum()])
        t = float(tau[i]) if isinstance(tau, torch.Tensor) else tau
        out_p.append(cp ** (1 / t) / (cp ** (1 / t)).sum())
        out_q.append(cq ** (1 / t) / (cq ** (1 / t)).sum())
    return torch.stack(out_p), torch.stack(out_q)


@pytest.mark.parametrize("base", ["fkl", "rkl", "jsd", "tvd", "sfkl", "srkl", "abkd", "skl", "hellinger"])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_sparse_divergence_matches_a_float64_rederivation(base, k):
    g = torch.Generator().manual_seed(5)
    zs = torch.randn(6, V, generator=g, dtype=torch.float64)
    zt = 2 * torch.randn(6, V, generator=g, dtype=torch.float64)
    tau = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    p, q = _coarse_reference(zs, zt, k, tau)
    want = ref.divergence(base, p, q)
    got = sparse_divergence(base, zs, sparse_from_logits(zt, k), temperature=tau)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 39, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_tail_bucket_conserves_the_mass(k, dtype):
    g = torch.Generator().manual_seed(6)
    zt = (3 * torch.randn(8, V, generator=g)).to(dtype)
    zt[0, 5:] = -math.inf  # a row with only 5 tokens of positive probability
    sparse = sparse_from_logits(zt, k)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(torch.logsumexp(sparse.coarse(dtype), -1), torch.zeros(8, dtype=dtype), atol=tol, rtol=0)
    p = ref.probs(zt.double())
    tail = 1 - p.gather(-1, sparse.ids).sum(-1)
    torch.testing.assert_close(sparse.tail.double().exp(), tail.clamp_min(0), atol=tol, rtol=1e-5)
    # the student's coarse view sums to one too, and its bucket is the exact rest of its mass
    zs = torch.randn(8, V, generator=g, dtype=dtype, requires_grad=True)
    coarse = coarse_student(zs, sparse.ids)
    torch.testing.assert_close(torch.logsumexp(coarse, -1), torch.zeros(8, dtype=dtype), atol=tol, rtol=0)
    coarse.exp()[:, -1].sum().backward()
    assert torch.isfinite(zs.grad).all()
    if k == V:
        assert torch.isneginf(sparse.tail).all() and torch.isneginf(coarse[:, -1]).all()


def test_equal_distributions_give_zero_at_every_temperature():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(5, V, generator=g, dtype=torch.float64)
    for base in adakd.DIVERGENCES:
        for tau in (0.5, 1.0, 1.7):
            got = sparse_divergence(base, z, sparse_from_logits(z, 4), temperature=tau)
            torch.testing.assert_close(got, torch.zeros(5, dtype=torch.float64), atol=1e-7, rtol=0)


def test_the_coarse_divergence_is_never_above_the_dense_one_at_tau_1():
    # data processing: merging outcomes cannot increase an f-divergence
    g = torch.Generator().manual_seed(8)
    zs, zt = torch.randn(50, V, generator=g, dtype=torch.float64), torch.randn(50, V, generator=g, dtype=torch.float64)
    for base in ("fkl", "rkl", "jsd", "tvd", "hellinger"):
        dense = adakd.divergence(base, zs, zt)
        for k in (1, 8, 32):
            assert (sparse_divergence(base, zs, sparse_from_logits(zt, k)) <= dense + 1e-12).all(), (base, k)


# ---------------------------------------------------------------------------------------------------------------
# Both loss paths on a sparse teacher (k < V)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", MODES, ids=["fixed", "latf", "plain-tau2", "reverse", "tau-grad"])
@pytest.mark.parametrize("chunk_size", [1, 6, 1000])
def test_fused_path_equals_the_logits_path_on_a_sparse_teacher(kwargs, chunk_size):
    hs, ws, bs, ht, wt, labels = _inputs(9)
    sparse = sparse_from_logits(ht @ wt.t(), 8)
    a = _loss_and_grads(kwargs, hs, ws, bs, sparse, labels)
    b = _loss_and_grads(kwargs, hs, ws, bs, sparse, labels, fused=True, chunk_size=chunk_size)
    _assert_same(a, b)


def test_the_loss_is_the_mean_of_the_rederived_kept_tokens():
    hs, ws, bs, ht, wt, labels = _inputs(10)
    zs, zt = torch.addmm(bs, hs, ws.t()), ht @ wt.t()
    k = 6
    sparse = sparse_from_logits(zt, k)
    loss_fn = adakd.AdaKDLoss(base="fkl", selection="fixed", ratio=0.5, c=0.7)
    loss = loss_fn(zs, sparse, labels)
    valid = (labels != -100).nonzero().squeeze(1)
    p1, q1 = _coarse_reference(zs[valid], zt[valid], k, 1.0)
    scores = ref.hellinger(p1, q1)
    kept = scores.argsort(descending=True)[: int(len(valid) * 0.5)]
    m = ref.lower_median(scores[kept].tolist())
    tau = torch.exp(-0.7 * torch.tanh(torch.log(scores[kept] / m)))
    p, q = _coarse_reference(zs[valid][kept], zt[valid][kept], k, tau)
    want = (tau**2 * ref.divergence("fkl", p, q)).mean()
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)


def test_one_pass_on_a_sparse_teacher_is_exact_on_a_repeated_batch():
    hs, ws, bs, ht, wt, labels = _inputs(11)
    sparse = sparse_from_logits(ht @ wt.t(), 8)
    exact_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.5)
    one_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.5, one_pass=True)
    for _ in range(2):
        out = []
        for loss_fn in (exact_fn, one_fn):
            p = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
            loss = loss_fn.forward_hidden(p[0], p[1], sparse, None, labels, student_bias=p[2], chunk_size=6)
            out.append((loss, torch.autograd.grad(loss, p), loss_fn.stats))
        _assert_same(*out, stats_rtol=1e-6)  # the one-pass statistics are summed in float32


def test_leading_dimensions_low_precision_storage_and_all_masked():
    hs, ws, bs, ht, wt, labels = _inputs(12, dtype=torch.float32)
    sparse = sparse_from_logits(ht @ wt.t(), 8)
    half = SparseTeacher(sparse.ids, sparse.logprobs.half(), sparse.tail)  # the cache's float16 storage
    loss_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.5)
    flat = loss_fn.forward_hidden(hs, ws, half, None, labels, student_bias=bs)
    assert flat.dtype == torch.float32
    shaped = loss_fn.forward_hidden(
        hs.reshape(1, N, H_S), ws, half.reshape(1, N), None, labels.reshape(1, N), student_bias=bs
    )
    torch.testing.assert_close(shaped, flat)
    logits = loss_fn(torch.addmm(bs, hs, ws.t()).reshape(1, N, V), half.reshape(1, N), labels.reshape(1, N))
    torch.testing.assert_close(logits, flat, rtol=1e-5, atol=1e-7)
    masked = torch.full_like(labels, -100)
    h = hs.clone().requires_grad_(True)
    zero = loss_fn.forward_hidden(h, ws, half, None, masked, student_bias=bs)
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(h.grad, torch.zeros_like(h))


def test_minus_inf_student_logits_give_finite_gradients():
    hs, ws, bs, ht, wt, labels = _inputs(13)
    bs = bs.clone()
    bs[30:] = -math.inf  # padded student rows, some of them in the teacher's support
    sparse = sparse_from_logits(ht @ wt.t(), 12)
    for fused in (False, True):
        loss, grads, _ = _loss_and_grads({"base": "rkl", "selection": "fixed", "ratio": 0.5}, hs, ws, bs, sparse,
                                         labels, fused=fused)  # fmt: skip
        assert torch.isfinite(loss) or loss == math.inf
        assert all(torch.isfinite(g).all() for g in grads[:2])


def test_the_fused_path_never_materialises_the_student_logits_on_a_sparse_teacher():
    n, h, v, chunk = 512, 8, 128, 16
    g = torch.Generator().manual_seed(9)
    hs = torch.randn(n, h, generator=g, requires_grad=True)
    ws = torch.randn(v, h, generator=g, requires_grad=True)
    sparse = sparse_from_logits(torch.randn(n, v, generator=g), 8)
    labels = torch.randint(0, v, (n,), generator=g)
    loss_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.75)
    with _LargestTensor() as mode:
        loss_fn.forward_hidden(hs, ws, sparse, None, labels, chunk_size=chunk).backward()
    assert mode.largest <= max(chunk * v, n * h, v * h, n * 9) * 2  # n × (k + 1): the inputs themselves
    assert mode.largest < n * v / 8


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: SparseTeacher(s.ids + 100, s.logprobs, s.tail), r"ids must lie in \[0, 40\)"),
        (lambda s: SparseTeacher(s.ids[:-1], s.logprobs[:-1], s.tail[:-1]), "must be"),
        (lambda s: SparseTeacher(s.ids.float(), s.logprobs, s.tail), "int64"),
        (lambda s: SparseTeacher(s.ids[..., :0], s.logprobs[..., :0], s.tail), "k = 0"),
        (lambda s: SparseTeacher(torch.cat([s.ids[..., :1], s.ids[..., :-1]], -1), s.logprobs, s.tail), "distinct"),
        (lambda s: SparseTeacher(s.ids, s.logprobs + 0.5, s.tail), "must sum to 1"),
    ],
    ids=["id-out-of-range", "positions", "id-dtype", "k-zero", "repeated-id", "mass-above-1"],
)
def test_bad_sparse_teachers_are_refused(change, match):
    hs, ws, bs, ht, wt, labels = _inputs(14)
    bad = change(sparse_from_logits(ht @ wt.t(), 4))
    loss_fn = adakd.AdaKDLoss()
    with pytest.raises(ValueError, match=match):
        loss_fn(torch.addmm(bs, hs, ws.t()), bad, labels)
    with pytest.raises(ValueError, match=match):
        loss_fn.forward_hidden(hs, ws, bad, None, labels)
    with pytest.raises(ValueError, match="no teacher_weight"):
        loss_fn.forward_hidden(hs, ws, sparse_from_logits(ht @ wt.t(), 4), wt, labels)
