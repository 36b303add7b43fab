"""Loading the student and the teacher: hub ids, local paths or inline configs; ``from_pretrained`` arguments;
LoRA adapters merged at load; bitsandbytes quantisation (a 4/8-bit frozen teacher, a QLoRA student); LoRA on the
student; distributed teachers."""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..errors import ConfigError, InputError
from ..models import ModelLoadError, from_pretrained_merged, resolve_gguf
from .config import ModelSection
from .model_checks import CONFIG_MODEL_KWARGS, bnb_config, check_loading

__all__ = [
    "CONFIG_MODEL_KWARGS",
    "apply_lora",
    "bnb_config",
    "check_loading",
    "check_quantization_backend",
    "gguf_location",
    "load_model",
    "prepare_teacher",
    "tokenizer_kwargs",
    "tokenizer_source",
    "torch_dtype",
]


def torch_dtype(name: str) -> torch.dtype | str:
    """A config's dtype name (``"float32"``, ``"bfloat16"``, ...) as a torch dtype; ``"auto"`` stays a string."""
    return "auto" if name == "auto" else getattr(torch, name)


def gguf_location(section: ModelSection, role: str) -> tuple[str | None, str | None]:
    """``(name_or_path, gguf_file)`` to load ``section``'s weights from: ``section.name_or_path`` and None for
    ``transformers``' own formats; for ``gguf_file``, the folder (or hub repo) holding it and the file's name.

    Raises:
        ConfigError: naming ``{role}.gguf_file``: no such file, the ``gguf`` package or the named distribution
            missing.
    """
    if section.gguf_file is None:
        return section.name_or_path, None
    try:
        return resolve_gguf(section.gguf_file, section.name_or_path, name=f"{role}.gguf_file")
    except InputError as e:
        raise ConfigError(str(e)) from e


def tokenizer_source(section: ModelSection) -> str | None:
    """Where ``section``'s tokenizer comes from: ``tokenizer``, else the model's own files (``name_or_path``, or a
    GGUF file given without it, whose stored tokenizer :func:`adakd.data.tokenizer_for` reads)."""
    return section.tokenizer or section.name_or_path or section.gguf_file


def tokenizer_kwargs(section: ModelSection) -> dict[str, Any]:
    """``AutoTokenizer.from_pretrained`` arguments for ``section``'s tokenizer: ``tokenizer_revision``; for the
    model's own tokenizer (no ``tokenizer`` key) the model's ``revision`` by default, and its ``trust_remote_code``
    (a model's custom code usually ships its tokenizer too). Empty when nothing is set."""
    kwargs: dict[str, Any] = {}
    own = section.tokenizer is None
    revision = section.tokenizer_revision or (section.model_kwargs.get("revision") if own else None)
    if revision is not None:
        kwargs["revision"] = revision
    if own and section.model_kwargs.get("trust_remote_code"):
        kwargs["trust_remote_code"] = True
    if own and section.gguf_file is not None and section.name_or_path is not None:
        kwargs["gguf_file"] = section.gguf_file  # the file inside name_or_path (a path alone is resolved by its name)
    return kwargs


def check_quantization_backend(section: ModelSection, role: str, device: torch.device | str) -> None:
    """Refuse, before any model is loaded, a quantised model that this machine cannot load: bitsandbytes missing
    or older than transformers needs, or the run's ``device`` not among the devices it supports.

    Raises:
        ConfigError: naming ``{role}.quantization``, what is missing and how to get it.
    """
    if section.quantization is None:
        return
    from packaging.version import Version
    from transformers.utils.import_utils import BITSANDBYTES_MIN_VERSION

    bits = 4 if section.quantization.get("load_in_4bit") else 8
    device = torch.device(device)
    need = f"{role}.quantization: {bits}-bit loading needs bitsandbytes >= {BITSANDBYTES_MIN_VERSION}"
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError(
            f"{need}, which is not installed: pip install 'bitsandbytes>={BITSANDBYTES_MIN_VERSION}'"
        ) from e
    version = getattr(bitsandbytes, "__version__", "0")
    if Version(version) < Version(BITSANDBYTES_MIN_VERSION):
        raise ConfigError(f"{need}; {version} is installed: pip install -U bitsandbytes")
    supported = sorted(getattr(bitsandbytes, "supported_torch_devices", ()))
    if device.type not in supported:
        raise ConfigError(
            f"{role}.quantization: bitsandbytes {version} runs on {', '.join(supported) or 'no device'}, "
            f"not on this run's device ({device.type})"
        )


def load_model(section: ModelSection, role: str, device: torch.device | str | None = None) -> Any:
    """A causal LM from ``section``: ``from_pretrained`` for a hub id or local path (the hub is only contacted when
    the path is not local), ``from_config`` with a fixed seed for an inline config (tiny random models).

    ``model_kwargs`` go to ``from_pretrained`` as they are (``from_config`` takes ``attn_implementation`` and
    ``trust_remote_code``). A LoRA adapter (``adapter``, or ``name_or_path`` itself an adapter) is merged into its
    base here, once. ``quantization`` loads the weights through ``BitsAndBytesConfig``, placed on ``device`` (the
    run's device: a quantised model cannot be moved afterwards).

    ``role`` (``"student"`` or ``"teacher"``) is the config section, for messages.

    Raises:
        ConfigError: the inline config is not valid for its ``model_type``, ``name_or_path`` or ``adapter`` cannot
            be loaded (no such folder, no ``config.json``, hub unreachable, an adapter for another base), or the
            machine cannot load the quantisation; the message names the key and the path, and the library's
            error is chained.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch_dtype(section.dtype)
    kwargs = dict(section.model_kwargs)
    if section.config is not None:
        cfg = dict(section.config)
        model_type = cfg.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **cfg)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{role}.config: {e}") from e
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(section.seed)
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        return model.to(torch.float32 if dtype == "auto" else dtype)
    if section.quantization is not None:
        device = torch.device("cpu") if device is None else torch.device(device)
        check_quantization_backend(section, role, device)
        kwargs["quantization_config"] = bnb_config(section.quantization)
        kwargs["device_map"] = {"": device}
    path, gguf_file = gguf_location(section, role)
    try:
        return from_pretrained_merged(path, adapter=section.adapter, dtype=dtype, gguf_file=gguf_file, **kwargs)
    except ModelLoadError as e:  # named by its key, the library's error chained
        if e.part == "adapter" and section.adapter is not None:
            raise ConfigError(f"{role}.adapter: cannot load {e.path!r} ({e.reason})") from e.__cause__
        if e.adapter is not None:
            raise ConfigError(
                f"{role}.name_or_path: cannot load {e.path!r}, the base model of the adapter {e.adapter!r} ({e.reason})"
            ) from e.__cause__
        key = f"{role}.gguf_file" if gguf_file is not None else f"{role}.name_or_path"
        raise ConfigError(f"{key}: cannot load {e.path!r} ({e.reason})") from e.__cause__


def apply_lora(model: Any, section: ModelSection, gradient_checkpointing: bool = False) -> Any:
    """Wrap the student in PEFT LoRA adapters when ``section.lora`` is set (else train every weight); the adapters
    are initialised from ``section.seed``, the same on every rank. A quantised base (QLoRA) is first prepared with
    ``peft.prepare_model_for_kbit_training`` (frozen base, norms in float32, gradients into the inputs; activation
    checkpointing when the run asks for it).

    Raises:
        ConfigError: PEFT refuses ``student.lora`` (e.g. ``target_modules`` that match no layer of the model).
    """
    if section.lora is None:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_quantized", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
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
    - Otherwise (one device, DDP): moved to the device; it needs no wrapper since it takes no gradient. A quantised
      teacher was loaded onto its device and stays there.

    FSDP version 1 is refused (:func:`adakd.train.engines.engine_of`), and so is a quantised teacher under DeepSpeed
    or FSDP2 (neither shards bitsandbytes weights here).

    Raises:
        ConfigError: FSDP version 1, or a quantised teacher under DeepSpeed or FSDP2.
    """
    from .engines import engine_of, shard_teacher_fsdp2

    teacher.eval()
    teacher.requires_grad_(False)
    kind = engine_of(accelerator)
    if getattr(teacher, "is_quantized", False):
        if kind in ("deepspeed", "fsdp2"):
            raise ConfigError(
                f"teacher.quantization: a quantised teacher runs on one device per process (DDP or a single "
                f"process), not under {kind}: drop teacher.quantization, or launch without {kind}"
            )
        return teacher
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
