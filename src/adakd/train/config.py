"""DistillConfig: the typed run configuration, loaded from YAML with dotted ``key=value`` overrides.

Every field is checked when the config is built (its type by :mod:`.typed_yaml`, its value by its section's own
``check`` (:mod:`.config_sections`, where the sections live) and the rules between sections by
:meth:`DistillConfig.validate`), and every error names the file and the dotted key
(``configs/run.yaml: loss.selection: unknown selection 'topk'; valid: latf, fixed, linear, cosine, all``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, OptionError
from .config_sections import (
    DATA_SOURCES,
    DEFAULT_LATF_WARMUP,
    DTYPES,
    LATF_KEYS,
    NONFINITE_POLICIES,
    ONPOLICY_MODES,
    REPLAY_RATIOS,
    DataSection,
    ErrorFactory,
    EvalSection,
    LoraSection,
    LossSection,
    ModelSection,
    OnPolicySection,
    ServerSection,
)
from .typed_yaml import build, parse_yaml

__all__ = [
    "DATA_SOURCES",
    "DEFAULT_LATF_WARMUP",
    "DTYPES",
    "LATF_KEYS",
    "NONFINITE_POLICIES",
    "ONPOLICY_MODES",
    "REPLAY_RATIOS",
    "ConfigError",
    "DataSection",
    "DistillConfig",
    "EvalSection",
    "LoraSection",
    "LossSection",
    "ModelSection",
    "OnPolicySection",
    "ServerSection",
    "apply_overrides",
    "check_training",
    "load_config",
]

# transformers 5.23 renamed these TrainingArguments fields (the old names stay as deprecated aliases until v6): a
# config written with the new names runs on the earlier 5.x releases too.
_RENAMED_TRAINING_FIELDS = {
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}


@dataclass
class DistillConfig:
    """A whole distillation run. ``training`` is passed to ``transformers.TrainingArguments``."""

    student: ModelSection
    teacher: ModelSection | None = None
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    onpolicy: OnPolicySection = field(default_factory=OnPolicySection)
    eval: EvalSection = field(default_factory=EvalSection)
    training: dict[str, Any] = field(default_factory=dict)
    origin: str | None = field(default=None, init=False, repr=False)  # the YAML file it came from, for messages

    def error(self, key: str, message: str) -> ConfigError:
        """A :class:`ConfigError` naming the file (when known) and ``key``; the caller raises it."""
        return ConfigError(f"{self.origin + ': ' if self.origin else ''}{key}: {message}", key=key, reason=message)

    def validate(self) -> DistillConfig:
        """Check every section (its own keys: the sections' ``check`` methods), then the rules that tie sections
        together; raises ConfigError naming the key. The order is fixed: it decides which error is reported first."""
        error = self.error
        for role, model in (("student", self.student), ("teacher", self.teacher)):
            if model is not None:
                model.check(role, error)
        if self.teacher is not None and self.teacher.lora is not None:
            raise error("teacher.lora", "the teacher is frozen; LoRA applies to the student only")
        if self.student.lora is not None:
            self.student.lora.check(error)
        self.data.resolve(error)
        self._validate_streaming()
        self.data.check_sizes(error)
        self.loss.check_mix(error)
        if self.teacher is None and self.loss.kd_ratio > 0:
            raise error("teacher", "no teacher: set loss.kd_ratio: 0 for plain SFT, or give a teacher")
        self.loss.check(error)
        self.onpolicy.check(error, distils=self.teacher is not None and self.loss.kd_ratio != 0)
        self._validate_eval()
        self._validate_cache()
        # The loss's own constructor is the one place its values are checked (ranges, choices, combinations);
        # building it is cheap and side-effect free, and its OptionError names the key.
        try:
            self.build_loss(total_steps=1)
        except OptionError as e:
            raise error(f"loss.{e.option}", e.reason) from e
        check_training(self.training, error)
        return self

    def _validate_streaming(self) -> None:
        """``data.streaming`` against ``training.max_steps`` and ``onpolicy.mode``."""
        if not self.data.streaming:
            return
        max_steps = self.training.get("max_steps", -1)
        if not isinstance(max_steps, int) or max_steps <= 0:
            raise self.error(
                "training.max_steps", "data.streaming needs it (> 0): a stream has no length to count epochs in"
            )
        if self.onpolicy.mode == "distillm":
            raise self.error(
                "data.streaming", "not with onpolicy.mode distillm, which holds out the data's last examples"
            )

    def _validate_eval(self) -> None:
        """``data.eval_*``, the ``eval`` section, and how they meet ``training.eval_strategy``.

        Asking for evaluation with nothing to evaluate is an error (an eval strategy, or ``eval_on_start``, without
        an eval set; ``eval.rouge_every`` without ``eval.rouge_examples``). Giving something to evaluate without a
        schedule is a warning: a base config may keep its eval set while an override turns evaluation off.
        """
        d, ev = self.data, self.eval
        if d.eval_path:
            d.eval_path = _expand(self.error, "data.eval_path", d.eval_path)
        if ev.rouge_examples:
            ev.rouge_examples = _expand(self.error, "eval.rouge_examples", ev.rouge_examples)
        if d.eval_split is not None and d.source != "hf":
            raise self.error("data.eval_split", f"source {d.source!r} has no splits (only 'hf'): give data.eval_path")
        if d.eval_path is not None and d.source == "synthetic":
            raise self.error(
                "data.eval_path", "source 'synthetic' reads no file; give the training data as a file source too"
            )
        if d.eval_limit is not None and d.eval_limit < 1:
            raise self.error("data.eval_limit", f"must be >= 1, got {d.eval_limit}")
        has_eval_set = d.eval_path is not None or d.eval_split is not None
        strategy = self.training.get("eval_strategy", "no")
        strategy = str(getattr(strategy, "value", strategy)).lower()  # a Python caller may pass the enum
        if not has_eval_set and (strategy != "no" or self.training.get("eval_on_start")):
            key = "training.eval_strategy" if strategy != "no" else "training.eval_on_start"
            raise self.error(key, "needs an eval set: give data.eval_path (or data.eval_split for source 'hf')")
        if has_eval_set and strategy == "no" and not self.training.get("eval_on_start"):
            warnings.warn(
                f"{self.origin + ': ' if self.origin else ''}data.eval_{'path' if d.eval_path else 'split'} is set "
                "but training.eval_strategy is 'no': the eval set is never evaluated during training (set "
                "training.eval_strategy: steps and training.eval_steps)",
                UserWarning,
                stacklevel=3,
            )
        if ev.rouge_examples and ev.rouge_every == 0:
            warnings.warn(
                f"{self.origin + ': ' if self.origin else ''}eval.rouge_examples is set but eval.rouge_every is 0: "
                "no ROUGE-L is computed during training",
                UserWarning,
                stacklevel=3,
            )
        ev.check(self.error)  # after the warning, which needs rouge_every 0: none of its errors then
        length = d.max_length if ev.max_length is None else ev.max_length
        prompt = d.max_prompt_length if ev.max_prompt_length is None else ev.max_prompt_length
        if not 0 < prompt < length:
            raise self.error("eval.max_prompt_length", f"need 0 < it < max_length, got {prompt} and {length}")

    def _validate_cache(self) -> None:
        """``teacher.cache`` and ``teacher.server``: what a teacher read from disk (docs/cache.md) or asked of a server
        (docs/serving.md) cannot do."""
        if self.teacher is None or (self.teacher.cache is None and self.teacher.server is None):
            return
        if self.teacher.cache is not None and self.teacher.server is not None:
            raise self.error("teacher.server", "give one of teacher.cache and teacher.server, not both")
        if self.teacher.server is not None:
            refused = (
                (self.loss.kd_ratio == 0, "loss.kd_ratio is 0: nothing would ask the server"),
                (
                    self.onpolicy.mode != "off",
                    f"replaces the teacher model, and cannot serve on-policy generation (onpolicy.mode "
                    f"{self.onpolicy.mode!r}): set onpolicy.mode: off, or give teacher.name_or_path instead",
                ),
            )
            for refuse, message in refused:
                if refuse:
                    raise self.error("teacher.server", message)
            return  # unlike a cache, a server answers any batch: eval sets and data.streaming work
        refusals = (
            (self.loss.kd_ratio == 0, "loss.kd_ratio is 0: nothing would read the cache"),
            (
                self.onpolicy.mode != "off",
                f"onpolicy.mode {self.onpolicy.mode!r} trains on newly generated sequences, which need a live "
                "teacher: remove teacher.cache (and give teacher.name_or_path) or set onpolicy.mode: off",
            ),
            (
                self.data.streaming,
                "data.streaming: a cache is read by example index, which a stream does not have",
            ),
            (
                self.data.eval_path is not None or self.data.eval_split is not None,
                "evaluation during training (data.eval_path / data.eval_split) needs the teacher on the eval set, "
                "which the cache does not hold: leave the eval set out, or train with a live teacher",
            ),
        )
        for refused, message in refusals:
            if refused:
                raise self.error("teacher.cache", message)

    def build_loss(self, total_steps: int, vocab_size: int | None = None) -> Any:
        """The run's :class:`adakd.AdaKDLoss` (``reduction="sum"``: the trainer normalises over the window)."""
        from ..loss import AdaKDLoss

        loss = self.loss
        latf = {key: getattr(loss, key) for key in LATF_KEYS if getattr(loss, key) is not None}
        kwargs: dict[str, Any] = {}
        if loss.selection == "latf":
            ratio = latf.pop("warmup_ratio", DEFAULT_LATF_WARMUP)
            if "warmup_steps" not in latf:
                latf["warmup_steps"] = math.floor(ratio * total_steps)
            kwargs = latf
        elif loss.selection in ("linear", "cosine"):
            # LATF's keys are LATF's alone and unambiguous: a file may keep them while an override switches the
            # selection (``loss.selection=fixed``), so they are not used here rather than refused. ``ratio`` is
            # different: it reads like a starting ratio, so LATF refuses it.
            kwargs["total_steps"] = max(1, total_steps)
        return AdaKDLoss(
            loss.base,
            base_params=loss.base_params,
            indicator=loss.indicator,
            selection=loss.selection,
            ratio=loss.ratio,
            temperature=loss.temperature,
            c=loss.c,
            tau_base=loss.tau_base,
            vocab_size=vocab_size,
            reduction="sum",
            impl=loss.impl,
            one_pass=loss.one_pass,
            tau_weight=loss.tau_weight,
            detach_tau=loss.detach_tau,
            **kwargs,
        )


def check_training(training: dict[str, Any], error: ErrorFactory) -> None:
    """The ``training`` mapping: ``output_dir`` is given, every key is a ``transformers.TrainingArguments`` field (the
    fields transformers renamed are moved to the name the installed release knows, in place), and the optimizer's
    values are numbers torch accepts."""
    if not training.get("output_dir"):
        raise error("training.output_dir", "is required")
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    for new, old in _RENAMED_TRAINING_FIELDS.items():
        if new in training and new not in known and old in known:
            training[old] = training.pop(new)
    for key in training:
        if key not in known:
            raise error(f"training.{key}", "unknown transformers.TrainingArguments field")
    # Values torch's optimizers refuse only once the models have loaded (with a traceback): refused here.
    for key in ("learning_rate", "weight_decay"):
        value = training.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise error(f"training.{key}", f"must be a number >= 0, got {value!r}")


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``dotted`` ``"a.b.c"``, creating missing sections."""
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section", key=dotted, reason=f"{part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to the mapping ``data`` in place, and return it (values parsed as YAML:
    ``3`` is an int, ``null`` is None).

    Raises:
        ConfigError: an override that is not ``key.sub=value``, a value that is not YAML, or a key whose parent is
            not a section.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = parse_yaml(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: {e.__class__.__name__}: {str(e).splitlines()[0]}") from None
        _set_dotted(data, key, value)
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, data: dict[str, Any] | None = None
) -> DistillConfig:
    """Load and validate a :class:`DistillConfig` from a YAML file (or a dict), then ``overrides``.

    ``$VAR`` / ``${VAR}`` in model, tokenizer, data and output paths come from the environment.

    Raises:
        ConfigError: unreadable file, bad YAML (with its line), unknown key, wrong type or invalid value; the
            message names the file and the dotted key.
    """
    source = str(path) if path is not None else None
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
        try:
            data = parse_yaml(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data or {}, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    data = dict(data or {})
    apply_overrides(data, list(overrides or []))
    try:
        config = build(DistillConfig, data)
    except ConfigError as e:
        message = f"{source}: {e}" if source else str(e)  # the file prefixed; key and reason carried as they are
        raise ConfigError(message, key=e.key, reason=e.reason) from None
    config.origin = source
    _expand_paths(config)
    return config.validate()


_VARIABLE = re.compile(r"\$(\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*)")


def _expand(error: ErrorFactory, key: str, value: str) -> str:
    """``value`` with ``$VAR`` / ``${VAR}`` from the environment; an unset variable is an error naming it (left
    literal, it would become a folder named ``${VAR}``)."""
    for match in _VARIABLE.finditer(value):
        name = match.group(1).strip("{}")
        if name not in os.environ:
            raise error(key, f"${name} is not set (in {value!r}); export it, or write the path out")
    return os.path.expandvars(value)


def _expand_paths(config: DistillConfig) -> None:
    """``$VAR`` / ``${VAR}`` in paths (e.g. ``${ADAKD_DATA}/dolly``) come from the environment."""
    for section, model in (("student", config.student), ("teacher", config.teacher)):
        if model is not None:
            for name in ("name_or_path", "tokenizer", "adapter", "cache"):
                value = getattr(model, name)
                if value:
                    setattr(model, name, _expand(config.error, f"{section}.{name}", value))
    for name in ("path", "name", "template", "eval_path", "shard_tokenizer"):
        value = getattr(config.data, name, None)
        if value:
            setattr(config.data, name, _expand(config.error, f"data.{name}", value))
    if config.training.get("output_dir"):
        config.training["output_dir"] = _expand(config.error, "training.output_dir", str(config.training["output_dir"]))
