"""Independent float64 re-derivations of the spec's formulas, written for clarity, not speed.

These work on probabilities (not log-space tricks), drop padded vocabulary columns instead of masking them, and
follow docs/method.md line by line, so that they share no code and no numerical device with src/adakd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def probs(logits: Tensor, tau: float | Tensor = 1.0, keep: Tensor | None = None) -> Tensor:
    """softmax(logits / τ) in float64 over the kept (non-padding) columns. logits [N, V], tau float or [N]."""
    z = logits.double()
    if keep is not None:
        z = z[:, keep]
    t = tau.double().unsqueeze(-1) if isinstance(tau, Tensor) else tau
    z = z / t
    z = z - z.max(dim=-1, keepdim=True).values
    e = z.exp()
    return e / e.sum(-1, keepdim=True)


def kl(a: Tensor, b: Tensor) -> Tensor:
    return (a * (a.log() - b.log())).sum(-1)


def abkd(p: Tensor, q: Tensor, alpha: float, beta: float) -> Tensor:
    a, b = alpha, beta
    if a == 0 and b == 0:
        return 0.5 * ((p.log() - q.log()) ** 2).sum(-1)
    if a == 0:
        return (q**b * torch.log(q**b / p**b) - q**b + p**b).sum(-1) / b**2
    if b == 0:
        return (p**a * torch.log(p**a / q**a) - p**a + q**a).sum(-1) / a**2
    if a + b == 0:
        return (torch.log(q**a / p**a) + (q**a / p**a) ** -1 - 1).sum(-1) / a**2
    s = a + b
    return -(p**a * q**b - a / s * p**s - b / s * q**s).sum(-1) / (a * b)


def akl(p: Tensor, q: Tensor, mu: float) -> Tensor:
    out = []
    qd = q.detach()
    for pi, qi, qdi in zip(p, q, qd, strict=True):
        order = sorted(range(len(pi)), key=lambda j: -float(pi[j]))
        head, mass = [], 0.0
        for j in order:  # the shortest prefix whose teacher mass exceeds mu
            head.append(j)
            mass += float(pi[j])
            if mass > mu:
                break
        tail = [j for j in order if j not in set(head)]
        e_head = sum(abs(pi[j] - qdi[j]) for j in head)
        e_tail = sum((abs(pi[j] - qdi[j]) for j in tail), torch.zeros((), dtype=p.dtype))
        fkl = (pi * (pi.log() - qi.log())).sum()
        rkl = (qi * (qi.log() - pi.log())).sum()
        total = e_head + e_tail
        out.append(e_head / total * fkl + e_tail / total * rkl)
    return torch.stack(out)


def divergence(name: str, p: Tensor, q: Tensor, **params: float) -> Tensor:
    """Per-row divergence between teacher p and student q, both [N, V] float64 probabilities (all > 0)."""
    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        lam = params.get("lam", 0.9)
        m = (1 - lam) * p + lam * q
        return lam * kl(q, m) + (1 - lam) * kl(p, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "sfkl":
        lam = params.get("lam", 0.1)
        return kl(p, lam * p + (1 - lam) * q)
    if name == "srkl":
        lam = params.get("lam", 0.1)
        return kl(q, (1 - lam) * p + lam * q)
    if name == "abkd":
        return abkd(p, q, params.get("alpha", 0.2), params.get("beta", 0.7))
    if name == "akl":
        return akl(p, q, params.get("mu", 0.5))
    if name == "skl":
        lam = params.get("lam", 0.9)
        return (1 - lam) * kl(p, q) + lam * kl(q, p)
    if name == "hellinger":
        return torch.sqrt(1 - torch.sqrt(p * q).sum(-1))
    raise KeyError(name)


def hellinger(p: Tensor, q: Tensor) -> Tensor:
    return torch.sqrt((1 - torch.sqrt(p * q).sum(-1)).clamp_min(0))


def lower_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def adakd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    base: str = "rkl",
    base_params: dict | None = None,
    ratio: float = 1.0,
    c: float = 0.5,
    tau_base: float = 1.0,
    temperature: str = "inverse",
    keep: Tensor | None = None,
    tau_weight: str = "squared",
    detach_tau: bool = True,
) -> tuple[Tensor, dict]:
    """The spec's AdaKD algorithm in float64, step by step. Returns (loss, details).

    ``detach_tau=False`` differentiates τ_i = τ_base·exp(∓c·tanh(log(s_i/m))) through each kept score s_i and
    through m, the kept score at the lower-median position (the released code's gradients)."""
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab).detach()
    valid = [i for i, y in enumerate(labels.reshape(-1).tolist()) if y != -100]
    s, t = s[valid], t[valid]
    n = len(valid)
    score_tensor = hellinger(probs(t, 1.0, keep), probs(s, 1.0, keep))
    scores = score_tensor.tolist()
    k = max(1, math.floor(n * ratio))
    kept = sorted(range(n), key=lambda i: -scores[i])[:k]
    kept_scores = [scores[i] for i in kept]
    m = lower_median(kept_scores)
    if detach_tau or temperature == "fixed":
        taus = []
        for si in kept_scores:
            s_hat = 0.0 if m == 0 else math.tanh(math.log(max(si / m, 1e-8)))
            if temperature == "inverse":
                taus.append(tau_base * math.exp(-c * s_hat))
            elif temperature == "reverse":
                taus.append(tau_base * math.exp(c * s_hat))
            else:
                taus.append(tau_base)
        tau = torch.tensor(taus, dtype=torch.float64)
    else:
        kept_t = score_tensor[torch.tensor(kept)]
        at_median = sorted(range(k), key=lambda j: kept_scores[j])[(k - 1) // 2]
        m_t = kept_t[at_median]
        sign = -1.0 if temperature == "inverse" else 1.0
        tau = tau_base * torch.exp(sign * c * torch.tanh(torch.log(torch.clamp(kept_t / m_t, min=1e-8))))
    idx = torch.tensor(kept)
    p = probs(t[idx], tau, keep)
    q = probs(s[idx], tau, keep)
    d = divergence(base, p, q, **(base_params or {}))
    loss = (tau**2 * d).mean() if tau_weight == "squared" else d.mean()
    return loss, {"kept": sorted(valid[i] for i in kept), "tau": tau.detach(), "median": m, "k": k}
