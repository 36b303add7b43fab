"""Loading the student and the teacher: hub ids, local paths or inline configs; LoRA; distributed teachers."""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..models import load_failure
from .config import ConfigError, ModelSection

__all__ = ["apply_lora", "load_model", "prepare_teacher", "torch_dtype"]


def torch_dtype(name: str) -> torch.dtype | str:
    """A config's dtype name (``"float32"``, ``"bfloat16"``, ...) as a torch dtype; ``"auto"`` stays a string."""
    return "auto" if name == "auto" else getattr(torch, name)


def load_model(section: ModelSection, role: str) -> Any:
    """A causal LM from ``section``: ``from_pretrained`` for a hub id or local path (the hub is only contacted when
    the path is not local), ``from_config`` with a fixed seed for an inline config (tiny random models).

    ``role`` (``"student"`` or ``"teacher"``) is the config section, for messages.

    Raises:
        ConfigError: the inline config is not valid for its ``model_type``, or ``name_or_path`` cannot be loaded
            (no such folder, no ``config.json``, hub unreachable); the message names the key and the path, and the
            library's error is chained.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch_dtype(section.dtype)
    if section.config is not None:
        cfg = dict(section.config)
        model_type = cfg.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **cfg)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{role}.config: {e}") from e
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(section.seed)
            model = AutoModelForCausalLM.from_config(config)
        return model.to(torch.float32 if dtype == "auto" else dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(section.name_or_path, dtype=dtype)
    except (OSError, ValueError) as e:  # transformers reports a bad folder as either
        reason = load_failure(section.name_or_path, e)
        raise ConfigError(f"{role}.name_or_path: cannot load {section.name_or_path!r} ({reason})") from e


def apply_lora(model: Any, section: ModelSection) -> Any:
    """Wrap the student in PEFT LoRA adapters when ``section.lora`` is set (else train every weight); the adapters
    are initialised from ``section.seed``, the same on every rank.

    Raises:
        ConfigError: PEFT refuses ``student.lora`` (e.g. ``target_modules`` that match no layer of the model).
    """
    if section.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    lora = section.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    # The adapters' random initialisation comes from the model's seed, not from whatever the global generator holds
    # by then: every data-parallel rank must start from the same adapters (FSDP2 shards each rank's own copy and
    # does not broadcast), and a run must start the same under every engine and number of processes.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(section.seed)
        try:
            return get_peft_model(model, config)
        except ValueError as e:
            raise ConfigError(f"student.lora: {str(e).splitlines()[0]}") from e


def prepare_teacher(teacher: Any, accelerator: Any) -> Any:
    """Place the frozen teacher for the run's distributed setup.

    - DeepSpeed ZeRO-3: an inference engine sharded like the student (a 7B teacher does not fit next to the
      student on every rank otherwise); other DeepSpeed stages keep a full replica (stage 0).
    - FSDP2: sharded with ``fully_shard`` over the same ranks (:func:`adakd.train.engines.shard_teacher_fsdp2`).
    - Otherwise (one device, DDP): moved to the device; it needs no wrapper since it takes no gradient.

    FSDP version 1 is refused (:func:`adakd.train.engines.engine_of`).
    """
    from .engines import engine_of, shard_teacher_fsdp2

    teacher.eval()
    teacher.requires_grad_(False)
    kind = engine_of(accelerator)
    if kind == "deepspeed":
        import deepspeed

        ds_config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        # No optimizer: drop the training-only blocks, which DeepSpeed would otherwise try to build.
        for key in ("optimizer", "scheduler"):
            ds_config.pop(key, None)
        ds_config.setdefault("zero_optimization", {}).pop("offload_optimizer", None)
        if stage != 3:
            ds_config["zero_optimization"]["stage"] = 0
        hidden = getattr(teacher.config, "hidden_size", None)
        if stage == 3 and hidden:
            ds_config["zero_optimization"].update(
                {
                    "reduce_bucket_size": hidden * hidden,
                    "stage3_param_persistence_threshold": 10 * hidden,
                    "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                }
            )
        engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
        engine.eval()
        return engine
    if kind == "fsdp2":
        return shard_teacher_fsdp2(teacher, accelerator).eval()
    return teacher.to(accelerator.device)
