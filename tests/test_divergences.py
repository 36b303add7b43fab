"""The divergence library against float64 re-derivations, closed forms and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adakd
from adakd.divergences import DIVERGENCES

from . import reference as ref

NAMES = list(DIVERGENCES)
# Non-default parameters exercise every code path, including the α-β divergence's four limits.
PARAM_CASES = [
    ("jsd", {"lam": 0.5}),
    ("jsd", {"lam": 0.1}),
    ("sfkl", {"lam": 0.5}),
    ("srkl", {"lam": 0.3}),
    ("skl", {"lam": 0.25}),
    ("akl", {"mu": 0.8}),
    ("abkd", {"alpha": 0.0, "beta": 0.7}),
    ("abkd", {"alpha": 0.5, "beta": 0.0}),
    ("abkd", {"alpha": 0.6, "beta": -0.6}),
    ("abkd", {"alpha": 0.0, "beta": 0.0}),
    ("abkd", {"alpha": 1.2, "beta": -0.3}),
    ("abkd", {"alpha": 1.0, "beta": 0.0}),
]
ALL_CASES = [(n, {}) for n in NAMES] + PARAM_CASES
CASE_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items()) or 'default'}" for n, p in ALL_CASES]

PAD = 5  # trailing vocabulary padding columns (-inf in both models), as in a padded lm_head


def _logits(n: int = 6, v: int = 37, pad: int = 0, scale: float = 3.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v + pad, generator=g) * scale
    t = torch.randn(n, v + pad, generator=g) * scale
    if pad:
        s[:, v:] = -math.inf
        t[:, v:] = -math.inf
    keep = torch.arange(v + pad) < v
    return s, t, keep


@pytest.mark.parametrize(("name", "params"), ALL_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("pad", [0, PAD])
@pytest.mark.parametrize("tau_kind", ["scalar", "per_token"])
def test_values_match_float64_reference(name, params, pad, tau_kind):
    s, t, keep = _logits(pad=pad, seed=1)
    tau = 1.7 if tau_kind == "scalar" else torch.linspace(0.6, 1.65, s.shape[0])
    got = adakd.divergence(name, s, t, temperature=tau, **params)
    want = ref.divergence(name, ref.probs(t, tau, keep), ref.probs(s, tau, keep), **params)
    assert got.dtype == torch.float32 and got.shape == (s.shape[0],)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(("name", "params"), ALL_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("pad", [0, PAD])
def test_gradients_match_float64_autograd(name, params, pad):
    s, t, keep = _logits(pad=pad, seed=2)
    tau = torch.linspace(0.7, 1.5, s.shape[0])
    s32 = s.clone().requires_grad_(True)
    adakd.divergence(name, s32, t, temperature=tau, **params).sum().backward()

    s64 = s.double()[:, keep].requires_grad_(True)
    want = ref.divergence(name, ref.probs(t, tau, keep), ref.probs(s64, tau), **params)
    (grad64,) = torch.autograd.grad(want.sum(), s64)

    assert torch.isfinite(s32.grad).all()
    torch.testing.assert_close(s32.grad[:, keep].double(), grad64, rtol=1e-4, atol=2e-6)
    assert (s32.grad[:, ~keep] == 0).all()


@pytest.mark.parametrize(
    ("name", "params"), [c for c in ALL_CASES if c[0] != "akl"], ids=[i for i in CASE_IDS if "akl" not in i]
)
def test_float64_gradcheck(name, params):
    # Finite differences on the whole function. AKL is excluded by design: its head/tail gates use the detached
    # student, which finite differences cannot detach (its gradient is checked against autograd above).
    s, t, _ = _logits(n=3, v=7, seed=3)
    s = s.double().requires_grad_(True)
    t = t.double().requires_grad_(True)
    tau = torch.tensor([0.8, 1.0, 1.3], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: adakd.divergence(name, a, b, temperature=tau, **params), (s, t))


@pytest.mark.parametrize("name", NAMES)
def test_float64_inputs_stay_float64(name):
    s, t, _ = _logits(seed=4)
    got = adakd.divergence(name, s.double(), t.double())
    want = ref.divergence(name, ref.probs(t), ref.probs(s))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_leading_dimensions_are_kept(name):
    s, t, _ = _logits(n=12, seed=5)
    got = adakd.divergence(name, s.view(3, 4, -1), t.view(3, 4, -1), temperature=torch.full((3, 4), 1.3))
    assert got.shape == (3, 4)
    torch.testing.assert_close(got.reshape(-1), adakd.divergence(name, s, t, temperature=1.3))


def test_scalar_and_uniform_per_token_temperature_agree():
    s, t, _ = _logits(seed=6)
    for name in NAMES:
        a = adakd.divergence(name, s, t, temperature=0.7)
        b = adakd.divergence(name, s, t, temperature=torch.full((s.shape[0],), 0.7))
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------------------
# Closed forms and limits
# --------------------------------------------------------------------------------------------------------------


def test_two_point_closed_forms():
    # p = (1/2, 1/2), q = (1/4, 3/4): values computed by hand.
    t = torch.log(torch.tensor([[0.5, 0.5]]))
    s = torch.log(torch.tensor([[0.25, 0.75]]))
    fkl = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    rkl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    tvd = 0.25
    hel = math.sqrt(1 - (math.sqrt(0.125) + math.sqrt(0.375)))
    for name, want in [("fkl", fkl), ("rkl", rkl), ("tvd", tvd), ("hellinger", hel)]:
        assert adakd.divergence(name, s, t).item() == pytest.approx(want, rel=1e-6), name
    # abkd(α=1, β=0) is FKL and abkd(α=0, β=1) is RKL.
    assert adakd.divergence("abkd", s, t, alpha=1.0, beta=0.0).item() == pytest.approx(fkl, rel=1e-6)
    assert adakd.divergence("abkd", s, t, alpha=0.0, beta=1.0).item() == pytest.approx(rkl, rel=1e-6)
    # skl and the mixture divergences at their end points.
    assert adakd.divergence("skl", s, t, lam=0.0).item() == pytest.approx(fkl, rel=1e-6)
    assert adakd.divergence("skl", s, t, lam=1.0).item() == pytest.approx(rkl, rel=1e-6)
    assert adakd.divergence("sfkl", s, t, lam=0.0).item() == pytest.approx(fkl, rel=1e-6)
    assert adakd.divergence("srkl", s, t, lam=0.0).item() == pytest.approx(rkl, rel=1e-6)
    for name in ("sfkl", "srkl"):
        assert adakd.divergence(name, s, t, lam=1.0).item() == pytest.approx(0.0, abs=1e-7)
    # The JSD's end points are 0 everywhere, which is why the public API refuses them (tested below).
    from adakd.divergences import _jsd, log_probs

    for edge in (0.0, 1.0):
        assert _jsd(log_probs(s), log_probs(t), edge).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(("alpha", "beta"), [(0.0, 0.7), (0.5, 0.0), (0.6, -0.6), (0.0, 0.0)])
def test_abkd_limits_are_continuous(alpha, beta):
    s, t, _ = _logits(scale=1.0, seed=7)
    s, t = s.double(), t.double()
    exact = adakd.divergence("abkd", s, t, alpha=alpha, beta=beta)
    near = adakd.divergence("abkd", s, t, alpha=alpha + 1e-5, beta=beta + 2e-5)
    torch.testing.assert_close(near, exact, rtol=1e-3, atol=1e-6)


def test_akl_gates_follow_the_head_definition():
    # Teacher (0.5, 0.3, 0.2), student (0.2, 0.5, 0.3): |p − q| = (0.3, 0.2, 0.1).
    p = torch.tensor([[0.5, 0.3, 0.2]])
    q = torch.tensor([[0.2, 0.5, 0.3]])
    fkl = (p * (p / q).log()).sum().item()
    rkl = (q * (q / p).log()).sum().item()

    def mix(e_head: float, e_tail: float) -> float:
        return e_head / (e_head + e_tail) * fkl + e_tail / (e_head + e_tail) * rkl

    # μ = 0.5: the mass before token 1 is 0.5 ≤ μ, so the head (the shortest prefix whose mass exceeds 0.5)
    # is {0, 1}. The authors' code (inclusive cumsum ≤ μ) would give {0}: the spec is followed.
    assert adakd.divergence("akl", q.log(), p.log(), mu=0.5).item() == pytest.approx(mix(0.5, 0.1), rel=1e-6)
    # μ = 0.4 and μ = 0: the first token alone exceeds μ.
    for mu in (0.4, 0.0):
        assert adakd.divergence("akl", q.log(), p.log(), mu=mu).item() == pytest.approx(mix(0.3, 0.3), rel=1e-6)
    # μ = 1: the whole vocabulary is the head, AKL = FKL.
    assert adakd.divergence("akl", q.log(), p.log(), mu=1.0).item() == pytest.approx(fkl, rel=1e-6)


def test_hellinger_distance_public_function():
    s, t, keep = _logits(pad=PAD, seed=8)
    got = adakd.hellinger_distance(s, t)
    want = ref.hellinger(ref.probs(t, 1.0, keep), ref.probs(s, 1.0, keep))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    assert got.min() >= 0 and got.max() <= 1
    # Disjoint supports are the maximum distance, 1.
    far = adakd.hellinger_distance(torch.tensor([[0.0, -math.inf]]), torch.tensor([[-math.inf, 0.0]]))
    assert far.item() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_identical_distributions_with_padding_give_zero_and_zero_grad(name):
    s, _, _ = _logits(pad=PAD, seed=9)
    x = s.clone().requires_grad_(True)
    d = adakd.divergence(name, x, s.clone())
    d.sum().backward()
    assert torch.isfinite(d).all() and d.abs().max() < 1e-6
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e-5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_upcast(name, dtype):
    s, t, keep = _logits(pad=PAD, seed=10)
    s, t = s.to(dtype), t.to(dtype)
    got = adakd.divergence(name, s, t)
    want = ref.divergence(name, ref.probs(t, 1.0, keep), ref.probs(s, 1.0, keep))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


def test_one_sided_zero_probability_is_inf_not_nan():
    # The student rules out a token the teacher supports: FKL is +inf, RKL is finite; neither is NaN.
    t = torch.tensor([[0.0, 0.0, 0.0]])
    s = torch.tensor([[0.0, 0.0, -math.inf]])
    assert math.isinf(adakd.divergence("fkl", s, t).item())
    assert math.isfinite(adakd.divergence("rkl", s, t).item())
    for name in NAMES:
        assert not torch.isnan(adakd.divergence(name, s, t)).any(), name


def test_large_finite_logits_do_not_overflow():
    # exp of these logits overflows float32; the log-softmax must not. (Compared with the reference on the same,
    # already rounded, float32 inputs: at 3e4 a float32 logit carries only ~2e-3 of absolute precision.)
    s, t, _ = _logits(scale=1.0, seed=11)
    s, t = s + 1e4, t - 3e4
    for name in NAMES:
        got = adakd.divergence(name, s, t)
        want = ref.divergence(name, ref.probs(t), ref.probs(s))
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_ones():
    s, t, _ = _logits()
    with pytest.raises(ValueError, match=r"unknown divergence 'kld'.*fkl, rkl, jsd"):
        adakd.divergence("kld", s, t)


def test_unknown_parameter_is_named():
    s, t, _ = _logits()
    with pytest.raises(ValueError, match=r"'jsd' got unknown parameter\(s\) beta; valid: lam"):
        adakd.divergence("jsd", s, t, beta=0.5)
    with pytest.raises(ValueError, match=r"'fkl' got unknown parameter\(s\) lam; valid: none"):
        adakd.divergence("fkl", s, t, lam=0.5)


@pytest.mark.parametrize(
    ("name", "params"), [("jsd", {"lam": 1.5}), ("akl", {"mu": -0.1}), ("abkd", {"alpha": math.nan})]
)
def test_out_of_range_parameters(name, params):
    s, t, _ = _logits()
    with pytest.raises(ValueError, match=next(iter(params))):
        adakd.divergence(name, s, t, **params)


def test_bad_shapes_and_temperatures():
    s, t, _ = _logits()
    with pytest.raises(ValueError, match="same shape"):
        adakd.divergence("fkl", s, t[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        adakd.divergence("fkl", s, t, temperature=0.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        adakd.divergence("fkl", s, t, temperature=torch.ones(s.shape[0] + 1))


# --------------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------------

_rows = st.integers(min_value=2, max_value=12).flatmap(
    lambda v: st.tuples(
        st.lists(st.floats(-12, 12, allow_nan=False), min_size=v, max_size=v),
        st.lists(st.floats(-12, 12, allow_nan=False), min_size=v, max_size=v),
        st.floats(0.3, 3.0),
    )
)


@settings(max_examples=60, deadline=None)
@given(_rows)
def test_properties_nonnegative_zero_on_diagonal_hellinger_bounded(row):
    s_list, t_list, tau = row
    s = torch.tensor([s_list])
    t = torch.tensor([t_list])
    for name in NAMES:
        d = adakd.divergence(name, s, t, temperature=tau)
        assert torch.isfinite(d).all(), name
        assert d.item() >= -1e-6, name
        same = adakd.divergence(name, s, s.clone(), temperature=tau)
        assert abs(same.item()) < 1e-6, name
    h = adakd.hellinger_distance(s, t).item()
    assert 0.0 <= h <= 1.0


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_jsd_refuses_the_endpoints_and_names_fkl_rkl(lam):
    """At λ = 0 or 1 the generalised JSD is 0 everywhere: refuse it, and tell a TRL user what β 1 or 0 means."""
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    assert adakd.divergence("jsd", s, t, lam=0.5).abs().sum() > 0
    with pytest.raises(ValueError, match=r"lam must be in \(0, 1\) for jsd.*beta 0 \(forward KL\) use 'fkl'.*'rkl'"):
        adakd.divergence("jsd", s, t, lam=lam)
