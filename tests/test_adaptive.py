"""Difficulty indicators, IDTS temperatures and the ratio controllers (LATF and the ablation schedules)."""

from __future__ import annotations

import math

import pytest
import torch

import adakd
from adakd.adaptive import keep_count

from . import reference as ref

# --------------------------------------------------------------------------------------------------------------
# IDTS
# --------------------------------------------------------------------------------------------------------------


def test_idts_closed_form():
    # c = 0.5, median 1: ρ = s/m of 0.25, 0.5, 1, 2, 4 → τ = exp(−0.5·tanh(log ρ)).
    tau = adakd.idts_temperatures(torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0]))
    want = torch.tensor([1.554, 1.350, 1.000, 0.741, 0.643])
    torch.testing.assert_close(tau, want, atol=1e-3, rtol=0)  # the issue quotes 3 decimals
    # Exact values: tanh(log ρ) = (ρ² − 1)/(ρ² + 1).
    exact = [math.exp(-0.5 * (r * r - 1) / (r * r + 1)) for r in (0.25, 0.5, 1.0, 2.0, 4.0)]
    torch.testing.assert_close(tau, torch.tensor(exact), atol=1e-6, rtol=1e-6)


def test_idts_uses_the_lower_median_and_is_scale_invariant():
    scores = torch.tensor([3.0, 1.0, 2.0, 4.0])  # lower median 2
    tau = adakd.idts_temperatures(scores, c=0.3, tau_base=2.0)
    want = [2.0 * math.exp(-0.3 * math.tanh(math.log(s / 2.0))) for s in (3.0, 1.0, 2.0, 4.0)]
    torch.testing.assert_close(tau, torch.tensor(want), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(adakd.idts_temperatures(scores * 7.5, c=0.3, tau_base=2.0), tau)


def test_idts_reverse_and_zero_median_and_zero_scores():
    scores = torch.tensor([0.25, 1.0, 4.0])
    fwd = adakd.idts_temperatures(scores)
    rev = adakd.idts_temperatures(scores, reverse=True)
    torch.testing.assert_close(fwd * rev, torch.ones(3))  # exp(−cŝ)·exp(+cŝ) = 1
    # Median 0 (student equals teacher on most kept tokens): every ŝ = 0, τ = τ_base.
    torch.testing.assert_close(
        adakd.idts_temperatures(torch.tensor([0.0, 0.0, 0.5]), tau_base=1.3), torch.full((3,), 1.3)
    )
    # A zero score with a positive median: ŝ = tanh(log 1e-8) ≈ −1, τ ≈ exp(c).
    tau = adakd.idts_temperatures(torch.tensor([0.0, 1.0, 2.0]))
    assert tau[0].item() == pytest.approx(math.exp(0.5 * math.tanh(-math.log(1e-8))), rel=1e-6)
    assert adakd.idts_temperatures(torch.tensor([])).numel() == 0


def test_idts_bounds_and_no_gradient():
    scores = (torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 10).requires_grad_(True)
    scores.data[0] = 1e6  # far above the median: tanh saturates to 1 in float32, so τ reaches e^c exactly
    tau = adakd.idts_temperatures(scores)
    assert not tau.requires_grad
    # (e^−c, e^c) in exact arithmetic; float32 rounding can land on the bounds themselves.
    low, high = torch.tensor(math.exp(-0.5)), torch.tensor(math.exp(0.5))
    assert tau.min() >= low and tau.max() <= high and tau.max() == high


# --------------------------------------------------------------------------------------------------------------
# LATF
# --------------------------------------------------------------------------------------------------------------

# β = 0.5, ε = 0.1, δ = 0.5, r ∈ [0.3, 1], 2 warm-up steps. Each row: loss, EMA, L_ref, ratio after the step,
# computed by hand from the spec's rule.
TRAJECTORY = [
    (10.0, 10.0, None, 1.0),  # warm-up
    (10.0, 10.0, None, 1.0),  # warm-up
    (10.0, 10.0, 10.0, 1.0),  # first step after warm-up: L_ref = L̄
    (6.0, 8.0, 8.0, 0.5),  # 8 < 10·0.9: r·(1 − δ)
    (7.0, 7.5, 8.0, 0.5),  # 7.2 ≤ 7.5 ≤ 8.8: unchanged
    (2.0, 4.75, 4.75, 0.3),  # falls: 0.25 clipped to r_min
    (1.0, 2.875, 2.875, 0.3),  # falls again: stays at r_min, L_ref still moves
    (9.0, 5.9375, 5.9375, 0.45),  # 5.94 > 2.875·1.1: r·(1 + δ)
    (20.0, 12.96875, 12.96875, 0.675),
    (30.0, 21.484375, 21.484375, 1.0),  # 1.0125 clipped to r_max
]
LATF_ARGS = dict(ema_decay=0.5, tolerance=0.1, step_size=0.5, min_ratio=0.3, max_ratio=1.0, warmup_steps=2)


def test_latf_trajectory_by_hand():
    latf = adakd.LATF(**LATF_ARGS)
    assert latf.ratio == 1.0
    for i, (loss, ema, ref_loss, ratio) in enumerate(TRAJECTORY, start=1):
        assert latf.update(loss) == pytest.approx(ratio), f"step {i}"
        assert latf.ratio == pytest.approx(ratio)
        assert latf.ema == pytest.approx(ema)
        assert latf.ref == (None if ref_loss is None else pytest.approx(ref_loss))
        assert latf.num_steps == i


def test_latf_resume_from_state_dict_continues_exactly():
    full = adakd.LATF(**LATF_ARGS)
    ratios = [full.update(row[0]) for row in TRAJECTORY]

    first = adakd.LATF(**LATF_ARGS)
    for row in TRAJECTORY[:6]:
        first.update(row[0])
    state = first.state_dict()
    resumed = adakd.LATF(**LATF_ARGS)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert [resumed.update(row[0]) for row in TRAJECTORY[6:]] == ratios[6:]


def test_latf_defaults_and_no_warmup():
    latf = adakd.LATF()
    assert (latf.ema_decay, latf.tolerance, latf.step_size, latf.min_ratio, latf.max_ratio, latf.warmup_steps) == (
        0.99,
        0.05,
        0.05,
        0.1,
        1.0,
        0,
    )
    assert latf.update(2.0) == 1.0 and latf.ref == 2.0  # L_ref set at the very first step
    # A steadily falling loss walks r down by (1 − δ) each time the EMA leaves the band, never below r_min.
    for _ in range(3000):
        latf.update(1e-3)
    assert latf.ratio == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"tolerance": -0.1}, "tolerance"),
        ({"step_size": 1.0}, "step_size"),
        ({"min_ratio": 0.0}, "min_ratio"),
        ({"max_ratio": 1.5}, "max_ratio"),
        ({"min_ratio": 0.8, "max_ratio": 0.5}, "min_ratio"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
    ],
)
def test_latf_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adakd.LATF(**kwargs)


def test_latf_rejects_non_finite_loss_and_bad_state():
    latf = adakd.LATF()
    with pytest.raises(ValueError, match="non-finite loss"):
        latf.update(float("nan"))
    assert latf.num_steps == 0 and latf.ema is None  # nothing was changed
    with pytest.raises(ValueError, match="missing"):
        latf.load_state_dict({"ratio": 0.5})


# --------------------------------------------------------------------------------------------------------------
# Schedules and the keep count
# --------------------------------------------------------------------------------------------------------------


def test_schedules():
    fixed = adakd.RatioSchedule("fixed", ratio=0.6)
    assert [fixed.update() for _ in range(3)] == [0.6] * 3
    lin = adakd.RatioSchedule("linear", ratio=0.5, total_steps=4)
    assert lin.ratio == 1.0
    assert [lin.update() for _ in range(6)] == pytest.approx([0.875, 0.75, 0.625, 0.5, 0.5, 0.5])
    cos = adakd.RatioSchedule("cosine", ratio=0.2, total_steps=2)
    assert [cos.update() for _ in range(3)] == pytest.approx([0.6, 0.2, 0.2])
    resumed = adakd.RatioSchedule("cosine", ratio=0.2, total_steps=2)
    resumed.load_state_dict({"num_steps": 1})
    assert resumed.ratio == pytest.approx(0.6)
    with pytest.raises(ValueError, match="total_steps"):
        adakd.RatioSchedule("linear", ratio=0.5)
    with pytest.raises(ValueError, match="ratio"):
        adakd.RatioSchedule("fixed", ratio=0.0)


def test_keep_count():
    assert keep_count(100, 0.29) == 29  # not 28 from 100 · 0.29 = 28.999999999999996
    assert keep_count(10, 0.75) == 7
    assert keep_count(3, 0.1) == 1  # at least one token
    assert keep_count(7, 1.0) == 7


# --------------------------------------------------------------------------------------------------------------
# Indicators
# --------------------------------------------------------------------------------------------------------------


def _logits(seed: int, n: int = 9, v: int = 13):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2


def _nmtkd_bruteforce(p: list[float], q: list[float], k: int = 5) -> float:
    v = len(p)
    top_t = sorted(range(v), key=lambda j: -p[j])[:k]
    top_s = sorted(range(v), key=lambda j: -q[j])[:k]
    t1 = top_t[0]
    score = sum(max(0.0, q[u] - q[t1]) for u in top_t)
    for u in top_t:
        for w in top_s:
            if p[u] > p[w]:
                score += max(0.0, q[w] - q[u])
    return score


def test_indicators_against_references():
    s, t = _logits(0)
    labels = torch.randint(0, 13, (9,))
    p, q = ref.probs(t), ref.probs(s)
    want = {
        "hellinger": ref.hellinger(p, q),
        "fkl": ref.kl(p, q),
        "rkl": ref.kl(q, p),
        "jsd": 0.5 * ref.kl(q, 0.5 * (p + q)) + 0.5 * ref.kl(p, 0.5 * (p + q)),
        "ce": -q.log().gather(-1, labels[:, None]).squeeze(-1),
        "nmtkd": torch.tensor([_nmtkd_bruteforce(pi, qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True)]),
    }
    assert set(want) == set(adakd.INDICATORS)
    for name, expected in want.items():
        got = adakd.difficulty_scores(name, s.requires_grad_(True), t, labels)
        assert not got.requires_grad, name
        torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-6, msg=name)


def test_nmtkd_is_zero_when_rankings_agree_and_counts_inversions():
    t = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    assert adakd.difficulty_scores("nmtkd", t * 0.5, t).item() == pytest.approx(0.0)
    # Student swaps the teacher's top two tokens: both sums see the inversion.
    s = torch.tensor([[4.0, 5.0, 3.0, 2.0, 1.0, 0.0]])
    p, q = ref.probs(t)[0].tolist(), ref.probs(s)[0].tolist()
    got = adakd.difficulty_scores("nmtkd", s, t).item()
    assert got > 0 and got == pytest.approx(_nmtkd_bruteforce(p, q), rel=1e-5)


def test_indicator_errors():
    s, t = _logits(1)
    with pytest.raises(ValueError, match="unknown indicator 'entropy'.*hellinger"):
        adakd.difficulty_scores("entropy", s, t)
    with pytest.raises(ValueError, match="needs the labels"):
        adakd.difficulty_scores("ce", s, t)


def test_idts_value_object_is_the_closed_form_in_each_mode():
    from adakd.adaptive import IDTS
    from adakd.errors import OptionError

    s = torch.tensor([0.1, 0.4, 0.2, 0.8, 0.3], dtype=torch.float64)
    m = 0.3  # the lower median
    for mode, sign in (("inverse", -1.0), ("reverse", 1.0)):
        idts = IDTS(c=0.7, tau_base=1.3, mode=mode)
        want = 1.3 * torch.exp(sign * 0.7 * torch.tanh(torch.log(s / m)))
        torch.testing.assert_close(idts.temperatures(s), want)
        torch.testing.assert_close(idts.from_median(s, 0.3), want)
        g = s.clone().requires_grad_(True)
        tau = idts.with_grad(g)
        torch.testing.assert_close(tau.detach(), want)
        (grad,) = torch.autograd.grad(tau.sum(), g)
        assert grad[4] != 0  # the median's token collects the median's gradient too
        assert torch.equal(idts.temperatures(s), adakd.idts_temperatures(s, c=0.7, tau_base=1.3, reverse=sign > 0))
    fixed = IDTS(c=0.7, tau_base=1.3, mode="fixed")
    assert fixed.fixed and fixed.temperatures(s) == 1.3 and fixed.from_median(s, None) == 1.3
    with pytest.raises(OptionError, match="unknown temperature 'hot'"):
        IDTS(mode="hot")


def test_the_ratio_controllers_live_in_their_own_module():
    from adakd import adaptive, controllers

    assert adaptive.LATF is controllers.LATF is adakd.LATF
    assert adaptive.RatioSchedule is controllers.RatioSchedule is adakd.RatioSchedule
