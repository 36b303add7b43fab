"""AdaKDLoss(..., mix=Mix(kd_ratio, window_tokens)): (1 − α)·ΣCE/W + α·ΣKD_kept/(W·k/n), on logits and fused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import adakd
from adakd.errors import OptionError
from adakd.integrations import window_mean

N, H_S, H_T, V = 29, 11, 13, 40

MODES = [
    {"selection": "fixed", "ratio": 0.6},
    {"selection": "all", "temperature": "fixed"},  # plain KD: no pass 1 on the fused path
    {"selection": "latf"},
    {"selection": "fixed", "ratio": 0.5, "detach_tau": False},
    {"selection": "fixed", "ratio": 0.6, "reduction": "mean"},  # a mix ignores the loss's own reduction
]
IDS = ["fixed", "plain-kd", "latf", "tau-grad", "mean-reduction"]


def _inputs(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H_S, generator=g, dtype=dtype)
    ws = torch.randn(V, H_S, generator=g, dtype=dtype) * 0.6
    bs = torch.randn(V, generator=g, dtype=dtype) * 0.5
    ht = torch.randn(N, H_T, generator=g, dtype=dtype)
    wt = torch.randn(V, H_T, generator=g, dtype=dtype) * 0.6
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:4] = -100
    labels[17:19] = -100
    return hs, ws, bs, ht, wt, labels


def _loss_fn(kwargs):
    kwargs = {"reduction": "sum", **kwargs}
    return adakd.AdaKDLoss(**kwargs)


def _mixed(kwargs, inputs, mix, fused, chunk_size=6):
    """(loss, grads of (hs, ws, bs), report) with ``mix``."""
    hs, ws, bs, ht, wt, labels = inputs
    p = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    loss_fn = _loss_fn(kwargs)
    if fused:
        loss, report = loss_fn.forward_hidden(
            p[0], p[1], ht, wt, labels, student_bias=p[2], chunk_size=chunk_size, mix=mix, return_report=True
        )
    else:
        zs, zt = torch.addmm(p[2], p[0], p[1].t()), ht @ wt.t()
        loss, report = loss_fn(zs, zt, labels, mix=mix, return_report=True)
    return loss, torch.autograd.grad(loss, p), report


def _trainer_algebra(kwargs, inputs, alpha, window, fused, chunk_size=6):
    """Today's trainer (train/trainer.py ``compute_loss``): the same loss, written out with ``window_mean``."""
    hs, ws, bs, ht, wt, labels = inputs
    p = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    valid = (labels != -100).sum()
    denom = valid.clamp_min(1).to(torch.float32) if window is None else torch.as_tensor(window, dtype=torch.float32)
    loss_fn = _loss_fn({**kwargs, "reduction": "sum"})
    if fused:
        if alpha == 0:
            loss = adakd.fused.fused_cross_entropy(p[0], p[1], p[2], labels, chunk_size) / denom
        else:
            total, report = loss_fn.forward_hidden(
                p[0],
                p[1],
                ht,
                wt,
                labels,
                student_bias=p[2],
                chunk_size=chunk_size,
                ce_weight=(1 - alpha) / alpha,
                return_report=True,
            )
            loss = alpha * window_mean(total, report, denom)
    else:
        zs = torch.addmm(p[2], p[0], p[1].t())
        ce = F.cross_entropy(zs.float(), labels, ignore_index=-100, reduction="sum") / denom
        terms = [(1 - alpha, ce)]
        if alpha > 0:
            kd_sum, report = loss_fn(zs, ht @ wt.t(), labels, return_report=True)
            terms.append((alpha, window_mean(kd_sum, report, denom)))
        loss = sum(w * t for w, t in terms if w > 0 or alpha == 0)
    return loss, torch.autograd.grad(loss, p)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("window", [None, 100.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kwargs", MODES, ids=IDS)
def test_mix_is_the_trainers_algebra_bit_for_bit(kwargs, alpha, window, fused):
    inputs = _inputs(1, torch.float32)
    got, got_grads, _ = _mixed(kwargs, inputs, adakd.Mix(alpha, window), fused)
    want, want_grads = _trainer_algebra(kwargs, inputs, alpha, window, fused)
    assert torch.equal(got, want), (got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("window", [None, 57.0])
@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("kwargs", MODES, ids=IDS)
def test_fused_mix_matches_a_float64_rederivation(kwargs, alpha, window):
    # Independent of the library's loss: ΣCE by hand; ΣKD_kept and k from the float64 logits path.
    inputs = _inputs(2)
    hs, ws, bs, ht, wt, labels = inputs
    got, got_grads, report = _mixed(kwargs, inputs, adakd.Mix(alpha, window), True)
    p = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    zs = torch.addmm(p[2], p[0], p[1].t())
    valid = labels != -100
    n = int(valid.sum())
    w = float(n if window is None else window)
    ce_sum = -torch.log_softmax(zs[valid], -1).gather(1, labels[valid].unsqueeze(1)).sum()
    want = (1 - alpha) * ce_sum / w
    if alpha > 0:
        kd_sum, kd_report = _loss_fn({**kwargs, "reduction": "sum"})(zs, ht @ wt.t(), labels, return_report=True)
        k = kd_report.kept_tokens
        assert report.kept_tokens == k and report.valid_tokens == n
        want = want + alpha * kd_sum / (w * k / n)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, torch.autograd.grad(want, p), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # The report's two parts make up the loss.
    parts = [(1 - alpha, report.ce_term), (alpha, report.kd_term)]
    assert sum(a * t for a, t in parts if a > 0) == pytest.approx(got.item(), rel=1e-12)
    assert math.isnan(report.kd_term) == (alpha == 0) and math.isnan(report.ce_term) == (alpha == 1)
    if alpha < 1:
        assert report.ce_term == pytest.approx(ce_sum.item() / w, rel=1e-12)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_kd_ratio_zero_needs_no_teacher_and_leaves_the_state(fused):
    hs, ws, bs, _, _, labels = _inputs(3)
    loss_fn = adakd.AdaKDLoss(reduction="sum")
    h = hs.clone().requires_grad_(True)
    if fused:
        loss, report = loss_fn.forward_hidden(
            h, ws, None, None, labels, student_bias=bs, mix=adakd.Mix(0.0), return_report=True
        )
    else:
        loss, report = loss_fn(torch.addmm(bs, h, ws.t()), None, labels, mix=adakd.Mix(0.0), return_report=True)
    want = F.cross_entropy(torch.addmm(bs, hs, ws.t()).float(), labels, reduction="mean")
    torch.testing.assert_close(loss.float(), want, rtol=1e-6, atol=1e-7)
    loss.backward()
    assert h.grad.abs().sum() > 0
    assert loss_fn.pending() == (0.0, 0) and loss_fn.last_report is None
    assert report.kept_tokens == 0 and report.valid_tokens == int((labels != -100).sum())
    assert math.isnan(report.kd_term) and report.ce_term == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_latf_sees_the_same_l_t_with_and_without_a_mix(fused):
    inputs = _inputs(4)
    _, _, plain = _mixed({"selection": "latf"}, inputs, adakd.Mix(1.0), fused)
    _, _, mixed = _mixed({"selection": "latf"}, inputs, adakd.Mix(0.4, 80), fused)
    assert mixed.mean_loss == pytest.approx(plain.mean_loss, rel=1e-12)
    hs, ws, bs, ht, wt, labels = inputs
    loss_fn = _loss_fn({"selection": "latf"})
    loss_fn(torch.addmm(bs, hs, ws.t()), ht @ wt.t(), labels, mix=adakd.Mix(0.4, 80))
    assert loss_fn.pending()[1] == 1 and loss_fn.pending()[0] == pytest.approx(plain.mean_loss, rel=1e-12)


def test_mix_errors():
    with pytest.raises(OptionError, match="kd_ratio"):
        adakd.Mix(1.5)
    with pytest.raises(OptionError, match="kd_ratio"):
        adakd.Mix(float("nan"))
    hs, ws, bs, ht, wt, labels = _inputs(5)
    zs, zt = torch.addmm(bs, hs, ws.t()), ht @ wt.t()
    with pytest.raises(OptionError, match="ce_weight"):
        adakd.AdaKDLoss()(zs, zt, labels, ce_weight=0.5, mix=adakd.Mix(0.5))
    with pytest.raises(ValueError, match="teacher"):
        adakd.AdaKDLoss()(zs, None, labels, mix=adakd.Mix(0.5))
    assert adakd.loss.Mix is adakd.Mix


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_mix_in_one_pass_mode_is_the_trainers_algebra(alpha):
    # The second call is a real one-pass call (the previous batch is the first); both losses see the same history.
    inputs = _inputs(6, torch.float32)
    hs, ws, bs, ht, wt, labels = inputs
    kwargs = {"selection": "fixed", "ratio": 0.5, "one_pass": True, "reduction": "sum"}
    mixed_fn, plain_fn = adakd.AdaKDLoss(**kwargs), adakd.AdaKDLoss(**kwargs)
    denom = (labels != -100).sum().clamp_min(1).to(torch.float32)
    for scale in (1.0, 0.8):
        p = [t.clone().requires_grad_(True) for t in (hs * scale, ws, bs)]
        got = mixed_fn.forward_hidden(p[0], p[1], ht, wt, labels, student_bias=p[2], chunk_size=5, mix=adakd.Mix(alpha))
        q = [t.clone().requires_grad_(True) for t in (hs * scale, ws, bs)]
        total, report = plain_fn.forward_hidden(
            q[0],
            q[1],
            ht,
            wt,
            labels,
            student_bias=q[2],
            chunk_size=5,
            ce_weight=(1 - alpha) / alpha,
            return_report=True,
        )
        want = alpha * window_mean(total, report, denom)
        assert torch.equal(got, want)
        for a, b in zip(torch.autograd.grad(got, p), torch.autograd.grad(want, q), strict=True):
            assert torch.equal(a, b)
    assert mixed_fn.pending() == plain_fn.pending()
