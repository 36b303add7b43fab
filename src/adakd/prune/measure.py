"""The teacher's forwards that pruning measures: the layer scores over calibration batches, and a model's token
cross-entropy on held-out text.

A batch is a dict of ``input_ids`` and ``attention_mask`` [B, T] (right-padded, :class:`adakd.data.DistillCollator`),
and ``labels`` [B, T] (-100 where nothing is trained: the prompt, the padding) for the response-only CE.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ..labels import IGNORE_INDEX
from .layers import decoder_layers
from .scores import ScoreSums

__all__ = ["layer_scores", "mean_cross_entropy", "token_cross_entropy"]


def layer_scores(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Block influence of every layer and angular distance between every pair of residual states, from one forward
    of ``model`` per batch, averaged over the real (non-padding) tokens.

    The states are read with forward pre-hooks: ``h_l`` entering layer l, and ``h_L`` entering the final norm.
    (``output_hidden_states`` would give the same ``h_0 .. h_{L-1}``, but transformers 5 returns its last state
    *after* the final norm, which would score the last layer against a rescaled state.)

    Args:
        model: a decoder-only causal LM (:func:`adakd.prune.decoder_layers`).
        batches: dicts with ``input_ids`` and ``attention_mask`` [B, T]; wrap them in tqdm for progress.

    Returns:
        ``{"block_influence": ..., "angular_distance": ..., "tokens": int}``: ``block_influence`` holds L floats,
        ``1 − mean cos(h_l, h_{l+1})`` for layer l; ``angular_distance`` is an (L + 1) × (L + 1) nested list whose
        entry (i, j) is ``mean arccos(cos(h_i, h_j)) / π``.
    """
    layers = decoder_layers(model)
    captured: list[torch.Tensor] = []

    def grab(_module: Any, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])

    hooks = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
    hooks.append(model.model.norm.register_forward_pre_hook(grab, with_kwargs=True))
    sums = ScoreSums()
    device = _device(model)
    try:
        with torch.inference_mode():
            for batch in batches:
                captured.clear()
                mask = batch["attention_mask"].to(device)
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
                if len(captured) != len(layers) + 1:
                    raise RuntimeError(f"captured {len(captured)} states in a forward, expected {len(layers) + 1}")
                sums.add(torch.stack(captured), mask)
    finally:
        for hook in hooks:
            hook.remove()
    influence, distance = sums.means()
    return {"block_influence": influence.tolist(), "angular_distance": distance.tolist(), "tokens": sums.tokens}


def token_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at each position: ``logits`` [B, T, V], ``input_ids`` [B, T] -> [B, T − 1], position
    t scoring ``input_ids[:, t + 1]``; in float32 at least (a bf16 log-softmax loses the small probabilities)."""
    shifted = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none").view_as(
        targets
    )


def mean_cross_entropy(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float | int]:
    """``model``'s mean next-token cross-entropy (nats per token) over the batches, every predicted token weighing
    the same: over all real tokens (``ce``) and over the trained ones only (``response_ce``: the responses, the
    assistant turns).

    Returns:
        ``{"ce", "tokens", "response_ce", "response_tokens"}``; a CE is NaN when it has no token.
    """
    device = _device(model)
    total = response_total = 0.0
    tokens = response_tokens = 0
    with torch.inference_mode():
        for batch in batches:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            ce = token_cross_entropy(logits, ids).double()  # [B, T - 1]
            real = mask[:, 1:].bool()  # right padding: a real target has a real context
            trained = batch["labels"].to(device)[:, 1:] != IGNORE_INDEX
            total += float(ce[real].sum())
            tokens += int(real.sum())
            response_total += float(ce[trained].sum())
            response_tokens += int(trained.sum())
    return {
        "ce": total / tokens if tokens else float("nan"),
        "tokens": tokens,
        "response_ce": response_total / response_tokens if response_tokens else float("nan"),
        "response_tokens": response_tokens,
    }


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device
