"""Parity with TRL's GKDTrainer.generalized_jsd_loss, a peer implementation users compare against.

TRL's β convention: β = 0 is forward KL(p‖q), β = 1 reverse KL(q‖p), and in between
JSD_β = β·KL(p‖m) + (1 − β)·KL(q‖m) with m = β·p + (1 − β)·q. Ours (the spec's, DistiLLM's):
m = (1 − λ)·p + λ·q and λ·KL(q‖m) + (1 − λ)·KL(p‖m), so TRL's β is our 1 − λ.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import adakd

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
gkd = pytest.importorskip("trl.experimental.gkd", reason="TRL is the parity reference (pip install -e '.[test]')")
trl_jsd = gkd.GKDTrainer.generalized_jsd_loss

CASES = [
    ("fkl", {}, 0.0),
    ("rkl", {}, 1.0),
    ("jsd", {"lam": 0.9}, 0.1),
    ("jsd", {"lam": 0.5}, 0.5),
    ("jsd", {"lam": 0.2}, 0.8),
]


def _batch(seed: int, pad: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 11, 50, generator=g) * 2
    t = torch.randn(3, 11, 50, generator=g) * 2
    if pad:
        s[..., -pad:] = -math.inf
        t[..., -pad:] = -math.inf
    labels = torch.randint(0, 50 - pad, (3, 11), generator=g)
    labels[0, :4] = -100
    labels[2, 7:] = -100
    return s, t, labels


@pytest.mark.parametrize(("name", "params", "beta"), CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_per_token_values_match_trl(name, params, beta, temperature):
    s, t, _ = _batch(0)
    ours = adakd.divergence(name, s, t, temperature=temperature, **params)
    theirs = trl_jsd(s, t, beta=beta, temperature=temperature, reduction="none").sum(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "params", "beta"), CASES)
def test_plain_kd_loss_and_gradient_match_trl(name, params, beta):
    s, t, labels = _batch(1)
    mine = s.clone().requires_grad_(True)
    loss = adakd.AdaKDLoss(name, base_params=params, selection="all", temperature="fixed", tau_base=1.0)
    ours = loss(mine, t, labels)
    ours.backward()

    theirs_in = s.clone().requires_grad_(True)
    theirs = trl_jsd(theirs_in, t, labels=labels, beta=beta, reduction="batchmean")
    theirs.backward()

    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.grad, theirs_in.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("name", "params", "beta"), CASES)
def test_padded_vocabulary_equals_trl_on_the_real_columns(name, params, beta):
    # With -inf vocabulary padding TRL returns NaN (F.kl_div evaluates 0 · (-inf − -inf)); ours treats the padded
    # columns as probability 0, which must equal TRL run on the real columns only.
    pad = 6
    s, t, labels = _batch(2, pad=pad)
    assert torch.isnan(trl_jsd(s, t, labels=labels, beta=beta, reduction="batchmean"))
    ours = adakd.AdaKDLoss(name, base_params=params, selection="all", temperature="fixed")(s, t, labels)
    theirs = trl_jsd(s[..., :-pad], t[..., :-pad], labels=labels, beta=beta, reduction="batchmean")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
