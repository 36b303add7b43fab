"""AdaKDLoss against a float64 re-derivation of the spec's algorithm, plus its contract (stats, state, errors)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import adakd
from adakd.divergences import DIVERGENCES

from . import reference as ref

V_REAL, V_STUDENT, V_TEACHER = 45, 48, 52  # real tokens; lm_head rows (padded) of the student and the teacher


def _batch(seed: int = 0, b: int = 4, t: int = 16, scale: float = 2.5):
    """Logits like a real pair: padded rows beyond the real vocabulary are -inf; some labels masked."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, V_STUDENT, generator=g) * scale
    te = torch.randn(b, t, V_TEACHER, generator=g) * scale
    s[..., V_REAL:] = -math.inf
    te[..., V_REAL:] = -math.inf
    labels = torch.randint(0, V_REAL, (b, t), generator=g)
    labels[0, :5] = -100  # a prompt
    labels[3, 11:] = -100  # padding
    return s, te, labels


KEEP = torch.arange(V_STUDENT) < V_REAL


def _check_against_reference(loss_fn, ref_kwargs, seed=0, ratio=1.0):
    s, te, labels = _batch(seed)
    x = s.clone().requires_grad_(True)
    got = loss_fn(x, te, labels)
    got.backward()

    x64 = s.double().requires_grad_(True)
    want, info = ref.adakd_loss(x64, te[..., :V_STUDENT], labels, ratio=ratio, keep=KEEP, **ref_kwargs)
    (grad64,) = torch.autograd.grad(want, x64)

    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    g = x.grad.reshape(-1, V_STUDENT)
    g64 = grad64.reshape(-1, V_STUDENT)
    torch.testing.assert_close(g[:, KEEP].double(), g64[:, KEEP], rtol=1e-4, atol=1e-8)
    assert (g[:, ~KEEP] == 0).all()
    # Only kept tokens receive gradient.
    touched = sorted(g.abs().sum(-1).nonzero().squeeze(-1).tolist())
    assert touched == info["kept"]
    assert loss_fn.stats["kept_tokens"] == info["k"]
    if loss_fn.temperature == "fixed" and loss_fn.stats["kept_tokens"] == loss_fn.stats["valid_tokens"]:
        assert math.isnan(loss_fn.stats["score_median"])  # plain KD computes no difficulty scores
    else:
        assert loss_fn.stats["score_median"] == pytest.approx(info["median"], rel=1e-5)
    return info


@pytest.mark.parametrize("ratio", [1.0, 0.75, 0.5, 0.2, 0.01])
@pytest.mark.parametrize("temperature", ["inverse", "reverse", "fixed"])
def test_matches_float64_reference_at_several_ratios(ratio, temperature):
    loss_fn = adakd.AdaKDLoss("rkl", selection="fixed", ratio=ratio, temperature=temperature, c=0.5)
    info = _check_against_reference(loss_fn, {"temperature": temperature}, ratio=ratio)
    n = 4 * 16 - 5 - 5
    assert info["k"] == max(1, math.floor(n * ratio))


@pytest.mark.parametrize("base", list(DIVERGENCES))
def test_every_base_divergence_matches_reference(base):
    loss_fn = adakd.AdaKDLoss(base, selection="fixed", ratio=0.6, c=0.7, tau_base=1.4)
    _check_against_reference(loss_fn, {"base": base, "c": 0.7, "tau_base": 1.4}, seed=1, ratio=0.6)


def test_base_params_are_passed_through():
    loss_fn = adakd.AdaKDLoss("abkd", base_params={"alpha": 0.5, "beta": 0.4}, selection="fixed", ratio=0.5)
    _check_against_reference(loss_fn, {"base": "abkd", "base_params": {"alpha": 0.5, "beta": 0.4}}, seed=2, ratio=0.5)


@pytest.mark.parametrize("base", list(DIVERGENCES))
def test_degenerate_settings_equal_plain_kd(base):
    s, te, labels = _batch(3)
    mask = labels != -100
    plain = adakd.divergence(base, s, te[..., :V_STUDENT])[mask].mean()
    for kwargs in (
        {"selection": "all", "temperature": "fixed", "tau_base": 1.0},
        {"selection": "fixed", "ratio": 1.0, "temperature": "fixed"},
        {"selection": "latf", "temperature": "inverse", "c": 0.0},  # LATF starts at r = 1; c = 0 gives τ = 1
    ):
        got = adakd.AdaKDLoss(base, **kwargs)(s, te, labels)
        torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-7, msg=str(kwargs))


def test_fixed_temperature_is_classic_hinton_kd():
    s, te, labels = _batch(4)
    mask = labels != -100
    want = 4.0 * adakd.divergence("fkl", s, te[..., :V_STUDENT], temperature=2.0)[mask].mean()
    got = adakd.AdaKDLoss("fkl", selection="all", temperature="fixed", tau_base=2.0)(s, te, labels)
    torch.testing.assert_close(got, want)


def test_reduction_sum_is_mean_times_kept_count():
    s, te, labels = _batch(5)
    mean_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.5)
    sum_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.5, reduction="sum")
    mean, total = mean_fn(s, te, labels), sum_fn(s, te, labels)
    torch.testing.assert_close(total, mean * mean_fn.stats["kept_tokens"])
    assert sum_fn.stats["loss"] == pytest.approx(mean.item(), rel=1e-6)  # stats report L_t whatever the reduction


def test_other_indicators_select_by_their_scores():
    s, te, labels = _batch(6)
    mask = labels != -100
    for indicator in adakd.INDICATORS:
        loss_fn = adakd.AdaKDLoss(indicator=indicator, selection="fixed", ratio=0.3, temperature="fixed")
        x = s.clone().requires_grad_(True)
        loss_fn(x, te, labels).backward()
        scores = adakd.difficulty_scores(indicator, s, te[..., :V_STUDENT], labels)[mask]
        k = int(loss_fn.stats["kept_tokens"])
        kept = x.grad[mask].abs().sum(-1) > 0
        assert int(kept.sum()) == k
        assert scores[kept].min() >= scores[~kept].max(), indicator


# --------------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------------


def test_all_masked_batch_is_zero_with_finite_zero_gradient():
    s, te, labels = _batch(7)
    x = s.clone().requires_grad_(True)
    loss_fn = adakd.AdaKDLoss()
    loss = loss_fn(x, te, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()
    assert loss_fn.stats["valid_tokens"] == 0 and loss_fn.stats["kept_tokens"] == 0


def test_gradients_reach_the_student_only():
    s, te, labels = _batch(8)
    x = s.clone().requires_grad_(True)
    y = te.clone().requires_grad_(True)
    adakd.AdaKDLoss(selection="fixed", ratio=0.5)(x, y, labels).backward()
    assert x.grad is not None and y.grad is None


def _naive_low_precision_rkl(s, te, labels, dtype):
    """Plain RKL computed entirely in the low-precision dtype: the error a careless implementation makes."""
    s, te = s.to(dtype), te[..., :V_STUDENT].to(dtype)
    mask = labels != -100
    lq, lp = F.log_softmax(s[mask][:, :V_REAL], -1), F.log_softmax(te[mask][:, :V_REAL], -1)
    return (lq.exp() * (lq - lp)).sum(-1).mean().double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_within_the_naive_error(dtype):
    s, te, labels = _batch(9)
    s_lp, te_lp = s.to(dtype), te.to(dtype)
    loss_fn = adakd.AdaKDLoss("rkl", selection="all", temperature="fixed")
    got = loss_fn(s_lp, te_lp, labels)
    assert got.dtype == torch.float32
    # Against the exact loss of the same (rounded) inputs, we are float32-accurate...
    exact_same_inputs, _ = ref.adakd_loss(
        s_lp.double(), te_lp[..., :V_STUDENT].double(), labels, temperature="fixed", keep=KEEP
    )
    torch.testing.assert_close(got.double(), exact_same_inputs, rtol=1e-5, atol=1e-7)
    # ...and against the float32 originals, no worse than computing naively in the low precision.
    exact, _ = ref.adakd_loss(s.double(), te[..., :V_STUDENT].double(), labels, temperature="fixed", keep=KEEP)
    naive_err = abs(_naive_low_precision_rkl(s, te, labels, dtype) - exact)
    assert abs(got.double() - exact) <= naive_err + 1e-4


def test_low_precision_adaptive_loss_and_gradient():
    s, te, labels = _batch(10)
    x = s.bfloat16().requires_grad_(True)
    loss_fn = adakd.AdaKDLoss("rkl", selection="fixed", ratio=0.5)
    got = loss_fn(x, te.bfloat16(), labels)
    got.backward()
    x64 = s.bfloat16().double().requires_grad_(True)
    want, _ = ref.adakd_loss(x64, te.bfloat16()[..., :V_STUDENT].double(), labels, ratio=0.5, keep=KEEP)
    (g64,) = torch.autograd.grad(want, x64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert x.grad.dtype == torch.bfloat16
    # The gradient is rounded to bfloat16 on its way out (8 bits of mantissa).
    torch.testing.assert_close(x.grad[..., :V_REAL].double(), g64[..., :V_REAL], rtol=1e-2, atol=1e-5)


def test_float64_logits_give_float64_loss():
    s, te, labels = _batch(11)
    got = adakd.AdaKDLoss(selection="fixed", ratio=0.5)(s.double(), te.double(), labels)
    want, _ = ref.adakd_loss(s.double(), te[..., :V_STUDENT].double(), labels, ratio=0.5, keep=KEEP)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# LATF inside the loss, stats, state
# --------------------------------------------------------------------------------------------------------------


def test_latf_drives_the_next_forward():
    s, te, labels = _batch(12)
    n = int((labels != -100).sum())
    loss_fn = adakd.AdaKDLoss(ema_decay=0.0, tolerance=0.0, step_size=0.5, min_ratio=0.2)
    first = loss_fn(s, te, labels).item()
    assert loss_fn.stats["ratio"] == 1.0 and loss_fn.stats["kept_tokens"] == n
    assert loss_fn.step() == 1.0  # first step sets L_ref
    assert loss_fn.step(first / 2) == 0.5  # the loss halved: focus on the harder half
    loss_fn(s, te, labels)
    assert loss_fn.stats["ratio"] == 0.5 and loss_fn.stats["kept_tokens"] == n // 2


def test_step_without_value_uses_the_mean_of_the_micro_steps():
    s, te, labels = _batch(13)
    loss_fn = adakd.AdaKDLoss(selection="latf")
    a = loss_fn(s[:2], te[:2], labels[:2]).item()
    b = loss_fn(s[2:], te[2:], labels[2:]).item()
    loss_fn.step()
    assert loss_fn.controller.ema == pytest.approx((a + b) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="at least one forward"):
        loss_fn.step()


def test_stats_are_floats_and_consistent():
    s, te, labels = _batch(14)
    loss_fn = adakd.AdaKDLoss(selection="fixed", ratio=0.75, c=0.5)
    loss = loss_fn(s, te, labels)
    st = loss_fn.stats
    for key in ("ratio", "valid_tokens", "kept_tokens", "tau_mean", "tau_min", "tau_max", "score_median", "loss"):
        assert isinstance(st[key], float), key
    assert st["valid_tokens"] == 54 and st["kept_tokens"] == math.floor(54 * 0.75)
    assert math.exp(-0.5) < st["tau_min"] <= st["tau_mean"] <= st["tau_max"] < math.exp(0.5)
    assert st["loss"] == pytest.approx(loss.item())
    assert st["score_threshold"] <= st["score_median"]


def test_state_dict_round_trip_resumes_latf():
    s, te, labels = _batch(15)
    kwargs = dict(ema_decay=0.5, tolerance=0.01, step_size=0.2, warmup_steps=1)
    a = adakd.AdaKDLoss(**kwargs)
    for value in (1.0, 1.0, 0.5, 0.3):
        a.step(value)
    state = a.state_dict()
    assert "_extra_state" in state
    b = adakd.AdaKDLoss(**kwargs)
    b.load_state_dict(state)
    assert b.ratio == a.ratio < 1.0
    assert b.controller.state_dict() == a.controller.state_dict()
    for value in (0.2, 0.9):
        assert a.step(value) == b.step(value)
    # Works through torch.save/torch.load as part of a checkpoint.
    import io

    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c = adakd.AdaKDLoss(**kwargs)
    c.load_state_dict(torch.load(buf, weights_only=False))
    assert c.ratio == a.ratio
    c(s, te, labels)
    assert c.stats["ratio"] == a.ratio


def test_schedules_inside_the_loss():
    loss_fn = adakd.AdaKDLoss(selection="linear", ratio=0.5, total_steps=2)
    assert loss_fn.ratio == 1.0
    assert loss_fn.step(0.3) == 0.75
    assert loss_fn.step(0.3) == 0.5
    assert adakd.AdaKDLoss(selection="all").step(1.0) == 1.0


# --------------------------------------------------------------------------------------------------------------
# Vocabulary alignment and errors
# --------------------------------------------------------------------------------------------------------------


def test_align_vocab():
    s, te = torch.randn(2, 3, 151936), torch.randn(2, 3, 152064)
    s2, t2 = adakd.align_vocab(s, te)
    assert s2 is s and t2.shape == s.shape and torch.equal(t2, te[..., :151936])
    adakd.align_vocab(s, te, vocab_size=151646)  # Qwen2's real tokenizer size
    with pytest.raises(ValueError, match="would drop real tokens"):
        adakd.align_vocab(s, te, vocab_size=152000)
    with pytest.raises(ValueError, match="larger than the teacher"):
        adakd.align_vocab(te, s)
    with pytest.raises(ValueError, match="every dimension but the vocabulary"):
        adakd.align_vocab(s[:1], te)


def test_loss_uses_vocab_size_check():
    s, te, labels = _batch(16)
    with pytest.raises(ValueError, match="would drop real tokens"):
        adakd.AdaKDLoss(vocab_size=V_STUDENT + 1)(s, te, labels)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base": "kl"}, "unknown divergence 'kl'"),
        ({"base_params": {"lam": 0.5}}, "unknown parameter"),
        ({"indicator": "entropy"}, "unknown indicator"),
        ({"selection": "topk"}, "unknown selection 'topk'; valid: latf, fixed, linear, cosine, all"),
        ({"temperature": "hot"}, "unknown temperature 'hot'"),
        ({"reduction": "none"}, "unknown reduction"),
        ({"c": -1.0}, "c must be"),
        ({"tau_base": 0.0}, "tau_base"),
        ({"selection": "fixed", "ratio": 1.5}, "ratio must be in"),
        ({"selection": "cosine", "ratio": 0.5}, "total_steps"),
        ({"selection": "fixed", "ema_decay": 0.9}, "only apply to selection='latf'"),
        ({"emadecay": 0.9}, "unknown LATF argument"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adakd.AdaKDLoss(**kwargs)


def test_label_shape_error():
    s, te, labels = _batch(17)
    with pytest.raises(ValueError, match="labels"):
        adakd.AdaKDLoss()(s, te, labels[:, :-1])


# --------------------------------------------------------------------------------------------------------------
# The τ variants: tau_weight (Eq. 2's τ² factor or none) and detach_tau (the paper's or the released gradients)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("detach_tau", [True, False])
@pytest.mark.parametrize("tau_weight", ["squared", "none"])
@pytest.mark.parametrize(
    ("selection", "ratio", "temperature"),
    [("fixed", 0.6, "inverse"), ("fixed", 0.6, "reverse"), ("all", 1.0, "inverse"), ("latf", 1.0, "inverse")],
)
def test_tau_variants_match_float64_reference(detach_tau, tau_weight, selection, ratio, temperature):
    kwargs = {"ratio": ratio} if selection in ("fixed",) else {}
    loss_fn = adakd.AdaKDLoss(
        "rkl", selection=selection, temperature=temperature, c=0.9, tau_weight=tau_weight, detach_tau=detach_tau,
        **kwargs,
    )  # fmt: skip
    ref_kwargs = {"temperature": temperature, "c": 0.9, "tau_weight": tau_weight, "detach_tau": detach_tau}
    _check_against_reference(loss_fn, ref_kwargs, seed=7, ratio=ratio)


def test_gradient_through_tau_differs_from_the_detached_one():
    """The two gradients are different objects (so the option is not a no-op), their values equal."""
    s, te, labels = _batch(8)
    grads, values = [], []
    for detach in (True, False):
        x = s.clone().requires_grad_(True)
        loss = adakd.AdaKDLoss(selection="fixed", ratio=0.5, c=1.0, detach_tau=detach)(x, te, labels)
        loss.backward()
        grads.append(x.grad.nan_to_num(0.0))
        values.append(loss.item())
    assert values[0] == pytest.approx(values[1], rel=1e-7)
    assert (grads[0] - grads[1]).abs().max() > 1e-3 * grads[0].abs().max()


def test_tau_weight_none_divides_each_token_by_its_tau_squared():
    s, te, labels = _batch(9)
    squared = adakd.AdaKDLoss(selection="fixed", ratio=1.0, temperature="fixed", tau_base=2.0)(s, te, labels)
    none = adakd.AdaKDLoss(selection="fixed", ratio=1.0, temperature="fixed", tau_base=2.0, tau_weight="none")
    torch.testing.assert_close(none(s, te, labels) * 4.0, squared)


def test_tau_options_are_validated():
    with pytest.raises(ValueError, match="unknown tau_weight 'cubed'; valid: squared, none"):
        adakd.AdaKDLoss(tau_weight="cubed")
    with pytest.raises(ValueError, match="one_pass supports detach_tau=True only"):
        adakd.AdaKDLoss(one_pass=True, detach_tau=False)
    with pytest.raises(ValueError, match="detach_tau must be true or false"):
        adakd.AdaKDLoss(detach_tau="no")


def test_latf_takes_no_ratio_but_starts_at_max_ratio():
    with pytest.raises(ValueError, match=r"ratio \(0.5\) applies to selection 'fixed', 'linear' and 'cosine'"):
        adakd.AdaKDLoss(selection="latf", ratio=0.5)
    assert adakd.AdaKDLoss(selection="latf", max_ratio=0.8).ratio == 0.8
    assert (
        adakd.AdaKDLoss(selection="fixed").ratio == 1.0
        and adakd.AdaKDLoss(selection="cosine", total_steps=4).ratio == 1.0
    )


def test_step_after_a_batch_whose_labels_are_all_ignored_keeps_the_ratio():
    """The README's loop on a batch with no response token: the forward gives 0, and step() neither fails nor moves
    LATF (there is no loss to move it on); without any forward since the last step, step() still refuses."""
    loss_fn = adakd.AdaKDLoss(base="rkl", warmup_steps=0, ema_decay=0.0, tolerance=0.0, step_size=0.2)
    logits = torch.randn(1, 5, 16, requires_grad=True)
    loss_fn(logits, torch.randn(1, 5, 16), torch.randint(0, 16, (1, 5))).backward()
    loss_fn.step()
    before = loss_fn.ratio
    empty = loss_fn(logits, torch.randn(1, 5, 16), torch.full((1, 5), -100))
    empty.backward()
    assert empty.item() == 0.0 and loss_fn.step() == before
    with pytest.raises(ValueError, match="needs at least one forward"):
        loss_fn.step()


def test_the_docstring_names_every_latf_argument_as_latf_spells_it():
    import inspect

    from adakd import LATF, AdaKDLoss

    doc = AdaKDLoss.__init__.__doc__ or AdaKDLoss.__doc__
    listed = doc.split("**latf_kwargs:", 1)[1].split("only with", 1)[0]
    names = set(re.findall(r"``(\w+)``", listed))
    assert names == set(inspect.signature(LATF.__init__).parameters) - {"self"}, names
