"""Which decoder layers to keep, and the pruned model that keeps them.

:func:`choose_layers` turns the measured scores (:func:`adakd.prune.layer_scores`) into kept layer indices;
:func:`prune_layers` builds the model that keeps exactly those layers, with the teacher's weights, and a config that
rebuilds it (``num_hidden_layers``, the per-layer lists) so that ``save_pretrained`` gives a normal folder.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InputError

__all__ = ["METHODS", "check_keep", "choose_layers", "contiguous_block", "decoder_layers", "even_layers",
           "prune_layers"]  # fmt: skip

METHODS = ("importance", "contiguous", "even")
# Config integers that count a prefix of the layers (the first k are full-attention / dense): after pruning, the
# number of kept layers inside that prefix. Kept layers stay in order, so the prefix stays a prefix.
_PREFIX_COUNTS = ("max_window_layers", "first_k_dense_replace")
# Config lists of layer indices (not one value per layer): kept ones renumbered, the others dropped.
_INDEX_LISTS = ("mlp_only_layers",)
# Config lists of one value per layer, beyond those whose name says so ("layer", "pattern").
_PER_LAYER = ("intermediate_size", "sliding_window", "num_attention_heads", "num_key_value_heads", "head_dim")


def decoder_layers(model: Any, name: str = "TEACHER") -> torch.nn.ModuleList:
    """The decoder layers of a decoder-only Hugging Face causal LM (``model.model.layers``: Llama, Qwen2, Mistral,
    Gemma, ...), checked to be all the config's layers.

    Raises:
        InputError: another architecture (encoder-decoder, GPT-2's ``transformer.h``, a multimodal wrapper), named
            with ``name``.
    """
    config = getattr(model, "config", None)
    arch = type(model).__name__
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if (
        config is None
        or getattr(config, "is_encoder_decoder", False)
        or not isinstance(layers, torch.nn.ModuleList)
        or getattr(config, "num_hidden_layers", None) != len(layers)
        or not isinstance(getattr(inner, "norm", None), torch.nn.Module)
    ):
        raise InputError(
            f"{name}: cannot prune a {arch}: depth pruning needs a decoder-only model whose layers are model.layers "
            "(Llama, Qwen2, Mistral, Gemma, ...)"
        )
    return layers


def even_layers(num_layers: int, layers: int) -> list[int]:
    """``layers`` evenly spaced indices of ``num_layers``, the first and the last always among them (one layer: the
    last, which writes into the final norm). Spacing ``(L − 1) / (N − 1)`` rounded half up, distinct as N ≤ L."""
    if layers == 1:
        return [num_layers - 1]
    step, half = num_layers - 1, layers - 1
    return [(2 * i * step + half) // (2 * half) for i in range(layers)]


def contiguous_block(distance: torch.Tensor, removed: int, keep_last: bool = True) -> tuple[int, float]:
    """Gromov et al.'s block to remove: the start l minimising the angular distance between ``h_l`` and
    ``h_{l+n}`` (n = ``removed``), and that distance.

    Args:
        distance: the mean angular distances [L + 1, L + 1] (:func:`adakd.prune.layer_scores`).
        removed: n ≥ 1, the block's length.
        keep_last: never remove the last layer (l + n ≤ L − 1), as the paper keeps the final layer: it writes what
            the head reads, and removing it measures a different thing (h_L is before the final norm).
    """
    num_layers = distance.shape[0] - 1
    last_start = num_layers - removed - (1 if keep_last else 0)
    costs = [float(distance[start, start + removed]) for start in range(last_start + 1)]
    start = min(range(len(costs)), key=lambda i: (costs[i], i))
    return start, costs[start]


def choose_layers(method: str, layers: int, num_layers: int, scores: dict[str, Any] | None = None) -> list[int]:
    """The ``layers`` indices to keep out of ``num_layers``, ascending.

    Args:
        method: ``"importance"`` (the largest block influence; ties to the lower index), ``"contiguous"`` (all but
            the block of ``num_layers − layers`` with the smallest angular distance, never the last layer) or
            ``"even"`` (:func:`even_layers`).
        layers: N, 1 ≤ N < ``num_layers``.
        num_layers: the teacher's layer count L.
        scores: :func:`adakd.prune.layer_scores`'s result; needed by importance and contiguous.

    Raises:
        InputError: an unknown method, N out of range, or scores missing for a method that needs them.
    """
    if method not in METHODS:
        raise InputError(f"--method {method}: unknown; valid: {', '.join(METHODS)}")
    if not 1 <= layers < num_layers:
        raise InputError(f"--layers {layers}: must be at least 1 and below the teacher's {num_layers} layers")
    if method == "even":
        return even_layers(num_layers, layers)
    if scores is None:
        raise InputError(f"--method {method} measures the layers on data: give --calibration FILE")
    if method == "importance":
        influence = [float(x) for x in scores["block_influence"]]
        ranked = sorted(range(num_layers), key=lambda i: (-influence[i], i))
        return sorted(ranked[:layers])
    start, _ = contiguous_block(torch.as_tensor(scores["angular_distance"]), num_layers - layers)
    block = range(start, start + num_layers - layers)
    return [i for i in range(num_layers) if i not in block]


def check_keep(keep: Sequence[int], num_layers: int, layers: int | None = None) -> list[int]:
    """Explicit kept indices (``--keep``), checked: in range, distinct, as many as ``--layers`` when given, fewer
    than the teacher's layers; returned ascending (the layers keep their order)."""
    shown = ",".join(str(i) for i in keep)
    if not keep:
        raise InputError("--keep: no layer indices")
    bad = [i for i in keep if not 0 <= i < num_layers]
    if bad:
        raise InputError(
            f"--keep {shown}: index {bad[0]} is out of range for the teacher's {num_layers} layers (0-based)"
        )
    if len(set(keep)) != len(keep):
        twice = next(i for i in keep if list(keep).count(i) > 1)
        raise InputError(f"--keep {shown}: layer {twice} is named twice")
    if layers is not None and layers != len(keep):
        raise InputError(f"--keep {shown}: {len(keep)} layers, but --layers {layers}")
    if len(keep) >= num_layers:
        raise InputError(f"--keep {shown}: keeps all {num_layers} layers; prune at least one")
    return sorted(keep)


def prune_layers(model: Any, keep: Sequence[int], *, share_weights: bool = False) -> Any:
    """A new model that keeps the decoder layers ``keep`` of ``model``, in their order; everything else
    (embeddings, final norm, head, tied weights, generation config) as it is. ``model`` is not changed.

    The copy's config has ``num_hidden_layers = len(keep)`` and its per-layer entries cut to the kept layers
    (``layer_types`` and the like; prefix counts such as ``max_window_layers`` recounted), and every kept module's
    ``layer_idx`` is renumbered 0..N − 1, which is where the KV cache stores the layer in generation.

    Args:
        model: a decoder-only causal LM (:func:`decoder_layers`).
        keep: the kept layer indices, distinct and in range (:func:`check_keep`).
        share_weights: share the parameter and buffer tensors with ``model`` instead of copying them (no memory
            cost; for measuring, or when the teacher is not used after). Modules and config are copies either way.

    Raises:
        InputError: not a supported architecture, or a config that would rebuild other shapes than the pruned
            model's (an unhandled per-layer setting).
    """
    layers = decoder_layers(model)
    keep = check_keep(list(keep), len(layers))
    config = pruned_config(model.config, keep)
    memo: dict[int, Any] = {id(model.config): config}
    if share_weights:
        for tensor in [*model.parameters(), *model.buffers()]:
            memo[id(tensor)] = tensor
    # One memo for the kept layers and the rest: every module's reference to the config (attention modules hold
    # one) lands on the new config, and the tied head keeps sharing the embedding's weight.
    kept = torch.nn.ModuleList(copy.deepcopy(layers[i], memo) for i in keep)
    memo[id(layers)] = kept
    pruned = copy.deepcopy(model, memo)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    _check_rebuilds(pruned, config)
    return pruned


def pruned_config(config: Any, keep: list[int]) -> Any:
    """A copy of ``config`` for the model that keeps layers ``keep`` (ascending) of its ``num_hidden_layers``."""
    num_layers = config.num_hidden_layers
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(keep)
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == num_layers and _per_layer(key):
            setattr(new, key, [value[i] for i in keep])
        elif key in _INDEX_LISTS and isinstance(value, (list, tuple)):
            setattr(new, key, [keep.index(i) for i in value if i in keep])
        elif key in _PREFIX_COUNTS and isinstance(value, int):
            setattr(new, key, sum(1 for i in keep if i < value))
    return new


def _per_layer(key: str) -> bool:
    return "layer" in key or "pattern" in key or key in _PER_LAYER


def _check_rebuilds(pruned: Any, config: Any) -> None:
    """The saved config must rebuild the pruned model's tensors, name by name and shape by shape, or loading the
    folder would fail or, worse, load weights into other modules. Built on the meta device: no memory, no init."""
    with torch.device("meta"):
        rebuilt = type(pruned)(copy.deepcopy(config))
    want = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))
        raise InputError(
            f"TEACHER: cannot prune a {type(pruned).__name__}: its config does not rebuild the kept layers "
            f"(first difference: {diff[0][0]})"
        )
