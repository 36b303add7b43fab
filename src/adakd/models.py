"""Loading a causal LM for inference (evaluation, the inspector): one loader, LoRA adapters merged."""

from __future__ import annotations

from typing import Any

__all__ = ["load_causal_lm"]


def load_causal_lm(path: str, *, base: str | None = None, dtype: Any = "auto", name: str = "--model") -> Any:
    """``path`` as a ``transformers`` causal LM, or the LoRA adapter at ``path`` merged into ``base`` (merged: no
    adapter overhead at generation). ``dtype``: ``"auto"``, a torch dtype or its name. A model that cannot be
    loaded is a ValueError naming ``name`` (the flag or key the path came from) and the path."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    try:
        if base is not None:
            from peft import PeftModel

            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
            return PeftModel.from_pretrained(model, path).merge_and_unload()
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        where = f"{name} {path}" + (f" (base {base})" if base is not None else "")
        raise ValueError(f"{where}: cannot load ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
