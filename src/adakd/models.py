"""Loading a causal LM for inference (evaluation, the inspector): one loader, LoRA adapters merged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["load_causal_lm", "load_failure"]


def load_failure(path: str, error: BaseException) -> str:
    """Why ``from_pretrained(path)`` failed, in a few words, for a message that names the path.

    A local-looking path (absolute, or starting with ``.`` or ``~``) that does not exist is "no such folder":
    transformers would report it as a malformed hub id. Otherwise the first line of the library's own message.
    """
    local = Path(path).expanduser()
    if (local.is_absolute() or path.startswith((".", "~"))) and not local.exists():
        return "no such folder"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def load_causal_lm(path: str, *, base: str | None = None, dtype: Any = "auto", name: str = "--model") -> Any:
    """``path`` as a ``transformers`` causal LM, or the LoRA adapter at ``path`` merged into ``base`` (merged: no
    adapter overhead at generation).

    Args:
        path: a model folder or hub id; with ``base``, the adapter's folder.
        base: the base model of a LoRA adapter, or None.
        dtype: ``"auto"``, a torch dtype or its name.
        name: the flag or config key ``path`` came from, for the error message.

    Returns:
        The model (a ``PreTrainedModel``).

    Raises:
        InputError: the model cannot be loaded (no such folder, no ``config.json``, hub unreachable); the message
            names ``name`` and the path, and the library's error is chained.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    reading = base if base is not None else path  # the folder being read, for the reason of a failure
    try:
        model = AutoModelForCausalLM.from_pretrained(reading, dtype=torch_dtype)
        if base is None:
            return model
        from peft import PeftModel

        reading = path
        return PeftModel.from_pretrained(model, path).merge_and_unload()
    except (OSError, ValueError) as e:  # transformers reports a bad folder as either
        where = f"{name} {path}" + (f" (base {base})" if base is not None else "")
        raise InputError(f"{where}: cannot load ({load_failure(reading, e)})") from e
