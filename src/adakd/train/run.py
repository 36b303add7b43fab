"""Building and running a distillation from a DistillConfig: data, models, loss, trainer, final save."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, InputError
from ..loss import check_vocab_sizes
from .config import DistillConfig
from .engines import save_final
from .hub import check_hub, hub_target, push_final, trainer_training, write_model_card
from .models import apply_lora, check_quantization_backend, load_model, tokenizer_kwargs, tokenizer_source
from .onpolicy import OnPolicyController
from .trainer import AdaKDTrainer, save_loss_state

__all__ = [
    "ExampleDataset",
    "build_trainer",
    "check_fresh_run",
    "check_unfinished",
    "delete_earlier_run",
    "check_output_dir",
    "check_tokenizers",
    "evaluation_data",
    "load_models",
    "load_records",
    "load_tokenizer",
    "optimizer_steps",
    "run",
    "teacher_cache",
    "training_arguments",
    "training_examples",
]


class ExampleDataset(torch.utils.data.Dataset):
    """Tokenised examples (``input_ids``, ``labels`` lists) for the Trainer's data loader: a list, or a
    ``datasets.Dataset`` (source ``hf``).

    Given an :class:`adakd.data.ExampleStream` (``data.streaming``), the constructor returns the stream's
    ``datasets.IterableDataset`` itself (as ``pathlib.Path(...)`` returns a ``PosixPath``): a stream cannot be
    indexed, and the Trainer iterates an ``IterableDataset`` as it comes.
    """

    def __new__(cls, examples: Any = None) -> Any:  # pickle (data-loader workers) calls it without arguments
        from ..data import ExampleStream

        if isinstance(examples, ExampleStream):
            return examples.dataset
        return super().__new__(cls)

    def __init__(self, examples: Any) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def load_records(config: DistillConfig, tokenizer: Any = None) -> Any:
    """The configured data source's records: text records (token records for MiniLLM shards), or for source ``hf``
    the dataset's rows (a ``datasets.Dataset``; an ``IterableDataset`` when streaming), which
    :func:`training_examples` tokenises.

    Token shards hold another tokenizer's ids as readily as the student's. Given ``tokenizer`` (the student's), they
    are checked against it before any model loads: ``data.shard_tokenizer`` (the tokenizer that wrote them) must
    give its tokens the same ids (:func:`adakd.data.check_shard_tokenizer`), and every id must be below the
    tokenizer's length (without ``data.shard_tokenizer``, the only check, which the run says).

    Raises:
        ConfigError: a data file that is missing or unreadable, named under ``data.path``.
        InputError: a bad record or shard, named by its file and line or item (see :mod:`adakd.data.readers`), a
            ``datasets`` source that cannot be loaded, or shards written by another tokenizer than ``tokenizer``.
    """
    from .. import data

    d = config.data
    if d.source == "synthetic":
        return data.synthetic_instructions(d.synthetic_size, seed=d.seed)
    if d.source == "hf":
        # data.path before data.name: an eval set's config (data.eval_path) sets path and keeps the name.
        spec, key = (d.path, "data.path") if d.path else (d.name, "data.name")
        return data.load_rows(
            spec, config=d.config, split=d.split, revision=d.revision, streaming=d.streaming, limit=d.limit, label=key
        )
    for path in (d.path + ".idx", d.path + ".bin") if d.source == "shards" else (d.path,):
        _check_readable("data.path", path)
    if d.source == "minillm_jsonl":
        return data.read_minillm_jsonl(d.path, limit=d.limit)
    if d.source == "instructions":
        return data.read_instruction_jsonl(d.path, template=d.template or "minillm", limit=d.limit)
    if tokenizer is None:
        return data.read_token_shards(d.path, limit=d.limit)
    if d.shard_tokenizer is not None:
        data.check_shard_tokenizer(d.shard_tokenizer, tokenizer)
    else:
        print(
            f"[adakd] data.shard_tokenizer is not set: the shards' ids are only checked to be below the student "
            f"tokenizer's {len(tokenizer)} (name the tokenizer that wrote them to check that they mean its tokens)",
            file=sys.stderr,
        )
    return data.read_token_shards(d.path, limit=d.limit, vocab_size=len(tokenizer))


def _check_readable(key: str, path: str) -> None:
    """Open ``path`` once, so that a missing or unreadable data file is reported under its config key (the readers
    name the file alone)."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError as e:
        raise ConfigError(f"{key}: {path}: no such file") from e
    except OSError as e:  # a directory, no permission, an I/O error
        raise ConfigError(f"{key}: {path}: cannot read ({e.strerror or e})") from e


def _log(trainer_args: Any, message: str) -> None:
    """Print ``message`` once, on the main process."""
    if trainer_args.process_index == 0:
        print(f"[adakd] {message}", flush=True)


def check_output_dir(path: str) -> None:
    """Create ``training.output_dir`` and prove it writable with a probe file, before any model is loaded."""
    folder = Path(path)
    probe = folder / f".adakd-probe-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"training.output_dir: {path}: not writable ({e.strerror or e})") from e


def _earlier_run(folder: Path) -> list[str]:
    """What an earlier run left in ``folder``: its checkpoints, final model, metrics and ROUGE-during-training
    results (names, sorted)."""
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.glob("checkpoint-*") if p.is_dir()]
    found += [name for name in ("final", "metrics.jsonl", "rouge") if (folder / name).exists()]
    return sorted(found)


def check_fresh_run(path: str, *, resume: str | bool | None, overwrite: bool) -> list[str]:
    """A run never silently replaces another: an ``output_dir`` that holds checkpoints, a final model or metrics is
    refused unless the run continues it (``resume``) or starts over (``overwrite``).

    Returns:
        What ``overwrite`` is to delete (names in ``path``), empty otherwise. Nothing is deleted here: the run
        deletes them with :func:`delete_earlier_run` only once its config, data and models have loaded, so that a
        refused run leaves the earlier one as it was.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: give one (continue the run, or start it over)")
    found = _earlier_run(Path(path))
    if not found or resume:
        return []
    if not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError(
            f"training.output_dir: {path} already holds a run ({shown}); continue it with --resume, "
            "or start over with --overwrite (which deletes them)"
        )
    return found


def check_unfinished(config: DistillConfig, resume: str | bool) -> str | None:
    """Refuse to resume a run that has finished: its checkpoint is at ``training.max_steps`` (or, for a run counted
    in epochs, at the step count its trainer state recorded) and ``final/`` is there. The Trainer would otherwise
    take one more step and replace ``final/``. Checked before anything loads; a missing or incomplete checkpoint is
    left for the trainer to report.

    Returns:
        The finished checkpoint when ``final/`` is missing (its save failed, e.g. on a full disk): the run then
        writes ``final/`` from it without training. None otherwise (there are steps left).

    Raises:
        ConfigError: naming the checkpoint, its step and the key to raise.
    """
    import json

    from .checkpoints import resolve_checkpoint

    output_dir = config.training["output_dir"]
    try:
        folder = Path(resolve_checkpoint(output_dir, resume, need_state=False))
        state = json.loads((folder / "trainer_state.json").read_text())
        step, recorded = int(state["global_step"]), int(state.get("max_steps") or 0)
    except (InputError, OSError, ValueError, KeyError, TypeError):
        return None
    max_steps = config.training.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        done, limit, key = step >= max_steps, max_steps, "training.max_steps"
    else:
        done, limit, key = recorded > 0 and step >= recorded, recorded, "training.num_train_epochs"
    if done and not (Path(output_dir) / "final").is_dir():
        return str(folder)
    if done:
        raise ConfigError(
            f"--resume: {folder} is at step {step}, the end of the run ({key} gives {limit} steps): nothing to "
            f"train; raise {key} to train on"
        )
    return None


def delete_earlier_run(path: str, names: list[str]) -> None:
    """Delete ``names`` (from :func:`check_fresh_run`) in ``path``, on the main process only (``RANK`` 0)."""
    if not names or int(os.environ.get("RANK", "0")) != 0:
        return
    import shutil

    folder = Path(path)
    for name in names:
        target = folder / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


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


def check_tokenizers(config: DistillConfig, tokenizer: Any) -> None:
    """Teacher and student must share a vocabulary (logit KD compares token ids); ``loss.allow_tokenizer_mismatch``
    skips the check. The teacher's tokenizer is ``teacher.tokenizer``, else its own files when it has any."""
    from ..data import tokenizer_for

    teacher = config.teacher
    if teacher is None or config.loss.kd_ratio == 0 or config.loss.allow_tokenizer_mismatch:
        return
    if teacher.cache is not None:  # the cache's manifest holds the tokenizer it was made with (open_cache checks)
        return
    source = tokenizer_source(teacher)
    try:
        other = tokenizer_for(source, **tokenizer_kwargs(teacher))
    except InputError as e:
        if teacher.tokenizer or teacher.gguf_file:  # named explicitly, or stored in the GGUF file: it must load
            key = "teacher.tokenizer" if teacher.tokenizer else "teacher.gguf_file"
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
        key = (
            "teacher.tokenizer"
            if teacher.tokenizer
            else ("teacher.gguf_file" if teacher.gguf_file else "teacher.name_or_path")
        )
        raise ConfigError(
            f"{key}: the teacher's vocabulary ({len(b)} tokens) differs from the student's ({len(a)}; {differ} "
            "entries differ): logit KD needs one tokenizer (set loss.allow_tokenizer_mismatch: true to go on anyway)"
        )


@contextlib.contextmanager
def _seeded_init(args: Any, section: Any) -> Iterator[None]:
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


def _vocab_rows(model: Any) -> int:
    """The lm_head's row count, also for a model built partitioned by DeepSpeed ZeRO-3 (whose weight is empty)."""
    weight = model.get_output_embeddings().weight
    return weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]


def training_arguments(config: DistillConfig) -> Any:
    """``config.training`` as ``transformers.TrainingArguments``, with the process group already set up.

    Raises:
        ConfigError: a value ``TrainingArguments`` refuses, under the key ``training``.
    """
    from transformers import TrainingArguments

    try:
        # Without the hub keys: adakd uploads final/ itself, the Trainer must never push output_dir.
        args = TrainingArguments(**trainer_training(config.training))
    except (ValueError, TypeError) as e:
        raise config.error("training", str(e).splitlines()[0]) from e
    # Set up the process group now: DeepSpeed ZeRO-3 builds the models already partitioned (zero.Init) and must
    # know the world size when they are loaded. On a CPU, accelerate starts torch.distributed (gloo) but not
    # DeepSpeed's own communication layer, which zero.Init reads: attach it to the same group.
    _ = args.device
    if args.deepspeed and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    return args


def align_special_tokens(config: DistillConfig, student: Any, tokenizer: Any, args: Any) -> None:
    """Give the student's config and generation config the tokenizer's eos / bos / pad ids, as the Trainer does
    when training starts, but quietly: the Trainer warns on every run ("The tokenizer has new PAD/BOS/EOS tokens
    ..."), although a model built from an inline config has placeholder ids and a pretrained one commonly lacks a pad
    id. A pretrained student whose ids change gets one line saying which; the saved model carries the new ids."""
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
    if changed and config.student.config is None:
        _log(args, f"the student's special tokens now follow the tokenizer's: {', '.join(changed)}")


def load_tokenizer(config: DistillConfig) -> Any:
    """The student's tokenizer (``student.tokenizer``, else the student's own files), at ``student.tokenizer_revision``
    (for the student's own files, by default the model's ``model_kwargs.revision``).

    Raises:
        ConfigError: it cannot be loaded, or it has no eos token (every response ends with one); the message names
            the key it came from.
    """
    from ..data import tokenizer_for

    section = config.student
    key = (
        "student.tokenizer"
        if section.tokenizer
        else ("student.gguf_file" if section.gguf_file else "student.name_or_path")
    )
    source = tokenizer_source(section)
    try:
        tokenizer = tokenizer_for(source, **tokenizer_kwargs(section))
    except InputError as e:
        raise ConfigError(f"{key}: {e}") from e
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{key}: the tokenizer {source!r} has no eos token, which ends every response")
    return tokenizer


def training_examples(config: DistillConfig, args: Any, tokenizer: Any) -> tuple[Any, list[Any]]:
    """``(train, held out)`` tokenised examples; DistiLLM holds its validation set (the last
    ``onpolicy.eval_examples``) out of training, other modes hold nothing out.

    ``train`` is a list of examples, or for source ``hf`` a ``datasets.Dataset`` tokenised with ``map`` (cached by
    ``datasets``), or an :class:`adakd.data.ExampleStream` when ``data.streaming``. Conversations are rendered with
    the student tokenizer's chat template, or the one ``data.template`` names, which then becomes the tokenizer's
    ``chat_template``: the tokenizer saved with the model formats conversations as the model was trained on them.

    Raises:
        ConfigError: no example is left after tokenisation, or the held-out set would take them all.
        InputError: a record that fits no format or lacks what its format needs, or a chat format without a chat
            template (see :func:`adakd.data.tokenize_rows`).
    """
    from .. import data

    d = config.data
    if d.source == "hf":
        # Several processes: the main one loads and tokenises first, filling the datasets cache, then the others
        # find the same map (same fingerprint) there instead of tokenising again.
        with args.main_process_first(desc="adakd: data"):
            made = data.tokenize_rows(
                load_records(config),
                tokenizer,
                data_format=d.format,
                template=d.template,
                max_length=d.max_length,
                max_prompt_length=d.max_prompt_length,
                where=f"{d.path or d.name} ({d.split})",
                tokenizer_name=tokenizer_source(config.student),
            )
        if made.chat_template is not None and d.template is not None:
            tokenizer.chat_template = made.chat_template
        _log(args, f"data: format {made.format}" + ("" if d.format else " (detected from the first record)"))
        examples, counts = made.examples, made.counts
        if counts is None:
            _log(args, "data: streamed; examples are tokenised as they are read (the length policy is not counted)")
            per_process = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
            return data.ExampleStream(examples, per_process), []
    else:
        examples, counts = data.build_examples(
            load_records(config, tokenizer), tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length
        )
    _log(args, "data: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if not len(examples):
        raise ConfigError(f"data: no example left after tokenisation ({counts})")
    if config.onpolicy.mode != "distillm":
        return examples, []
    n = config.onpolicy.eval_examples
    if n >= len(examples):
        raise ConfigError(f"onpolicy.eval_examples: {n} leaves no training example (of {len(examples)})")
    _log(args, f"on-policy: {n} examples held out for validation")
    if isinstance(examples, list):
        return examples[:-n], examples[-n:]
    cut = len(examples) - n
    return examples.select(range(cut)), [examples[i] for i in range(cut, len(examples))]


def load_models(config: DistillConfig, args: Any, tokenizer: Any) -> tuple[Any, Any]:
    """``(student, teacher)``: the student with its LoRA adapters when configured; the teacher, or None when the run
    distils nothing (no teacher, or ``loss.kd_ratio: 0``).

    Raises:
        ConfigError: a model that cannot be loaded (or quantised on this machine), or vocabularies that do not fit
            the tokenizer and each other.
    """
    section = config.student
    teaching = config.teacher is not None and config.loss.kd_ratio > 0 and config.teacher.cache is None
    # Before any model is loaded: a quantisation this machine cannot run would otherwise stop the run only after
    # the student (or a 70B teacher) was read.
    check_quantization_backend(section, "student", args.device)
    if teaching:
        check_quantization_backend(config.teacher, "teacher", args.device)
    with _seeded_init(args, section):
        student = load_model(section, "student", device=args.device)
    v_s = _vocab_rows(student)
    if len(tokenizer) > v_s:
        raise ConfigError(f"student: its vocabulary ({v_s}) is smaller than the tokenizer's ({len(tokenizer)})")
    teacher = None
    if teaching:
        with _seeded_init(args, config.teacher):
            teacher = load_model(config.teacher, "teacher", device=args.device)
        try:
            check_vocab_sizes(v_s, _vocab_rows(teacher), len(tokenizer))
        except ValueError as e:
            raise ConfigError(f"teacher: {e}") from e
    student = apply_lora(student, section, gradient_checkpointing=bool(args.gradient_checkpointing))
    if section.lora is not None and args.process_index == 0:
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        total = sum(p.numel() for p in student.parameters())
        _log(args, f"LoRA: {trainable:,} trainable of {total:,} parameters")
    return student, teacher


def _under_key(message: str, key: str) -> str:
    """A data error about the eval set, named under ``key`` (``data.eval_path`` / ``data.eval_split``) instead of
    the training data's ``data.path`` / ``data``, which the shared readers name."""
    for old in ("data.path", "data"):
        if message.startswith(old + ":"):
            return key + message[len(old) :]
    return f"{key}: {message}"


def evaluation_data(config: DistillConfig, args: Any, tokenizer: Any) -> tuple[ExampleDataset | None, Any]:
    """``(eval set, ROUGE-L scorer)`` for evaluation during training (``docs/training-eval.md``); each is None when
    not configured.

    The eval set is read and tokenised exactly as the training data: :func:`training_examples` runs on the config
    with ``data.path``, ``data.split`` and ``data.limit`` replaced by ``data.eval_path`` (else ``data.path``),
    ``data.eval_split`` (else ``data.split``) and ``data.eval_limit``, never streamed, and nothing held out for
    on-policy validation. The ROUGE-L set (``eval.rouge_examples``) is read by ``adakd eval``'s own loader.

    Raises:
        ConfigError: an eval file that is missing, unreadable, malformed or left without an example, named under
            its key.
    """
    import dataclasses

    d = config.data
    eval_dataset = None
    if d.eval_path is not None or d.eval_split is not None:
        key = "data.eval_path" if d.eval_path is not None else "data.eval_split"
        eval_config = copy.copy(config)
        # Never streamed: evaluation passes over the same set every time (data.eval_limit bounds it).
        eval_config.data = dataclasses.replace(
            d, path=d.eval_path or d.path, split=d.eval_split or d.split, limit=d.eval_limit, streaming=False
        )
        eval_config.onpolicy = dataclasses.replace(config.onpolicy, mode="off")
        try:
            examples, _ = training_examples(eval_config, args, tokenizer)
        except InputError as e:
            raise ConfigError(_under_key(str(e), key)) from e
        _log(args, f"eval set: {len(examples)} examples ({key}: {d.eval_path or d.eval_split})")
        eval_dataset = ExampleDataset(examples)
    rouge = None
    ev = config.eval
    if ev.rouge_every > 0:
        import importlib.util

        from ..eval.sets import load_eval_set
        from ..generation import GenerationConfig
        from .evaluation import RougeDuringTraining

        if importlib.util.find_spec("rouge_score") is None:  # at start, not at the first scoring step
            raise ConfigError("eval.rouge_every: ROUGE-L needs the eval extra: pip install 'adakd[eval]'")
        _check_readable("eval.rouge_examples", ev.rouge_examples)
        path = Path(ev.rouge_examples)
        try:
            eval_set = load_eval_set(path.stem, path, limit=ev.rouge_limit)
        except InputError as e:
            raise ConfigError(f"eval.rouge_examples: {e}") from e
        if not eval_set.records:
            raise ConfigError(f"eval.rouge_examples: {path}: no record")
        generation = GenerationConfig(
            max_length=d.max_length if ev.max_length is None else ev.max_length,
            max_prompt_length=d.max_prompt_length if ev.max_prompt_length is None else ev.max_prompt_length,
            greedy=ev.greedy,
            batch_size=ev.batch_size,
        )
        rouge = RougeDuringTraining.from_config(config, eval_set, generation, tokenizer)
        _log(args, f"ROUGE-L every {ev.rouge_every} steps on {len(eval_set.records)} examples of {path}")
    return eval_dataset, rouge


def teacher_cache(config: DistillConfig, args: Any, tokenizer: Any, examples: Any, student_rows: int) -> Any:
    """The run's :class:`adakd.cache.TeacherCache` (``teacher.cache``), checked against this run's tokenizer, data
    and student; None without one. The Trainer then keeps the batches' ``example_index`` column.

    Raises:
        ConfigError: under ``teacher.cache``: a cache that is incomplete, corrupt, or made for other data, another
            tokenizer or another student vocabulary (see :func:`adakd.cache.open_cache`).
    """
    if config.teacher is None or config.teacher.cache is None or config.loss.kd_ratio == 0:
        return None
    from ..cache import open_cache

    cache = open_cache(config.teacher.cache, config=config, tokenizer=tokenizer, examples=examples)
    if cache.vocab_size != student_rows:
        raise ConfigError(
            f"teacher.cache: {config.teacher.cache}: made for a student vocabulary of {cache.vocab_size} rows, this "
            f"student has {student_rows}"
        )
    args.remove_unused_columns = False  # the collator needs each example's index
    made = cache.manifest.get("teacher", {}).get("name_or_path") or "an inline teacher"
    _log(args, f"teacher: read from the cache {config.teacher.cache} (top-{cache.top_k} of {made}); no model loaded")
    return cache


def build_trainer(config: DistillConfig) -> AdaKDTrainer:
    """Everything a run needs, checked before any training step: output folder, tokenizer, data, models,
    vocabularies, loss.

    Raises:
        InputError: (a :class:`ConfigError` for most) anything in the config, its files or its models that the run
            cannot use; the message names the key, file or model.
    """
    from ..data import DistillCollator

    args = training_arguments(config)
    check_output_dir(args.output_dir)
    tokenizer = load_tokenizer(config)
    check_tokenizers(config, tokenizer)
    examples, eval_examples = training_examples(config, args, tokenizer)
    eval_dataset, rouge = evaluation_data(config, args, tokenizer)
    student, teacher = load_models(config, args, tokenizer)
    align_special_tokens(config, student, tokenizer, args)
    cache = teacher_cache(config, args, tokenizer, examples, _vocab_rows(student))
    loss_fn = config.build_loss(total_steps=optimizer_steps(args, len(examples)), vocab_size=len(tokenizer))
    onpolicy = None
    if config.onpolicy.mode != "off":
        onpolicy = OnPolicyController(
            config.onpolicy,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            vocab_size=len(tokenizer),
            max_length=config.data.max_length,
            eval_examples=eval_examples,
        )
    collator = DistillCollator(tokenizer.pad_token_id)
    train_dataset = ExampleDataset(examples)
    if cache is not None:
        from ..cache import CachedTeacherCollator, IndexedExamples

        collator, train_dataset = CachedTeacherCollator(collator, cache), IndexedExamples(examples)
    return AdaKDTrainer(
        student,
        teacher,
        loss_fn=loss_fn,
        kd_ratio=config.loss.kd_ratio,
        fused=config.loss.fused,
        chunk_size=config.loss.chunk_size,
        onpolicy=onpolicy,
        nonfinite=config.loss.nonfinite,
        rouge=rouge,
        teacher_cache=cache is not None,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )


def check_resume(config: DistillConfig, resume: str | bool, accept_changes: bool) -> None:
    """Before anything loads: the checkpoint to resume from reads back whole, and was trained with the settings of
    ``config`` (:func:`~.checkpoints.check_resume_settings`; ``accept_changes`` lets them differ, saying which)."""
    from .checkpoints import check_checkpoint_files, check_resume_settings, resolve_checkpoint, run_settings

    folder = resolve_checkpoint(config.training["output_dir"], resume, need_state=False)
    check_checkpoint_files(folder)
    changed = check_resume_settings(folder, run_settings(config), accept_changes)
    if changed and int(os.environ.get("RANK", "0")) == 0:
        print(f"[adakd] --accept-changes: resuming {folder} with {'; '.join(changed)}", file=sys.stderr, flush=True)


def run(
    config: DistillConfig, resume: str | bool | None = None, overwrite: bool = False, accept_changes: bool = False
) -> dict[str, Any]:
    """Train, then save the final model (or LoRA adapter), the tokenizer, the loss state and a model card
    (``README.md``, :mod:`.hub`) in ``output_dir/final``; with ``training.push_to_hub``, upload ``final/`` (and
    nothing else) from the main process.

    An ``output_dir`` that already holds a run is refused unless ``resume`` continues it or ``overwrite`` starts
    over (:func:`check_fresh_run`). ``accept_changes``: resume although the checkpoint was trained with other
    settings (:func:`check_resume`)."""
    target = hub_target(config)  # before anything runs: a hub_strategy adakd cannot honour is refused
    earlier = check_fresh_run(config.training["output_dir"], resume=resume, overwrite=overwrite)
    finished = check_unfinished(config, resume) if resume else None
    if resume:
        check_resume(config, resume, accept_changes)
    if target is not None:
        check_hub(config, target)  # token, repo id, namespace and network: before any step, not after the last
    # The Trainer gets no hub key: it would push output_dir (checkpoints, optimizer state) and save the token.
    trainer_config = copy.copy(config)
    trainer_config.training = trainer_training(config.training)
    trainer = build_trainer(trainer_config)
    from .checkpoints import run_settings

    trainer.run_settings = run_settings(config)
    # --overwrite deletes the earlier run only now: a run refused while its data or models load leaves it intact.
    delete_earlier_run(config.training["output_dir"], earlier)
    trainer.accelerator.wait_for_everyone()
    if finished is None:
        result = trainer.train(resume_from_checkpoint=resume)
        train_loss = result.training_loss
    else:  # the run ended but final/ was not written (a full disk): write it from the last checkpoint
        train_loss = restore_finished(trainer, finished)
    final = Path(trainer.args.output_dir) / "final"
    write_final(trainer, config, final)
    summary = {
        "global_step": trainer.state.global_step,
        "train_loss": train_loss,
        "ratio": trainer.loss_fn.ratio,
        "final": str(final),
        "rank": trainer.args.process_index,
    }
    if trainer.is_world_process_zero() and target is not None:
        summary["hub_repo"] = push_final(final, target)
        _log(trainer.args, f"uploaded {final} to {summary['hub_repo']}")
    return summary


def restore_finished(trainer: AdaKDTrainer, checkpoint: str) -> float | None:
    """Load the model, trainer state and loss state of the finished run's last ``checkpoint`` into ``trainer``
    without training (single process or DDP, where a checkpoint holds the whole model); returns the run's recorded
    training loss.

    Raises:
        ConfigError: under FSDP2 or ZeRO-3, whose checkpoints are loaded only inside the Trainer's loop.
    """
    from transformers import TrainerState

    from .checkpoints import load_loss_state
    from .engines import engine_of

    engine = engine_of(trainer.accelerator)
    if engine not in ("single", "ddp"):
        raise ConfigError(
            f"--resume: {checkpoint} ends the run but final/ is missing; writing it from a checkpoint is supported "
            f"on one process or DDP, not {engine}: run the same command there with --resume"
        )
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    load_loss_state(trainer.loss_fn, checkpoint)
    _log(trainer.args, f"{checkpoint} ends the run: writing final/ from it (no training)")
    losses = [row["train_loss"] for row in trainer.state.log_history if "train_loss" in row]
    return losses[-1] if losses else None


def write_final(trainer: AdaKDTrainer, config: DistillConfig, final: Path) -> None:
    """Save the final model (or LoRA adapter), the tokenizer, the loss state and the model card into a staging
    folder, then publish it as ``final`` in one rename: a crash or a full disk never leaves a half-written
    ``final/``, and an earlier one stays until the new one is complete.

    Raises:
        StorageError: the file system refused the write (no space, quota, read-only); nothing was published.
    """
    import shutil

    from ..errors import StorageError
    from ..files import publish_folder, storage_reason
    from .checkpoints import STAGING_DIR, complete_checkpoints

    staged = final.parent / STAGING_DIR / final.name
    if trainer.args.should_save:
        shutil.rmtree(staged, ignore_errors=True)  # left by a killed save
    trainer.accelerator.wait_for_everyone()
    try:
        # the adapter only, for a PEFT student; gathered from the shards under FSDP2 / ZeRO-3
        save_final(trainer, staged)
        if trainer.is_world_process_zero():
            save_loss_state(trainer.loss_fn, staged)
            write_model_card(staged, config, trainer)
            publish_folder(staged, final)
            shutil.rmtree(staged.parent, ignore_errors=True)
    except Exception as e:
        reason = storage_reason(e, staged)
        if reason is None:
            raise
        shutil.rmtree(staged, ignore_errors=True)  # gives back the space the partial model took
        found = complete_checkpoints(final.parent)
        kept = f"the last complete checkpoint is {found[0]}" if found else "no checkpoint was saved"
        raise StorageError(
            f"{final}: {reason} while writing the final model; nothing was published there ({kept}): free space, "
            "then rerun the same command with --resume"
        ) from e
    trainer.accelerator.wait_for_everyone()
