"""Depth pruning: a student that keeps N of the teacher's decoder layers, chosen by measurement (``adakd prune``).

- :func:`layer_scores`: one forward of the teacher over calibration batches gives ShortGPT's block influence of each
  layer and the angular distance between every pair of residual states (the math: :mod:`.scores`, pure torch);
- :func:`choose_layers`: the kept layers by ``importance`` (largest block influence), ``contiguous`` (Gromov et
  al.: drop the block whose ends are closest) or ``even``;
- :func:`prune_layers`: the new model, the kept layers' weights exactly the teacher's, the config rebuilt for them;
- :func:`mean_cross_entropy`: the model's token CE on held-out text, to compare the choices before training.

See ``docs/prune.md``. Width pruning (heads, MLP channels, hidden size) is not done.
"""

from __future__ import annotations

from .layers import METHODS, check_keep, choose_layers, contiguous_block, decoder_layers, even_layers, prune_layers
from .measure import layer_scores, mean_cross_entropy, token_cross_entropy
from .scores import ScoreSums, angular_distance, block_influence, masked_states, token_cosines

__all__ = [
    "METHODS",
    "ScoreSums",
    "angular_distance",
    "block_influence",
    "check_keep",
    "choose_layers",
    "contiguous_block",
    "decoder_layers",
    "even_layers",
    "layer_scores",
    "masked_states",
    "mean_cross_entropy",
    "prune_layers",
    "token_cosines",
    "token_cross_entropy",
]
