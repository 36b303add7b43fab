"""The model card of a run's ``output_dir/final`` (``README.md`` with YAML front matter): what the Hub indexes, the
models, the data, every ``loss`` setting as the run used it, the training settings, the final metrics, and how the
run was made. Rendering only: :mod:`.hub` uploads ``final/``.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..files import write_text
from ..markdown import table
from .config import DEFAULT_LATF_WARMUP, LATF_KEYS, DataSection, DistillConfig, LossSection, ModelSection

__all__ = ["CARD", "REPO_ID", "TAGS", "model_card", "write_model_card"]

CARD = "README.md"
TAGS = ("adakd", "knowledge-distillation", "distillation")
# A Hub repo id: NAME or NAMESPACE/NAME (checked again by the upload, :func:`.hub.check_hub`).
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_SECRET_KEYS = ("hub_token", "token")
_DATA_FILES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".txt")


def _hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a hub id (``owner/name`` or ``name``) and is no local path nor data file: the Hub
    refuses card metadata that names anything else."""
    if not name or Path(name).expanduser().exists() or not REPO_ID.fullmatch(name):
        return None
    if Path(name).suffix.lower() in _DATA_FILES:
        return None
    return name


def _dataset_ids(d: DataSection) -> list[str]:
    """The training data's hub name (``data.name``, or a ``data.path`` read through ``datasets``), when it has one."""
    names = [d.name, d.path if d.source == "hf" else None]
    return sorted({n for n in map(_hub_id, names) if n})


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "–"
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


def _loss_rows(loss: LossSection, loss_fn: Any) -> list[tuple[str, str]]:
    """Every ``loss`` key as the run used it: LATF's unset keys show the value LATF ran with."""
    controller = getattr(loss_fn, "controller", None)
    rows = []
    for f in dataclasses.fields(loss):
        value = getattr(loss, f.name)
        if f.name in LATF_KEYS and loss.selection != "latf":
            continue  # LATF's own keys: not used by another selection
        if value is None and f.name == "warmup_ratio" and loss.selection == "latf" and loss.warmup_steps is None:
            rows.append((f"loss.{f.name}", f"{_show(DEFAULT_LATF_WARMUP)} (default)"))
            continue
        if value is None and f.name in LATF_KEYS and hasattr(controller, f.name):
            note = "from warmup_ratio" if f.name == "warmup_steps" else "default"
            rows.append((f"loss.{f.name}", f"{_show(getattr(controller, f.name))} ({note})"))
            continue
        rows.append((f"loss.{f.name}", _show(value)))
    return rows


def _model_name(section: Any) -> str | None:
    """How the card names a pretrained model: its path or hub id, and its GGUF file when it was read from one."""
    if section.gguf_file is not None:
        inside = f" in `{section.name_or_path}`" if section.name_or_path else ""
        return f"GGUF `{section.gguf_file}`{inside}"
    return f"`{section.name_or_path}`" if section.name_or_path else None


def _model_row(role: str, section: Any, used: bool = True) -> list[str]:
    if section is None or not used:
        return [role, "none (plain SFT)" if section is None else "not used (loss.kd_ratio: 0)", "", ""]
    what = _model_name(section) or "inline config: " + _show(section.config)
    if section.adapter:
        what += f" + LoRA adapter `{section.adapter}` (merged at load)"
    notes = []
    if section.lora is not None:
        lora = section.lora
        notes.append(
            f"LoRA r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, target_modules={lora.target_modules}"
        )
    if section.quantization:
        bits = "4-bit" if section.quantization.get("load_in_4bit") else "8-bit"
        notes.append(f"{bits} (bitsandbytes: {_show(section.quantization)})")
    if section.model_kwargs:
        notes.append(f"model_kwargs: {_show(_redacted(section.model_kwargs))}")
    return [role, what, section.dtype, "; ".join(notes)]


def _redacted(data: Any) -> Any:
    """``data`` with every token replaced (a card is public)."""
    if isinstance(data, dict):
        return {k: "<redacted>" if k in _SECRET_KEYS and v else _redacted(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_redacted(v) for v in data]
    return data


def _last(rows: Sequence[dict[str, Any]], predicate: Any) -> dict[str, Any] | None:
    return next((row for row in reversed(rows) if predicate(row)), None)


_TRAIN_METRICS = (
    "loss",
    "kd_loss",
    "ce_loss",
    "adakd/ratio",
    "adakd/tau_mean",
    "adakd/kept_tokens",
    "adakd/valid_tokens",
    "learning_rate",
)
_NOT_METRICS = ("epoch", "step", "total_flos")


def _results(log_history: Sequence[dict[str, Any]], loss_fn: Any = None) -> list[str]:
    """The Results section: the last logged training step, the run's summary (with the ratio the run ended at), the
    last evaluation."""
    lines = []
    last = _last(log_history, lambda row: "loss" in row)
    if last is not None:
        rows = [(key, _show(last[key])) for key in _TRAIN_METRICS if key in last]
        lines += [f"Last logged training step ({last.get('step', '?')}):", "", table(["metric", "value"], rows), ""]
    summary = _last(log_history, lambda row: "train_loss" in row)
    rows = []
    if summary is not None:
        keys = [k for k in ("train_loss", "train_runtime", "train_samples_per_second") if k in summary]
        rows = [(k, _show(summary[k])) for k in keys]
    if loss_fn is not None and getattr(loss_fn, "controller", None) is not None:
        rows.append(("ratio at the end", _show(float(loss_fn.ratio))))
    if rows:
        lines += ["Whole run:", "", table(["metric", "value"], rows), ""]
    evaluation = _last(log_history, lambda row: any(k.startswith("eval_") for k in row))
    if evaluation is not None:
        rows = [(k, _show(v)) for k, v in evaluation.items() if k.startswith("eval_")]
        lines += [f"Last evaluation (step {evaluation.get('step', '?')}):", "", table(["metric", "value"], rows), ""]
    return lines or ["No metric was logged (set `training.logging_steps`)."]


def _command() -> str:
    """The command line of this process, as the user would type it."""
    argv = list(sys.argv)
    head = Path(argv[0]).name if argv else ""
    if head == "adakd":
        return shlex.join(["adakd", *argv[1:]])
    if head == "__main__.py" and Path(argv[0]).parent.name == "adakd":
        return shlex.join(["python", "-m", "adakd", *argv[1:]])
    return shlex.join(argv)


def _front_matter(student: ModelSection, data: DataSection, adapter: bool) -> dict[str, Any]:
    """The card's YAML front matter: what the Hub indexes (library, base model, tags, datasets, license)."""
    front: dict[str, Any] = {"library_name": "peft" if adapter else "transformers"}
    base = _hub_id(student.name_or_path)
    if base:
        front["base_model"] = base
    front["tags"] = list(TAGS) + (["lora"] if student.lora is not None else [])
    datasets = _dataset_ids(data)
    if datasets:
        front["datasets"] = datasets
    if student.license:
        front["license"] = student.license
    front["pipeline_tag"] = "text-generation"
    return front


def _what(student: ModelSection, teacher: ModelSection | None, kd_ratio: float, adapter: bool) -> str:
    """The card's first words: what ``final/`` holds and how it was made."""
    kind = "A LoRA adapter" if adapter else "A causal language model"
    student_name = _model_name(student) or "a randomly initialised model"
    if teacher is None or kd_ratio == 0:
        return f"{kind} fine-tuned from {student_name} without a teacher (plain SFT)"
    teacher_name = _model_name(teacher) or "a randomly initialised model"
    if teacher.cache is not None:
        teacher_name = _model_name(teacher) or "a teacher"
        teacher_name += " (its top-k distributions, read from an `adakd cache` folder)"
    elif teacher.server is not None:
        teacher_name = _model_name(teacher) or f"`{teacher.server.model}`"
        teacher_name += f" (its top-{teacher.server.top_k} distributions, served by vLLM)"
    return f"{kind} distilled from the teacher {teacher_name} into the student {student_name}"


def _training_rows(args: Any, global_step: int) -> list[tuple[str, Any]]:
    """The training settings the run used, from its ``TrainingArguments``."""
    world = getattr(args, "world_size", 1) or 1
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "float32 (no mixed precision)"
    return [
        ("optimizer steps run", global_step),
        ("max_steps", args.max_steps if args.max_steps > 0 else f"– ({_show(args.num_train_epochs)} epochs)"),
        ("learning_rate", _show(args.learning_rate)),
        ("lr_scheduler_type", getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        ("warmup_steps", _show(args.warmup_steps)),
        ("weight_decay", _show(args.weight_decay)),
        ("optim", getattr(args.optim, "value", args.optim)),
        ("per_device_train_batch_size", args.per_device_train_batch_size),
        ("gradient_accumulation_steps", args.gradient_accumulation_steps),
        ("processes", world),
        ("sequences per optimizer step", batch),
        ("max_grad_norm", _show(args.max_grad_norm)),
        ("precision", precision),
        ("seed", args.seed),
    ]


def _config_yaml(config: DistillConfig) -> str:
    """The run's config as YAML, as loaded, with its tokens redacted (a card is public)."""
    return yaml.safe_dump(
        _redacted({k: v for k, v in dataclasses.asdict(config).items() if k != "origin"}),
        sort_keys=False,
        allow_unicode=True,
        width=120,
    )


def model_card(
    config: DistillConfig,
    *,
    log_history: Sequence[dict[str, Any]],
    args: Any,
    global_step: int,
    loss_fn: Any = None,
    adapter: bool = False,
    command: str | None = None,
) -> str:
    """The model card of a run's ``final/``: YAML front matter (``library_name``, ``base_model``, ``tags``,
    ``datasets``, ``license``, ``pipeline_tag``), then the models, the data, every ``loss`` setting as the run used
    it, the training settings, the final metrics, and how the run was made (adakd version, command, the config with
    tokens redacted).

    Args:
        config: the run's config.
        log_history: the Trainer's ``state.log_history`` (what ``metrics.jsonl`` holds).
        args: the run's ``TrainingArguments``.
        global_step: optimizer steps run.
        loss_fn: the run's :class:`adakd.AdaKDLoss` (for the values LATF ran with), or None.
        adapter: ``final/`` holds a LoRA adapter (``library_name: peft``), not a whole model.
        command: the command line; default: this process's.
    """
    from .._version import __version__

    student, teacher = config.student, config.teacher
    name = config.training.get("hub_model_id") or Path(config.training["output_dir"]).name
    d = config.data
    what = _what(student, teacher, config.loss.kd_ratio, adapter)
    data_rows = [(f"data.{f.name}", _show(getattr(d, f.name))) for f in dataclasses.fields(d)]
    lines = [
        "---",
        yaml.safe_dump(_front_matter(student, d, adapter), sort_keys=False, allow_unicode=True).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"{what} with adakd {__version__}: token-adaptive knowledge distillation (AdaKD), "
        "which trains on the tokens the student finds hardest (Hellinger distance to the teacher, a share set by "
        "the loss), each at its own temperature.",
        "",
        "## Models",
        "",
        table(
            ["role", "model", "dtype", "notes"],
            [_model_row("student", student), _model_row("teacher", teacher, config.loss.kd_ratio > 0)],
        ),
        "",
        "## Data",
        "",
        table(["key", "value"], data_rows),
        "",
        "## AdaKD settings",
        "",
        table(["key", "value"], _loss_rows(config.loss, loss_fn)),
        "",
        "## Training",
        "",
        table(["setting", "value"], _training_rows(args, global_step)),
        "",
        "## Results",
        "",
        *_results(log_history, loss_fn),
        "## How it was made",
        "",
        f"adakd {__version__}, with:",
        "",
        "```bash",
        command if command is not None else _command(),
        "```",
        "",
        "The run's config, as loaded (tokens redacted):",
        "",
        "```yaml",
        _config_yaml(config).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | Path, config: DistillConfig, trainer: Any, command: str | None = None) -> Path:
    """Write :func:`model_card` for ``trainer``'s finished run as ``folder/README.md``, atomically (it replaces
    the card PEFT writes next to an adapter)."""
    folder = Path(folder)
    text = model_card(
        config,
        log_history=trainer.state.log_history,
        args=trainer.args,
        global_step=trainer.state.global_step,
        loss_fn=getattr(trainer, "loss_fn", None),
        adapter=(folder / "adapter_config.json").is_file(),
        command=command,
    )
    return write_text(folder / CARD, text)
