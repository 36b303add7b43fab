"""forward_hidden (chunked, fused with the lm_head) against forward on materialised logits."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adakd

N, H_S, H_T, V_REAL, V_S, V_T = 37, 13, 19, 45, 50, 56  # odd shapes; padded rows beyond V_REAL, teacher larger


def _inputs(seed: int = 0, dtype=torch.float32, bias: bool = True, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H_S, generator=g)
    ws = torch.randn(V_S, H_S, generator=g) * 0.6
    ht = torch.randn(N, H_T, generator=g)
    wt = torch.randn(V_T, H_T, generator=g) * 0.6
    bs = torch.randn(V_S, generator=g) * 0.5 if bias else None
    bt = torch.randn(V_T, generator=g) * 0.5 if bias else None
    if pad:  # padded vocabulary rows: -inf biases give those tokens probability 0 in both models
        bs = torch.zeros(V_S) if bs is None else bs
        bt = torch.zeros(V_T) if bt is None else bt
        bs[V_REAL:] = -math.inf
        bt[V_REAL:] = -math.inf
    labels = torch.randint(0, V_REAL, (N,), generator=g)
    labels[:6] = -100
    labels[20:23] = -100
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hs), cast(ws), cast(bs), cast(ht), cast(wt), cast(bt), labels


def _logits(hs, ws, bs, ht, wt, bt):
    zs = hs @ ws.t() if bs is None else torch.addmm(bs, hs, ws.t())
    zt = ht @ wt.t() if bt is None else torch.addmm(bt, ht, wt.t())
    return zs, zt


def _both(kwargs, inputs, chunk_size, impl="torch"):
    """(loss, grads, stats) of forward on materialised logits and of forward_hidden, from fresh modules."""
    hs, ws, bs, ht, wt, bt, labels = inputs
    params = [t.clone().requires_grad_(True) for t in (hs, ws) + ((bs,) if bs is not None else ())]
    out = []
    for fused in (False, True):
        loss_fn = adakd.AdaKDLoss(**kwargs)
        p = [t.detach().clone().requires_grad_(True) for t in params]
        b = p[2] if bs is not None else None
        if fused:
            loss = loss_fn.forward_hidden(
                p[0], p[1], ht, wt, labels, student_bias=b, teacher_bias=bt, chunk_size=chunk_size, impl=impl
            )
        else:
            zs, zt = _logits(p[0], p[1], b, ht, wt, bt)
            loss = loss_fn(zs, zt, labels)
        grads = torch.autograd.grad(loss, p)
        out.append((loss, grads, loss_fn.stats))
    return out


def _assert_parity(ref, got, rtol=1e-5):
    (l0, g0, s0), (l1, g1, s1) = ref, got
    torch.testing.assert_close(l1, l0, rtol=rtol, atol=1e-7)
    for a, b in zip(g1, g0, strict=True):
        # Relative to the gradient's scale: entries near 0 carry the rounding of the large ones.
        assert (a - b).abs().max() <= rtol * 10 * b.abs().max() + 1e-8
    assert s1.keys() == s0.keys()
    for key in s0:
        if math.isnan(s0[key]):
            assert math.isnan(s1[key]), key
        else:
            assert s1[key] == pytest.approx(s0[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("chunk_size", [1, 7, N, 1000])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"selection": "fixed", "ratio": 0.6},
        {"selection": "fixed", "ratio": 0.6, "temperature": "reverse"},
        {"selection": "all", "temperature": "fixed"},
        {"selection": "all", "temperature": "fixed", "tau_base": 2.0},
        {"selection": "latf"},
        {"selection": "linear", "ratio": 0.3, "total_steps": 1, "temperature": "fixed", "tau_base": 1.5},
        {"selection": "cosine", "ratio": 0.4, "total_steps": 1, "temperature": "reverse", "c": 0.9},
    ],
    ids=["fixed-inverse", "fixed-reverse", "plain-kd", "hinton-tau2", "latf", "linear-fixed-tau", "cosine-reverse"],
)
def test_parity_chunk_sizes_and_modes(chunk_size, kwargs):
    _assert_parity(*_both(kwargs, _inputs(0), chunk_size))


@pytest.mark.parametrize("base", list(adakd.DIVERGENCES))
def test_parity_every_base_divergence(base):
    _assert_parity(*_both({"base": base, "selection": "fixed", "ratio": 0.7, "c": 0.8}, _inputs(1), 7))


@pytest.mark.parametrize("indicator", list(adakd.INDICATORS))
def test_parity_every_indicator(indicator):
    _assert_parity(*_both({"indicator": indicator, "selection": "fixed", "ratio": 0.5}, _inputs(2), 5))


@pytest.mark.parametrize(("bias", "pad"), [(False, False), (True, False), (False, True)])
def test_parity_with_and_without_biases(bias, pad):
    _assert_parity(*_both({"selection": "fixed", "ratio": 0.75}, _inputs(3, bias=bias, pad=pad), 8))


def test_parity_sum_reduction_and_float64():
    _assert_parity(*_both({"selection": "fixed", "ratio": 0.5, "reduction": "sum"}, _inputs(4), 6))
    ref, got = _both({"selection": "fixed", "ratio": 0.5}, _inputs(4, dtype=torch.float64), 6)
    assert got[0].dtype == torch.float64
    _assert_parity(ref, got, rtol=1e-12)


def test_latf_state_evolves_identically():
    hs, ws, bs, ht, wt, bt, labels = _inputs(5)
    kwargs = dict(ema_decay=0.0, tolerance=0.0, step_size=0.3, min_ratio=0.2)
    a, b = adakd.AdaKDLoss(**kwargs), adakd.AdaKDLoss(**kwargs)
    ratios = []
    for scale in (1.0, 0.5, 0.25, 0.6, 2.0):
        zs, zt = _logits(hs * scale, ws, bs, ht, wt, bt)
        a(zs, zt, labels)
        b.forward_hidden(hs * scale, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, chunk_size=9)
        assert a.stats["kept_tokens"] == b.stats["kept_tokens"]
        ratios.append(a.step())
        assert ratios[-1] == b.step()
    assert min(ratios) < 1.0  # LATF moved
    assert a.controller.state_dict() == pytest.approx(b.controller.state_dict())


def test_leading_dimensions_and_no_teacher_gradient():
    hs, ws, bs, ht, wt, bt, labels = _inputs(6)
    hs = hs[:36].reshape(4, 9, H_S).requires_grad_(True)
    ht = ht[:36].reshape(4, 9, H_T).requires_grad_(True)
    wt = wt.clone().requires_grad_(True)
    loss = adakd.AdaKDLoss(selection="fixed", ratio=0.5).forward_hidden(
        hs, ws, ht, wt, labels[:36].reshape(4, 9), student_bias=bs, teacher_bias=bt
    )
    loss.backward()
    assert hs.grad.shape == hs.shape and hs.grad.abs().sum() > 0
    assert ht.grad is None and wt.grad is None


def test_all_masked_is_zero_with_zero_gradients():
    hs, ws, bs, ht, wt, bt, labels = _inputs(7)
    p = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    loss = adakd.AdaKDLoss().forward_hidden(
        p[0], p[1], ht, wt, torch.full_like(labels, -100), student_bias=p[2], teacher_bias=bt
    )
    loss.backward()
    assert loss.item() == 0.0
    for t in p:
        assert t.grad is not None and torch.isfinite(t.grad).all() and (t.grad == 0).all()


def test_eval_without_grad_gives_the_same_loss():
    hs, ws, bs, ht, wt, bt, labels = _inputs(8)
    loss_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.5)
    with_grad = loss_fn.forward_hidden(hs.requires_grad_(True), ws, ht, wt, labels, student_bias=bs, teacher_bias=bt)
    with torch.no_grad():
        no_grad = loss_fn.forward_hidden(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt)
    torch.testing.assert_close(no_grad, with_grad.detach())


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_the_token_by_vocabulary_logits():
    n, h, v, chunk = 512, 8, 128, 16
    g = torch.Generator().manual_seed(9)
    hs = torch.randn(n, h, generator=g, requires_grad=True)
    ws = torch.randn(v, h, generator=g, requires_grad=True)
    ht, wt = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    loss_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.75)
    with _LargestTensor() as mode:
        loss_fn.forward_hidden(hs, ws, ht, wt, labels, chunk_size=chunk).backward()
    # The largest tensors are one chunk's logits, the [N, H] gradient and the [V, H] weight: nothing near N × V.
    assert mode.largest <= max(chunk * v, n * h, v * h) * 2
    assert mode.largest < n * v / 8
    with _LargestTensor() as naive:
        loss_fn(hs @ ws.t(), ht @ wt.t(), labels).backward()
    assert naive.largest >= n * v * 0.75  # the check above can fail: the naive path does materialise them


def _bf16_errors(fused: bool):
    hs, ws, bs, ht, wt, bt, labels = _inputs(10, pad=False)
    lp = [t.bfloat16() for t in (hs, ws, bs, ht, wt, bt)]
    exact_in = [t.double() for t in lp]  # the same (rounded) inputs, in float64
    loss64, g64 = None, None
    ref_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.6)
    p64 = [t.clone().requires_grad_(True) for t in exact_in[:3]]
    zs, zt = _logits(p64[0], p64[1], p64[2], *exact_in[3:])
    loss64 = ref_fn(zs, zt, labels)
    g64 = torch.autograd.grad(loss64, p64)

    loss_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.6)
    p = [t.clone().requires_grad_(True) for t in lp[:3]]
    if fused:
        loss = loss_fn.forward_hidden(
            p[0], p[1], lp[3], lp[4], labels, student_bias=p[2], teacher_bias=lp[5], chunk_size=7
        )
    else:
        zs, zt = _logits(p[0], p[1], p[2], *lp[3:])
        loss = loss_fn(zs, zt, labels)
    grads = torch.autograd.grad(loss, p)
    loss_err = abs(loss.double().item() - loss64.item())
    grad_errs = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, g64, strict=True)]
    return loss_err, grad_errs


def test_bf16_no_worse_than_naive_bf16():
    naive_loss, naive_grads = _bf16_errors(fused=False)
    fused_loss, fused_grads = _bf16_errors(fused=True)
    # Both are dominated by the bf16 rounding of the logits (~2e-3 on the loss here); the fused path may not add
    # more than a tenth on top of it.
    assert fused_loss <= 1.1 * naive_loss + 1e-5
    for f, nv in zip(fused_grads, naive_grads, strict=True):
        assert f <= 1.1 * nv + 1e-3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: {**a, "ws": a["ws"][:, :-1]}, "student_weight"),
        (lambda a: {**a, "wt": a["wt"][:40]}, "larger than the teacher"),
        (lambda a: {**a, "labels": a["labels"][:-1]}, "leading shape"),
        (lambda a: {**a, "bs": a["bs"][:-1]}, "student_bias"),
        (lambda a: {**a, "ws": a["ws"].double()}, "cast one of them"),
        (lambda a: {**a, "chunk_size": 0}, "chunk_size"),
        (lambda a: {**a, "impl": "triton"}, "unknown impl"),
    ],
)
def test_errors(change, match):
    hs, ws, bs, ht, wt, bt, labels = _inputs(11)
    a = change(dict(hs=hs, ws=ws, bs=bs, ht=ht, wt=wt, bt=bt, labels=labels, chunk_size=None, impl=None))
    with pytest.raises(ValueError, match=match):
        adakd.AdaKDLoss().forward_hidden(
            a["hs"], a["ws"], a["ht"], a["wt"], a["labels"], student_bias=a["bs"], teacher_bias=a["bt"],
            chunk_size=a["chunk_size"], impl=a["impl"],
        )  # fmt: skip


@pytest.mark.slow
def test_compile_impl_matches_eager():
    # torch.compile on the CPU builds C++ kernels: a few tens of seconds the first time.
    kwargs = {"selection": "fixed", "ratio": 0.6}
    ref, _ = _both(kwargs, _inputs(12), 8)
    _, got = _both(kwargs, _inputs(12), 8, impl="compile")
    _assert_parity(ref, got)


# --------------------------------------------------------------------------------------------------------------
# The one-pass approximation
# --------------------------------------------------------------------------------------------------------------

ONE_PASS_MODES = [
    {"selection": "fixed", "ratio": 0.6},
    {"selection": "fixed", "ratio": 0.6, "temperature": "fixed"},
    {"selection": "all"},
    {"selection": "fixed", "ratio": 0.3, "temperature": "reverse", "reduction": "sum"},
    {"selection": "latf"},
]


@pytest.mark.parametrize("kwargs", ONE_PASS_MODES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_one_pass_is_exact_on_a_repeated_batch(kwargs):
    # The previous batch is this batch: its k-th score and kept median are this batch's own, so the approximation
    # must reproduce the exact loss; the first call has no previous batch and runs the exact passes.
    inputs = _inputs(13)
    hs, ws, bs, ht, wt, bt, labels = inputs
    exact_fn, one_fn = adakd.AdaKDLoss(**kwargs), adakd.AdaKDLoss(one_pass=True, **kwargs)
    for _ in range(2):
        out = []
        for loss_fn in (exact_fn, one_fn):
            p = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
            loss = loss_fn.forward_hidden(p[0], p[1], ht, wt, labels, student_bias=p[2], teacher_bias=bt, chunk_size=6)
            out.append((loss, torch.autograd.grad(loss, p), loss_fn.stats))
        _assert_parity(*out)


def test_one_pass_uses_the_previous_threshold_and_median():
    hs, ws, bs, ht, wt, bt, labels = _inputs(14, pad=False)
    hs2 = torch.randn(hs.shape, generator=torch.Generator().manual_seed(99))  # a different micro-batch
    loss_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.5, one_pass=True)
    loss_fn.forward_hidden(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt)
    x = hs2.clone().requires_grad_(True)
    got = loss_fn.forward_hidden(x, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, chunk_size=5)
    (g,) = torch.autograd.grad(got, x)

    # Reference, from materialised logits: threshold = the previous batch's k-th score, median = the lower median of
    # the previous batch's kept scores; keep this batch's tokens at or above the threshold.
    mask = labels != -100
    zs1, zt = _logits(hs, ws, bs, ht, wt, bt)
    zt = zt[:, :V_S]
    prev = adakd.difficulty_scores("hellinger", zs1, zt)[mask]
    top = prev.topk(math.floor(prev.numel() * 0.5)).values
    threshold, median = top[-1], top.median()
    y = hs2.clone().requires_grad_(True)
    zs2, _ = _logits(y, ws, bs, ht, wt, bt)
    scores = adakd.difficulty_scores("hellinger", zs2, zt)
    keep = mask & (scores >= threshold)
    tau = adakd.adaptive.idts_from_median(scores[keep], median)
    per_token = adakd.divergence("rkl", zs2[keep], zt[keep], temperature=tau) * tau**2
    want = per_token.mean()
    (g_want,) = torch.autograd.grad(want, y)
    assert loss_fn.stats["kept_tokens"] == int(keep.sum()) != math.floor(int(mask.sum()) * 0.5)
    assert loss_fn.stats["score_threshold"] == pytest.approx(scores[keep].min().item())  # this batch's kept set
    assert loss_fn.stats["score_median"] == pytest.approx(scores[keep].median().item())
    assert loss_fn.stats["tau_mean"] == pytest.approx(tau.mean().item())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g, g_want, rtol=1e-4, atol=1e-7)


def test_one_pass_falls_back_to_exact_when_nothing_passes():
    hs, ws, bs, ht, wt, bt, labels = _inputs(15, pad=False)
    kwargs = {"selection": "fixed", "ratio": 0.5}
    one_fn = adakd.AdaKDLoss(one_pass=True, **kwargs)
    one_fn.forward_hidden(hs * 3, ws, ht * 3, wt, labels, student_bias=bs, teacher_bias=bt)  # hard: high scores
    easy = (hs * 0.01, ws, ht * 0.01, wt, labels)  # near-uniform distributions: every score far below
    got = one_fn.forward_hidden(*easy, student_bias=bs * 0.01, teacher_bias=bt * 0.01)
    want = adakd.AdaKDLoss(**kwargs).forward_hidden(*easy, student_bias=bs * 0.01, teacher_bias=bt * 0.01)
    torch.testing.assert_close(got, want)
    assert one_fn.stats["kept_tokens"] == math.floor(int((labels != -100).sum()) * 0.5)


def test_one_pass_state_is_checkpointed():
    hs, ws, bs, ht, wt, bt, labels = _inputs(16)
    a = adakd.AdaKDLoss(selection="fixed", ratio=0.5, one_pass=True)
    a.forward_hidden(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt)
    b = adakd.AdaKDLoss(selection="fixed", ratio=0.5, one_pass=True)
    b.load_state_dict(a.state_dict())
    hs2 = hs.flip(0)
    la = a.forward_hidden(hs2, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt)
    lb = b.forward_hidden(hs2, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt)
    torch.testing.assert_close(la, lb)
    assert a.stats == b.stats


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"selection": "fixed", "ratio": 0.6, "detach_tau": False},
        {"selection": "fixed", "ratio": 0.6, "detach_tau": False, "temperature": "reverse", "c": 0.9},
        {"selection": "latf", "detach_tau": False, "tau_weight": "none"},
        {"selection": "cosine", "ratio": 0.4, "total_steps": 1, "tau_weight": "none"},
        {"selection": "fixed", "ratio": 0.5, "detach_tau": False, "reduction": "sum"},
    ],
    ids=["through-tau", "through-tau-reverse", "latf-through-tau-no-weight", "cosine-no-weight", "through-tau-sum"],
)
def test_parity_tau_variants(chunk_size, kwargs):
    """The fused path's third pass (the gradient through τ, its scores and their median) equals autograd on the
    materialised logits; the τ weight applies alike."""
    _assert_parity(*_both(kwargs, _inputs(5), chunk_size))


@pytest.mark.parametrize("indicator", list(adakd.INDICATORS))
def test_parity_gradient_through_tau_for_every_indicator(indicator):
    kwargs = {"indicator": indicator, "selection": "fixed", "ratio": 0.5, "detach_tau": False}
    _assert_parity(*_both(kwargs, _inputs(6), 5))


# ---------------------------------------------------------------------------------------------------------------
# Cross-entropy mixed into the fused passes (ce_weight) and the fused CE alone
# ---------------------------------------------------------------------------------------------------------------

CE_MODES = [
    {"selection": "fixed", "ratio": 0.6},
    {"selection": "all", "temperature": "fixed"},  # plain KD: no pass 1, the CE comes from pass 2's logits
    {"selection": "latf"},
    {"selection": "fixed", "ratio": 0.5, "detach_tau": False},
    {"selection": "fixed", "ratio": 0.6, "reduction": "sum"},
    {"selection": "all", "temperature": "fixed", "reduction": "sum"},
]
CE_IDS = ["fixed", "plain-kd", "latf", "tau-grad", "fixed-sum", "plain-kd-sum"]


def _with_ce(kwargs, inputs, fused, ce_weight, chunk_size=7):
    hs, ws, bs, ht, wt, bt, labels = inputs
    loss_fn = adakd.AdaKDLoss(**kwargs)
    p = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    if fused:
        loss, report = loss_fn.forward_hidden(
            p[0], p[1], ht, wt, labels, student_bias=p[2], teacher_bias=bt, chunk_size=chunk_size,
            ce_weight=ce_weight, return_report=True,
        )  # fmt: skip
    else:
        zs, zt = _logits(p[0], p[1], p[2], ht, wt, bt)
        loss, report = loss_fn(zs, zt, labels, ce_weight=ce_weight, return_report=True)
    return loss, torch.autograd.grad(loss, p), report


@pytest.mark.parametrize("kwargs", CE_MODES, ids=CE_IDS)
def test_ce_weight_is_the_kd_loss_plus_the_weighted_mean_cross_entropy(kwargs):
    inputs = _inputs(21, dtype=torch.float64, pad=False)
    hs, ws, bs, ht, wt, bt, labels = inputs
    w = 0.7
    loss, grads, report = _with_ce(kwargs, inputs, False, w)
    kd, kd_grads, kd_report = _with_ce(kwargs, inputs, False, 0.0)
    p = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(torch.addmm(p[2], p[0], p[1].t())[valid], labels[valid])  # a mean
    k = kd_report.kept_tokens if kwargs.get("reduction") == "sum" else 1
    ce_grads = torch.autograd.grad(w * k * ce, p)
    torch.testing.assert_close(loss, kd + w * k * ce.detach(), rtol=1e-12, atol=1e-12)
    for g, g_kd, g_ce in zip(grads, kd_grads, ce_grads, strict=True):
        torch.testing.assert_close(g, g_kd + g_ce, rtol=1e-10, atol=1e-12)
    assert report.mean_loss == pytest.approx(kd_report.mean_loss, rel=1e-12)  # LATF sees L_t alone
    assert report.ce_loss == pytest.approx(ce.item(), rel=1e-12) and math.isnan(kd_report.ce_loss)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("kwargs", CE_MODES, ids=CE_IDS)
def test_ce_weight_fused_equals_logits(kwargs, chunk_size):
    inputs = _inputs(22)
    loss0, grads0, r0 = _with_ce(kwargs, inputs, False, 0.4)
    loss1, grads1, r1 = _with_ce(kwargs, inputs, True, 0.4, chunk_size)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads1, grads0, strict=True):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-8
    assert r1.mean_loss == pytest.approx(r0.mean_loss, rel=1e-5) and r1.ce_loss == pytest.approx(r0.ce_loss, rel=1e-5)


def test_ce_weight_in_one_pass_mode_on_a_repeated_batch():
    inputs = _inputs(23)
    hs, ws, bs, ht, wt, bt, labels = inputs
    exact_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.5)
    one_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.5, one_pass=True)
    for _ in range(2):  # the second call is a real one-pass call (the previous batch is this one)
        out = []
        for loss_fn in (exact_fn, one_fn):
            p = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
            loss, report = loss_fn.forward_hidden(
                p[0], p[1], ht, wt, labels, student_bias=p[2], teacher_bias=bt, chunk_size=6, ce_weight=0.3,
                return_report=True,
            )  # fmt: skip
            out.append((loss, torch.autograd.grad(loss, p), report))
        (l0, g0, r0), (l1, g1, r1) = out
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
        for a, b in zip(g1, g0, strict=True):
            assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-8
        assert r1.mean_loss == pytest.approx(r0.mean_loss, rel=1e-5) and r1.ce_loss == pytest.approx(r0.ce_loss)


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


@pytest.mark.parametrize("kwargs", CE_MODES[:3], ids=CE_IDS[:3])
def test_mixing_cross_entropy_adds_no_logit_product(kwargs):
    hs, ws, bs, ht, wt, bt, labels = _inputs(24, pad=False)
    counts = []
    for w in (0.0, 0.5):
        p = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
        with _LogitProducts(V_S) as mode:
            loss = adakd.AdaKDLoss(**kwargs).forward_hidden(
                p[0], p[1], ht, wt, labels, student_bias=p[2], teacher_bias=bt, chunk_size=5, ce_weight=w
            )
            loss.backward()
        counts.append(mode.count)
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_cross_entropy_equals_torch(dtype):
    from adakd.fused import fused_cross_entropy

    hs, ws, bs, _, _, _, labels = _inputs(25, dtype=dtype)
    p = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    got = fused_cross_entropy(p[0], p[1], p[2], labels, chunk_size=4)
    q = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    want = torch.nn.functional.cross_entropy(torch.addmm(q[2], q[0], q[1].t()).to(dtype), labels, reduction="sum")
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, p), torch.autograd.grad(want, q), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    h = hs.clone().requires_grad_(True)
    zero = fused_cross_entropy(h, ws, bs, torch.full_like(labels, -100), chunk_size=4)
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(h.grad, torch.zeros_like(h))


class _BigDivisions(TorchDispatchMode):
    """Counts divisions whose output has at least ``size`` elements (a [c, V] logits division)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.count = size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.div.Tensor, torch.ops.aten.div_.Tensor) and out.numel() >= self.size:
            self.count += 1
        return out


def test_pass_2_divides_the_hidden_states_by_tau_not_the_logits():
    # Without biases, in float32/float64, 1/τ_i scales the [c, H] hidden states before the products: exact to
    # rounding (float64 here, against the logits path), and no [c, V] division is left in the forward.
    kwargs = {"selection": "fixed", "ratio": 0.6, "c": 0.9}
    inputs = _inputs(26, dtype=torch.float64, bias=False, pad=False)
    (l0, g0, _), (l1, g1, _) = _both(kwargs, inputs, 7)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    hs, ws, _, ht, wt, _, labels = _inputs(26, bias=False, pad=False)
    counts = []
    for bias in (None, torch.zeros(V_S)):
        with _BigDivisions(7 * V_S) as mode:
            adakd.AdaKDLoss(**kwargs).forward_hidden(hs, ws, ht, wt[:V_S], labels, student_bias=bias, chunk_size=7)
        counts.append(mode.count)
    assert counts[0] == 0 < counts[1]  # with a bias the logits are divided (z/τ needs b/τ per row)
