"""Running a distillation from a DistillConfig: the run's inputs (:mod:`.inputs`), its teacher cache
(:mod:`adakd.cache`) or server (:mod:`.server_teacher`), loss and trainer, the output folder's rules
(:mod:`.run_folder`), the final save and the hub upload (:mod:`.hub`). This module composes them and sits above all
of them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .checkpoints import run_settings
from .config import DistillConfig
from .engines import save_final
from .examples import ExampleDataset
from .hub import check_hub, hub_target, push_final, trainer_training, write_model_card
from .inputs import RunInputs, optimizer_steps, resolve_inputs, vocab_rows
from .onpolicy import OnPolicyController
from .run_folder import check_fresh_run, check_resume, check_unfinished, delete_earlier_run
from .server_teacher import serve_teacher
from .teacher import CachedTeacher
from .trainer import AdaKDTrainer, save_loss_state

__all__ = ["build_trainer", "restore_finished", "run", "teacher_cache", "write_final"]


def _log(trainer_args: Any, message: str) -> None:
    """Print ``message`` once, on the main process."""
    if trainer_args.process_index == 0:
        print(f"[adakd] {message}", flush=True)


def teacher_cache(config: DistillConfig, inputs: RunInputs) -> Any:
    """The run's :class:`adakd.cache.TeacherCache` (``teacher.cache``), checked against the run's tokenizer, data
    and student (``inputs``); None when the run reads no cache (``inputs.cached_teacher``). The training arguments
    already keep the batches' ``example_index`` column (:func:`~.inputs.training_arguments`).

    Raises:
        ConfigError: under ``teacher.cache``: a cache that is incomplete, corrupt, or made for other data, another
            tokenizer or another student vocabulary (see :func:`adakd.cache.open_cache`).
    """
    if not inputs.cached_teacher:
        return None
    from ..cache import open_cache

    path = config.teacher.cache
    cache = open_cache(
        path,
        student=config.student,
        data=config.data,
        onpolicy_mode=config.onpolicy.mode,
        tokenizer=inputs.tokenizer,
        examples=inputs.examples,
    )
    rows = vocab_rows(inputs.student)
    if cache.vocab_size != rows:
        raise ConfigError(
            f"teacher.cache: {path}: made for a student vocabulary of {cache.vocab_size} rows, this student has {rows}"
        )
    made = cache.manifest.get("teacher", {}).get("name_or_path") or "an inline teacher"
    _log(inputs.args, f"teacher: read from the cache {path} (top-{cache.top_k} of {made}); no model loaded")
    return cache


def build_trainer(config: DistillConfig) -> AdaKDTrainer:
    """Everything a run needs, checked before any training step: output folder, tokenizer, data, models,
    vocabularies (:func:`~.inputs.resolve_inputs`), the teacher cache or server, loss.

    Raises:
        InputError: (a :class:`ConfigError` for most) anything in the config, its files or its models that the run
            cannot use; the message names the key, file or model.
    """
    from ..data import DistillCollator

    inputs = resolve_inputs(config)
    tokenizer, examples = inputs.tokenizer, inputs.examples
    cache = teacher_cache(config, inputs)
    teacher = CachedTeacher() if cache is not None else inputs.teacher
    if inputs.served_teacher:  # checked here, before the first step, by every rank (each asks for its own rows)
        rows, max_length = vocab_rows(inputs.student), config.data.max_length
        teacher, line = serve_teacher(config.teacher.server, tokenizer, rows, max_length)
        _log(inputs.args, line)
    loss_fn = config.build_loss(total_steps=optimizer_steps(inputs.args, len(examples)), vocab_size=len(tokenizer))
    onpolicy = None
    if config.onpolicy.mode != "off":
        onpolicy = OnPolicyController(
            config.onpolicy,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            vocab_size=len(tokenizer),
            max_length=config.data.max_length,
            eval_examples=inputs.eval_examples,
        )
    collator = DistillCollator(tokenizer.pad_token_id)
    train_dataset = ExampleDataset(examples)
    if cache is not None:
        from ..cache import CachedTeacherCollator, IndexedExamples

        collator, train_dataset = CachedTeacherCollator(collator, cache), IndexedExamples(examples)
    return AdaKDTrainer(
        inputs.student,
        teacher,
        loss_fn=loss_fn,
        kd_ratio=config.loss.kd_ratio,
        fused=config.loss.fused,
        chunk_size=config.loss.chunk_size,
        onpolicy=onpolicy,
        nonfinite=config.loss.nonfinite,
        rouge=inputs.rouge,
        args=inputs.args,
        train_dataset=train_dataset,
        eval_dataset=inputs.eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )


def run(
    config: DistillConfig, resume: str | bool | None = None, overwrite: bool = False, accept_changes: bool = False
) -> dict[str, Any]:
    """Train, then save the final model (or LoRA adapter), the tokenizer, the loss state and a model card
    (``README.md``, :mod:`.hub`) in ``output_dir/final``; with ``training.push_to_hub``, upload ``final/`` (and
    nothing else) from the main process.

    An ``output_dir`` that already holds a run is refused unless ``resume`` continues it or ``overwrite`` starts
    over (:func:`check_fresh_run`). ``accept_changes``: resume although the checkpoint was trained with other
    settings (:func:`check_resume`)."""
    # Before anything runs: a hub_strategy adakd cannot honour is refused.
    target = hub_target(config.training, config.error)
    earlier = check_fresh_run(config.training["output_dir"], resume=resume, overwrite=overwrite)
    finished = check_unfinished(config.training, resume) if resume else None
    if resume:
        check_resume(config.training["output_dir"], resume, run_settings(config), accept_changes)
    if target is not None:
        # Token, repo id, namespace and network: before any step, not after the last.
        check_hub(config.training, target, config.error)
    # The Trainer gets no hub key: it would push output_dir (checkpoints, optimizer state) and save the token.
    trainer_config = copy.copy(config)
    trainer_config.training = trainer_training(config.training)
    trainer = build_trainer(trainer_config)
    trainer.run_settings = run_settings(config)
    # --overwrite deletes the earlier run only now: a run refused while its data or models load leaves it intact.
    delete_earlier_run(config.training["output_dir"], earlier)
    trainer.accelerator.wait_for_everyone()
    if finished is None:
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        finally:
            if trainer.onpolicy is not None:
                trainer.onpolicy.close()  # a vLLM generator's engine, before the process group goes
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
