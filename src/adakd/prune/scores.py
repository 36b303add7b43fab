"""The layer scores of depth pruning, in pure torch: per-token values first, the reduction over tokens apart.

Notation: a decoder with L layers has L + 1 residual-stream states per token, ``h_0`` (the embeddings, entering
layer 0) ... ``h_L`` (leaving layer L − 1, *before* the final norm); layer l maps ``h_l`` to ``h_{l+1}``.

- Block influence (ShortGPT, Men et al. 2024, Eq. 3): ``BI_l = 1 − E_tokens[cos(h_l, h_{l+1})]``; a layer that
  barely turns the residual stream scores near 0 and is the first to go.
- Angular distance (Gromov et al. 2024, Eq. 7): ``d(h_i, h_j) = arccos(cos(h_i, h_j)) / π``, in [0, 1]; removing
  the block of n layers [l, l + n) costs about ``E_tokens[d(h_l, h_{l+n})]``.

Both come from one matrix per token, the cosines between all of its L + 1 states (:func:`token_cosines`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ScoreSums", "angular_distance", "block_influence", "masked_states", "token_cosines"]


def masked_states(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The real tokens' states: ``states`` [S, B, T, H] at ``mask`` [B, T] (nonzero: a token; 0: padding) ->
    [S, N, H], N the number of real tokens, batch-major order."""
    if states.dim() != 4 or mask.shape != states.shape[1:3]:
        raise ValueError(
            f"states [S, B, T, H] and mask [B, T] expected, got {tuple(states.shape)}, {tuple(mask.shape)}"
        )
    return states[:, mask.bool()]


def token_cosines(states: torch.Tensor) -> torch.Tensor:
    """Cosine between every pair of one token's states: ``states`` [S, N, H] -> [N, S, S], float64.

    float64: the scores of nearly idle layers are 1 − cos ≈ 1e-4 and below, where float32's cancellation would be
    all there is (and arccos near 1 amplifies an error ε to √(2ε)). A zero state has cosine 0 with everything.
    """
    unit = states.to(torch.float64)
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    unit = unit.transpose(0, 1)  # [N, S, H]
    return unit @ unit.transpose(1, 2)


def block_influence(cosines: torch.Tensor) -> torch.Tensor:
    """ShortGPT's per-token block influence of each layer: ``cosines`` [N, S, S] -> [N, S − 1], ``1 − cos(h_l,
    h_{l+1})`` for layer l."""
    return 1.0 - torch.diagonal(cosines, offset=1, dim1=1, dim2=2)


def angular_distance(cosines: torch.Tensor) -> torch.Tensor:
    """Per-token angular distance between every pair of states: ``cosines`` [N, S, S] -> [N, S, S],
    ``arccos(cos) / π`` in [0, 1]. The clamp takes the rounding of a cosine just past ±1."""
    return torch.arccos(cosines.clamp(-1.0, 1.0)) / math.pi


@dataclass
class ScoreSums:
    """Token sums of the scores over a calibration set, batch by batch; :meth:`means` divides by the token count,
    so that every real token weighs the same whatever its batch.

    ``influence`` [L] and ``distance`` [L + 1, L + 1] are float64 sums; ``tokens`` counts the real tokens.
    """

    influence: torch.Tensor | None = None
    distance: torch.Tensor | None = None
    tokens: int = 0

    def add(self, states: torch.Tensor, mask: torch.Tensor) -> None:
        """Add one batch: ``states`` [S, B, T, H] (S = L + 1, ``h_0 .. h_L``), ``mask`` [B, T]."""
        real = masked_states(states, mask)
        cosines = token_cosines(real)  # [N, S, S]
        influence = block_influence(cosines).sum(0).cpu()
        distance = angular_distance(cosines).sum(0).cpu()
        if self.influence is None:
            self.influence, self.distance = influence, distance
        else:
            if distance.shape != self.distance.shape:
                raise ValueError(f"a batch with {distance.shape[0]} states after {self.distance.shape[0]}")
            self.influence += influence
            self.distance += distance
        self.tokens += real.shape[1]

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block influence [L], angular distance [L + 1, L + 1])``, each the mean over all real tokens."""
        if self.influence is None or self.tokens == 0:
            raise ValueError("no tokens to score: the calibration batches were empty")
        return self.influence / self.tokens, self.distance / self.tokens
