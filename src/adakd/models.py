"""Loading a causal LM: one loader for training and inference (evaluation, the inspector), LoRA adapters merged.

A LoRA adapter (a folder or hub id holding ``adapter_config.json``) is merged into its base once, at load
(``merge_and_unload``): the result is a plain ``transformers`` model, with no adapter cost at any forward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["ADAPTER_CONFIG", "ModelLoadError", "adapter_config", "from_pretrained_merged", "load_causal_lm",
           "load_failure"]  # fmt: skip

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file: its presence makes a folder or hub repo an adapter


class ModelLoadError(InputError):
    """``from_pretrained`` failed. ``path`` is what was being read, ``part`` is ``"model"`` or ``"adapter"``,
    ``reason`` says why in a few words, and ``adapter`` names the adapter whose base ``path`` is, when it is one."""

    def __init__(self, path: str, part: str, reason: str, adapter: str | None = None) -> None:
        super().__init__(f"{path}: cannot load ({reason})")
        self.path, self.part, self.reason, self.adapter = path, part, reason, adapter


def load_failure(path: str, error: BaseException) -> str:
    """Why ``from_pretrained(path)`` failed, in a few words, for a message that names the path.

    A local-looking path (absolute, or starting with ``.`` or ``~``) that does not exist is "no such folder":
    transformers would report it as a malformed hub id. Otherwise the first line of the library's own message.
    """
    local = Path(path).expanduser()
    if _local_looking(path) and not local.exists():
        return "no such folder"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _local_looking(path: str) -> bool:
    return Path(path).expanduser().is_absolute() or path.startswith((".", "~"))


def adapter_config(path: str, token: str | bool | None = None) -> dict[str, Any] | None:
    """The PEFT adapter config at ``path`` (a folder, or a hub id whose repo holds ``adapter_config.json``), or None
    when ``path`` is not an adapter. A path that cannot be read at all is not an adapter here: loading it as a
    model then reports why."""
    local = Path(path).expanduser()
    if local.is_dir():
        file = local / ADAPTER_CONFIG
    elif _local_looking(path):
        return None
    else:
        from transformers.utils import find_adapter_config_file

        try:
            found = find_adapter_config_file(path, token=token)
        except (OSError, ValueError):  # no such repo, hub unreachable, malformed id: from_pretrained says which
            return None
        if found is None:
            return None
        file = Path(found)
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(path, "adapter", f"unreadable {ADAPTER_CONFIG}: {e}") from e
    if not isinstance(config, dict):
        raise ModelLoadError(path, "adapter", f"{ADAPTER_CONFIG} is not a JSON object")
    return config


def from_pretrained_merged(path: str, *, adapter: str | None = None, dtype: Any = "auto", **kwargs: Any) -> Any:
    """The causal LM at ``path``, with the LoRA adapter ``adapter`` merged into it.

    ``path`` may itself be an adapter (``adapter_config.json``): its base is the model its config names
    (``base_model_name_or_path``), and ``path`` is merged into it.

    Args:
        path: a model folder or hub id, or an adapter's (without ``adapter``).
        adapter: a LoRA adapter (folder or hub id) trained on ``path``, or None.
        dtype: ``"auto"``, a torch dtype or its name.
        **kwargs: more ``from_pretrained`` arguments for the model (``revision``, ``attn_implementation``,
            ``trust_remote_code``, ``quantization_config``, ``device_map``, ...); the adapter is read at its
            default revision.

    Returns:
        The model (a ``PreTrainedModel``, no PEFT module left).

    Raises:
        ModelLoadError: the model or the adapter cannot be loaded (no such folder, no ``config.json``, hub
            unreachable, an adapter that names no base); the library's error is chained.
    """
    import torch
    from transformers import AutoModelForCausalLM

    via = None
    if adapter is None:
        found = adapter_config(path, token=kwargs.get("token"))
        if found is not None:
            base = found.get("base_model_name_or_path")
            if not base:
                raise ModelLoadError(path, "adapter", "a LoRA adapter that does not name its base model")
            path, adapter, via = str(base), path, path
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as e:  # transformers reports a bad folder as either
        raise ModelLoadError(path, "model", load_failure(path, e), adapter=via) from e
    if adapter is None:
        return model
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError) as e:
        raise ModelLoadError(adapter, "adapter", load_failure(adapter, e)) from e
    except RuntimeError as e:
        if not str(e).startswith("Error(s) in loading state_dict"):
            raise
        # An adapter trained on another base: torch lists every mismatch; the first one says enough.
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), "")
        raise ModelLoadError(adapter, "adapter", f"it does not fit the base model {path!r}: {first}") from e


def load_causal_lm(path: str, *, base: str | None = None, dtype: Any = "auto", name: str = "--model") -> Any:
    """``path`` as a ``transformers`` causal LM, or the LoRA adapter at ``path`` merged into ``base``, or into the
    base its ``adapter_config.json`` names (merged: no adapter overhead at generation).

    Args:
        path: a model folder or hub id; an adapter's folder or hub id.
        base: the base model of a LoRA adapter, or None (then an adapter's own recorded base).
        dtype: ``"auto"``, a torch dtype or its name.
        name: the flag or config key ``path`` came from, for the error message.

    Returns:
        The model (a ``PreTrainedModel``).

    Raises:
        InputError: the model cannot be loaded (no such folder, no ``config.json``, hub unreachable); the message
            names ``name`` and the path, and the library's error is chained.
    """
    where = f"{name} {path}" + (f" (base {base})" if base is not None else "")
    try:
        if base is not None:
            return from_pretrained_merged(base, adapter=path, dtype=dtype)
        return from_pretrained_merged(path, dtype=dtype)
    except ModelLoadError as e:  # re-raised with the flag's wording, the library's error chained as before
        if e.adapter is not None:
            raise InputError(f"{where}: cannot load its base model {e.path!r} ({e.reason})") from e.__cause__
        raise InputError(f"{where}: cannot load ({e.reason})") from e.__cause__
