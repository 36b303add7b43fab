"""Distributed engines (DDP, FSDP2, DeepSpeed): running a model through the wrapper the engine installed, reading
its output layer in full, sharding the frozen teacher, and saving a complete final model.

Why this module exists. The fused loss (:meth:`adakd.AdaKDLoss.forward_hidden`) needs the final hidden states and
the lm_head parameters separately. Calling the inner decoder directly would skip the engine's forward: under DDP
the gradient all-reduce is then never armed (every rank trains its own replica), under FSDP2 and ZeRO-3 the
parameters read are shards or empty placeholders. So every call here goes *through* the engine's wrapper with the
wrapped module's ``forward`` temporarily replaced by our own function (:func:`call_through`), the technique TRL and
Lightning call forward redirection: the engine's pre-forward hooks gather parameters, its post-forward hooks arm
the gradient reduction, and autograd carries the gradients back to the sharded parameters.

For the student, the whole fused loss runs inside the lm_head module's (redirected) forward, itself inside the
model's: at that moment the engine has gathered the full lm_head weight, and the engine's backward hooks attach to
the loss. The frozen teacher needs no gradient, so its lm_head is gathered with the engine's own API
(:func:`full_parameters`: ``DTensor.full_tensor`` under FSDP2, ``deepspeed.zero.GatheredParameters`` under ZeRO-3).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

__all__ = [
    "ENGINES",
    "autocast",
    "call_through",
    "check_linear_head",
    "engine_of",
    "full_parameters",
    "is_sharded",
    "save_final",
    "shard_teacher_fsdp2",
    "unwrap",
]

ENGINES = ("single", "ddp", "fsdp2", "deepspeed")


def engine_of(accelerator: Any) -> str:
    """The run's engine: ``single``, ``ddp`` (also several CPU processes), ``fsdp2`` or ``deepspeed``.

    FSDP version 1 is refused: it is deprecated in transformers and accelerate, and its flat parameters would need
    a third code path here; FSDP2 does the same job.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        if not getattr(accelerator, "is_fsdp2", False):
            raise ConfigError(
                "accelerate: FSDP version 1 is not supported; use FSDP2 (fsdp_version: 2, as in "
                "configs/accelerate/fsdp.yaml)"
            )
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"


def _deepspeed_engine(module: Any) -> bool:
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(module, ds.DeepSpeedEngine)


def _inner(wrapper: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``forward`` the wrapper calls: DDP and DeepSpeed engines hold it in ``.module``; FSDP2
    hooks the module itself."""
    if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel) or _deepspeed_engine(wrapper):
        return wrapper.module
    return wrapper


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM under every wrapper: DDP / DeepSpeed engine, then PEFT (LoRA layers stay inside its modules)."""
    inner = _inner(model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


_MISSING = object()


def call_through(wrapper: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``wrapper(*args, **kwargs)`` with the wrapped module's forward replaced by ``fn`` for this one call.

    The engine's forward machinery (DDP's reducer preparation, FSDP2's and DeepSpeed ZeRO-3's parameter gathering
    and backward hooks) runs around ``fn`` exactly as around the model's own forward; ``fn``'s tensor outputs are
    the call's outputs. Any instance-level forward (accelerate's mixed-precision wrapper) is restored afterwards;
    callers that need autocast enter it inside ``fn``.
    """
    inner = _inner(wrapper)
    previous = inner.__dict__.get("forward", _MISSING)
    inner.forward = fn
    try:
        return wrapper(*args, **kwargs)
    finally:
        if previous is _MISSING:
            del inner.forward
        else:
            inner.forward = previous


def is_sharded(param: torch.Tensor) -> bool:
    """True when ``param`` is a shard (an FSDP2 DTensor) or a ZeRO-3 partitioned parameter, not the full tensor."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) or hasattr(param, "ds_id")


@contextlib.contextmanager
def full_parameters(*params: torch.Tensor | None) -> Iterator[list[torch.Tensor | None]]:
    """Full, read-only values of frozen parameters for the duration of the block, gathered with the engine's API.

    ZeRO-3 partitioned parameters are gathered in place by ``deepspeed.zero.GatheredParameters`` (and released at
    the end); FSDP2 shards (DTensors) are all-gathered with ``full_tensor``; full tensors are returned as they are.
    Every rank must enter the block together (the gathers are collectives). No gradient flows to the result.
    """
    from torch.distributed.tensor import DTensor

    zero3 = [p for p in params if p is not None and hasattr(p, "ds_id")]
    with contextlib.ExitStack() as stack:
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=None))
        with torch.no_grad():
            out = [p.full_tensor() if isinstance(p, DTensor) else p for p in params]
        yield [None if p is None else p.detach() for p in out]


def shard_teacher_fsdp2(teacher: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """Shard the frozen teacher with FSDP2 (``fully_shard``) over all ranks: each transformer block (the model's
    ``_no_split_modules``), then the root, parameters resharded after every forward. It takes no gradient, so it
    gets no optimizer state; it keeps its own dtype (mixed precision does not apply to a model that only infers)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    teacher = teacher.to(accelerator.device)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    blocks = set(getattr(teacher, "_no_split_modules", None) or ())
    for module in teacher.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
    return teacher


# Config attributes of models whose logits are not hidden @ Wᵀ (+ b): the fused loss would optimise another objective.
_HEAD_TRANSFORMS = {
    "final_logit_softcapping": "final logit soft-capping",  # Gemma-2/3
    "logit_scale": "logit scaling",  # Cohere
    "logits_scaling": "logit scaling",  # Granite
}


def check_linear_head(model: torch.nn.Module, role: str) -> None:
    """Refuse ``loss.fused: true`` for a model whose logits are not ``hidden @ lm_head.weightᵀ (+ bias)``.

    Known transformations are read from the config (soft-capping, logit scaling); any other difference is caught
    by comparing the model's logits with the fused path's product on a short probe sequence (skipped when the
    parameters are already sharded, e.g. built under ``deepspeed.zero.Init``).

    Raises:
        ConfigError: ``key="loss.fused"``, its ``reason`` naming the role and what its output layer does.
    """
    base = unwrap(model)
    config = getattr(base, "config", None)
    name = type(base).__name__
    for attr, what in _HEAD_TRANSFORMS.items():
        value = getattr(config, attr, None)
        neutral = value is None or (attr != "final_logit_softcapping" and value == 1)
        if not neutral:
            reason = (
                f"the {role} ({name}) applies {what} to its logits ({attr}={value}); the fused loss computes "
                "hidden @ lm_head.weightᵀ only"
            )
            raise ConfigError(
                f"loss.fused: the {role} ({name}) applies {what} to its logits ({attr}={value}); the fused loss "
                "computes hidden @ lm_head.weightᵀ only: set loss.fused: false",
                key="loss.fused",
                reason=reason,
            )
    head = base.get_output_embeddings()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if head is None or decoder is None or not isinstance(head, torch.nn.Linear):
        raise ConfigError(
            f"loss.fused: the {role} ({name}) exposes no decoder and linear output layer; set loss.fused: false",
            key="loss.fused",
            reason=f"the {role} ({name}) exposes no decoder and linear output layer",
        )
    if type(head.weight).__name__ in ("Params4bit", "Int8Params"):  # bitsandbytes packs the weight it quantises
        kind = type(head).__name__
        raise ConfigError(
            f"loss.fused: the {role}'s output layer is quantised ({kind}); the fused loss needs its dense weight: "
            "set loss.fused: false, or keep lm_head out of the quantisation",
            key="loss.fused",
            reason=f"the {role}'s output layer is quantised ({kind}); the fused loss needs its dense weight",
        )
    params = list(base.parameters())
    if any(is_sharded(p) or p.is_meta for p in params):
        return
    if getattr(base, "is_quantized", False):
        # A quantised body with a dense lm_head (bitsandbytes skips it by default): the logits are head(hidden) as
        # the checks above establish, and bitsandbytes' CPU kernels fail on the probe's tiny inputs.
        return
    if not _head_matches(base, decoder, head):
        raise ConfigError(
            f"loss.fused: the {role} ({name}) computes logits other than hidden @ lm_head.weightᵀ (+ bias); the fused "
            "loss would optimise another objective: set loss.fused: false",
            key="loss.fused",
            reason=f"the {role} ({name}) computes logits other than hidden @ lm_head.weightᵀ (+ bias); the fused "
            "loss would optimise another objective",
        )


def _head_matches(base: torch.nn.Module, decoder: torch.nn.Module, head: torch.nn.Linear) -> bool:
    """Whether the model's logits are ``hidden @ Wᵀ (+ b)`` on a short probe sequence (eval mode, no gradient)."""
    ids = torch.arange(1, 5, device=head.weight.device).unsqueeze(0) % head.weight.shape[0]
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            logits = base(input_ids=ids).logits.float()
            hidden = decoder(input_ids=ids).last_hidden_state
            product = torch.nn.functional.linear(hidden, head.weight, head.bias).float()
    finally:
        base.train(was_training)
    return logits.shape == product.shape and torch.allclose(
        logits, product, rtol=1e-4, atol=1e-5 * float(product.abs().max().clamp_min(1))
    )


def save_final(trainer: Any, folder: str | Path) -> None:
    """A complete model (or the LoRA adapter of a PEFT student) and the tokenizer in ``folder``, loadable with
    ``from_pretrained``, under every engine: the full state dict is gathered with the engine's API
    (``Accelerator.get_state_dict``: FSDP2 shards, ZeRO-3 partitions) and written by the main process."""
    folder = str(folder)
    accelerator = trainer.accelerator
    if engine_of(accelerator) in ("single", "ddp"):
        trainer.save_model(folder)
        return
    state = accelerator.get_state_dict(trainer.model_wrapped)  # a collective: every rank
    if trainer.args.should_save:
        model = _inner(accelerator.unwrap_model(trainer.model_wrapped))
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(folder)
    accelerator.wait_for_everyone()


def autocast(accelerator: Any) -> contextlib.AbstractContextManager:
    """The accelerator's autocast (a no-op without mixed precision, or without an accelerator).

    Why: accelerate applies mixed precision by wrapping the model's forward, which :func:`call_through` replaces
    for the call; functions run through it enter the same autocast explicitly."""
    if accelerator is None or not accelerator.native_amp:
        return contextlib.nullcontext()
    return accelerator.autocast()
