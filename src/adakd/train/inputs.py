"""A run's inputs, resolved once from a validated :class:`DistillConfig`: training arguments, the student tokenizer
(checked against the teacher's), training and eval examples, the ROUGE-L scorer and the models.

:func:`resolve_inputs` is the one function that reads the whole config; each piece takes the section or values it
needs, so that ``adakd cache`` (:mod:`adakd.cache.build`) calls the pieces it uses (arguments, tokenizer, examples)
alone. This module sits below :mod:`.run` and :mod:`adakd.cache`, and imports neither.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, InputError
from ..loss import check_vocab_sizes
from .config import DistillConfig, LossSection, ModelSection
from .examples import eval_dataset, rouge_examples, training_examples
from .hub import trainer_training
from .models import apply_lora, check_quantization_backend, load_model, tokenizer_kwargs, tokenizer_source
from .run_folder import check_output_dir

__all__ = [
    "RunInputs",
    "align_special_tokens",
    "check_tokenizers",
    "load_models",
    "load_tokenizer",
    "optimizer_steps",
    "resolve_inputs",
    "training_arguments",
    "vocab_rows",
]


@dataclass
class RunInputs:
    """What a run needs, checked before any training step (:func:`resolve_inputs`).

    Attributes:
        args: the ``transformers.TrainingArguments`` (the process group set up).
        tokenizer: the student tokenizer (its ``chat_template`` the one the data was rendered with).
        examples: the training examples (a list, a ``datasets.Dataset`` or an :class:`adakd.data.ExampleStream`).
        eval_examples: DistiLLM's held-out validation examples (a list; empty otherwise).
        eval_dataset: the eval set for ``training.eval_strategy``, or None.
        rouge: the ROUGE-L scorer (:class:`~.evaluation.RougeDuringTraining`), or None.
        student: the student model (with its LoRA adapters when configured).
        teacher: the teacher model; None without one, with ``loss.kd_ratio: 0``, ``teacher.cache`` or
            ``teacher.server``.
        cached_teacher: the teacher is read from ``teacher.cache`` (which the caller opens: :mod:`adakd.cache`).
        served_teacher: the teacher is asked of ``teacher.server`` (which the caller checks: the runner).
    """

    args: Any
    tokenizer: Any
    examples: Any
    eval_examples: list[Any]
    eval_dataset: Any
    rouge: Any
    student: Any
    teacher: Any
    cached_teacher: bool
    served_teacher: bool = False


def _log(args: Any, message: str) -> None:
    """Print ``message`` once, on the main process."""
    if args.process_index == 0:
        print(f"[adakd] {message}", flush=True)


def resolve_inputs(config: DistillConfig) -> RunInputs:
    """Everything a run needs but the teacher cache, loss and trainer, in the order a run checks it: training
    arguments, output folder, tokenizer(s), data, eval data, models.

    Raises:
        InputError: (a :class:`ConfigError` for most) anything in the config, its files or its models that the run
            cannot use; the message names the key, file or model.
    """
    from .evaluation import RougeDuringTraining

    teacher = config.teacher
    distils = teacher is not None and config.loss.kd_ratio != 0
    cached = distils and teacher.cache is not None
    served = distils and teacher.server is not None
    args = training_arguments(config.training, origin=config.origin, cached_teacher=cached)
    check_output_dir(args.output_dir)
    tokenizer = load_tokenizer(config.student)
    check_tokenizers(teacher, config.loss, tokenizer)
    name = tokenizer_source(config.student)
    holdout = config.onpolicy.eval_examples if config.onpolicy.mode == "distillm" else None
    examples, eval_examples = training_examples(config.data, args, tokenizer, holdout=holdout, tokenizer_name=name)
    evaluated = eval_dataset(config.data, args, tokenizer, tokenizer_name=name)
    rouge = None
    found = rouge_examples(config.eval, config.data)
    if found is not None:
        eval_set, generation = found
        rouge = RougeDuringTraining.from_sections(
            config.eval, config.data, config.student, eval_set=eval_set, generation=generation, tokenizer=tokenizer
        )
        shown = f"{len(eval_set.records)} examples of {Path(config.eval.rouge_examples)}"
        _log(args, f"ROUGE-L every {config.eval.rouge_every} steps on {shown}")
    teaching = teacher if distils and config.loss.kd_ratio > 0 and not (cached or served) else None
    student, teacher_model = load_models(config.student, teaching, args, tokenizer)
    align_special_tokens(student, tokenizer, args, say=config.student.config is None)
    return RunInputs(
        args=args,
        tokenizer=tokenizer,
        examples=examples,
        eval_examples=eval_examples,
        eval_dataset=evaluated,
        rouge=rouge,
        student=student,
        teacher=teacher_model,
        cached_teacher=cached,
        served_teacher=served,
    )


def training_arguments(training: dict[str, Any], *, origin: str | None = None, cached_teacher: bool = False) -> Any:
    """The ``training`` section as ``transformers.TrainingArguments``, with the process group already set up.

    ``origin``: the config file, for messages. ``cached_teacher``: the run reads its teacher from a cache, whose
    collator needs each example's index: the Trainer must keep the ``example_index`` column
    (``remove_unused_columns: false``).

    Raises:
        ConfigError: a value ``TrainingArguments`` refuses, under the key ``training``.
    """
    from transformers import TrainingArguments

    # Without the hub keys: adakd uploads final/ itself, the Trainer must never push output_dir.
    values = trainer_training(training)
    if cached_teacher:
        values["remove_unused_columns"] = False
    try:
        args = TrainingArguments(**values)
    except (ValueError, TypeError) as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{origin + ': ' if origin else ''}training: {reason}", key="training", reason=reason) from e
    # Set up the process group now: DeepSpeed ZeRO-3 builds the models already partitioned (zero.Init) and must
    # know the world size when they are loaded. On a CPU, accelerate starts torch.distributed (gloo) but not
    # DeepSpeed's own communication layer, which zero.Init reads: attach it to the same group.
    _ = args.device
    if args.deepspeed and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    return args


def load_tokenizer(section: ModelSection) -> Any:
    """The student's tokenizer (``student.tokenizer``, else the student's own files), at ``student.tokenizer_revision``
    (for the student's own files, by default the model's ``model_kwargs.revision``); ``section``: the ``student``.

    Raises:
        ConfigError: it cannot be loaded, or it has no eos token (every response ends with one); the message names
            the key it came from.
    """
    from ..data import tokenizer_for

    key = "student." + ("tokenizer" if section.tokenizer else ("gguf_file" if section.gguf_file else "name_or_path"))
    source = tokenizer_source(section)
    try:
        tokenizer = tokenizer_for(source, **tokenizer_kwargs(section))
    except InputError as e:
        raise ConfigError(f"{key}: {e}") from e
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{key}: the tokenizer {source!r} has no eos token, which ends every response")
    return tokenizer


def check_tokenizers(teacher: ModelSection | None, loss: LossSection, tokenizer: Any) -> None:
    """Teacher and student must share a vocabulary (logit KD compares token ids); ``loss.allow_tokenizer_mismatch``
    skips the check, and so do ``loss.kd_ratio: 0``, a ``teacher.cache`` and a ``teacher.server`` (whose check asks
    the server's own ``/tokenize``: :meth:`adakd.serving.teacher.TeacherServer.check`). The teacher's tokenizer is
    ``teacher.tokenizer``, else its own files when it has any. ``tokenizer``: the student's.

    Raises:
        ConfigError: the teacher's tokenizer named explicitly cannot be loaded, or the vocabularies differ.
    """
    from ..data import tokenizer_for

    if teacher is None or loss.kd_ratio == 0 or loss.allow_tokenizer_mismatch:
        return
    if teacher.cache is not None or teacher.server is not None:  # the cache's manifest, the server's /tokenize
        return
    key = "teacher." + ("tokenizer" if teacher.tokenizer else ("gguf_file" if teacher.gguf_file else "name_or_path"))
    source = tokenizer_source(teacher)
    try:
        other = tokenizer_for(source, **tokenizer_kwargs(teacher))
    except InputError as e:
        if teacher.tokenizer or teacher.gguf_file:  # named explicitly, or stored in the GGUF file: it must load
            raise ConfigError(f"{key}: cannot load the teacher's tokenizer from {source!r} ({e})") from e
        # A teacher folder without tokenizer files: nothing to compare, which the run says rather than hides.
        print(
            f"[adakd] teacher.name_or_path {source}: no tokenizer files, so the teacher's vocabulary is not compared "
            "with the student's (set teacher.tokenizer to compare them)",
            file=sys.stderr,
        )
        return
    a, b = tokenizer.get_vocab(), other.get_vocab()
    if a != b:
        differ = len(set(a.items()) ^ set(b.items()))
        raise ConfigError(
            f"{key}: the teacher's vocabulary ({len(b)} tokens) differs from the student's ({len(a)}; {differ} "
            "entries differ): logit KD needs one tokenizer (set loss.allow_tokenizer_mismatch: true to go on anyway)"
        )


@contextlib.contextmanager
def _seeded_init(args: Any, section: ModelSection) -> Iterator[None]:
    """Build a model from an inline config outside DeepSpeed's zero.Init: zero.Init skips the usual weight
    initialisation and initialises after partitioning, which draws other random numbers, so the same seed would
    give other weights under ZeRO-3 than on one process. Such models are small (tests, demos); ZeRO-3 partitions
    them when its engine starts. Hub and local checkpoints still load partitioned (their weights are read, not
    drawn)."""
    if section.config is None or not args.deepspeed:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(args.hf_deepspeed_config)


def vocab_rows(model: Any) -> int:
    """The lm_head's row count, also for a model built partitioned by DeepSpeed ZeRO-3 (whose weight is empty)."""
    weight = model.get_output_embeddings().weight
    return weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]


def load_models(student: ModelSection, teacher: ModelSection | None, args: Any, tokenizer: Any) -> tuple[Any, Any]:
    """``(student, teacher)`` models of the ``student`` and ``teacher`` sections: the student with its LoRA adapters
    when configured; the teacher, or None when ``teacher`` is None (the caller passes None when the run distils
    nothing from a live teacher: no teacher, ``loss.kd_ratio: 0``, or a ``teacher.cache``).

    Raises:
        ConfigError: a model that cannot be loaded (or quantised on this machine), or vocabularies that do not fit
            the tokenizer and each other.
    """
    # Before any model is loaded: a quantisation this machine cannot run would otherwise stop the run only after
    # the student (or a 70B teacher) was read.
    check_quantization_backend(student, "student", args.device)
    if teacher is not None:
        check_quantization_backend(teacher, "teacher", args.device)
    with _seeded_init(args, student):
        model = load_model(student, "student", device=args.device)
    v_s = vocab_rows(model)
    if len(tokenizer) > v_s:
        raise ConfigError(f"student: its vocabulary ({v_s}) is smaller than the tokenizer's ({len(tokenizer)})")
    teacher_model = None
    if teacher is not None:
        with _seeded_init(args, teacher):
            teacher_model = load_model(teacher, "teacher", device=args.device)
        try:
            check_vocab_sizes(v_s, vocab_rows(teacher_model), len(tokenizer))
        except ValueError as e:
            raise ConfigError(f"teacher: {e}") from e
    model = apply_lora(model, student, gradient_checkpointing=bool(args.gradient_checkpointing))
    if student.lora is not None and args.process_index == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        _log(args, f"LoRA: {trainable:,} trainable of {total:,} parameters")
    return model, teacher_model


def align_special_tokens(student: Any, tokenizer: Any, args: Any, *, say: bool) -> None:
    """Give the student's config and generation config the tokenizer's eos / bos / pad ids, as the Trainer does
    when training starts, but quietly: the Trainer warns on every run ("The tokenizer has new PAD/BOS/EOS tokens
    ..."), although a model built from an inline config has placeholder ids and a pretrained one commonly lacks a pad
    id. With ``say`` (a pretrained student), ids that change get one line saying which; the saved model carries the
    new ids."""
    import logging

    from transformers.trainer_utils import align_special_tokens as align

    text_config = student.config.get_text_config()
    names = ("eos_token_id", "bos_token_id", "pad_token_id")
    before = {name: getattr(text_config, name, None) for name in names}
    log = logging.getLogger("transformers.trainer_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        align(student, tokenizer)
    finally:
        log.setLevel(level)
    after = {name: getattr(text_config, name, None) for name in names}
    changed = [f"{name} {before[name]} → {after[name]}" for name in names if before[name] != after[name]]
    if changed and say:
        _log(args, f"the student's special tokens now follow the tokenizer's: {', '.join(changed)}")


def optimizer_steps(args: Any, num_examples: int) -> int:
    """The run's optimizer steps, counted as ``transformers.Trainer`` counts them (``max_steps``, else
    ceil(epochs × ceil(batches per rank / accumulation)), a fractional epoch count included), so that the LATF
    warm-up and the ratio schedules span exactly the run. A test pins this against the Trainer's own count."""
    if args.max_steps > 0:
        return args.max_steps
    world = max(1, args.world_size)
    per_rank = math.ceil(num_examples / world)  # the distributed sampler pads every rank to the same length
    batches = per_rank // args.per_device_train_batch_size
    if not args.dataloader_drop_last and per_rank % args.per_device_train_batch_size:
        batches += 1
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)
