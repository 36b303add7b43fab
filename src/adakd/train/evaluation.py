"""Evaluation during training: the eval set's token-weighted CE, KD and Hellinger, and ROUGE-L of sampled answers.

The eval-set metrics (``docs/training-eval.md``), over the N valid tokens of the WHOLE eval set (label != -100
after the shift; position i predicts label i + 1), q the student's and p the teacher's distribution at τ = 1:

- ``eval_ce_loss``   = Σ_t −log q_t(y_t) / N (the student's own CE, over its full lm_head as in training);
- ``eval_kd_loss``   = Σ_t D(p_t, q_t) / N, D the run's base divergence with its parameters, over ALL valid tokens:
  no LATF selection, no IDTS temperatures, no τ² factor (1 at τ = 1), so runs that select differently compare;
- ``eval_hellinger`` = Σ_t H(p_t, q_t) / N, the mean difficulty score of Eq. 3 (the Hellinger distance);
- ``eval_loss``      = (1 − kd_ratio)·eval_ce_loss + kd_ratio·eval_kd_loss (CE alone without a teacher);
- ``eval_tokens``    = N.

Each batch gives per-sequence sums ``[B, 4]`` (tokens, Σ CE, Σ KD, Σ H), computed in float64; the trainer gathers them
across ranks and adds them up, and the means are taken once at the end (sum over the set / total tokens, never a
mean of batch means), so they do not depend on the eval batch size or the number of processes.

ROUGE-L (``eval_rouge_l``): :class:`RougeDuringTraining` runs ``adakd eval``'s own code on the student in memory
(:class:`adakd.generation.HFBackend` and :func:`adakd.eval.run.evaluate`), so the value equals ``adakd eval`` on the
checkpoint saved at that step, with the same seed and settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..fused import evaluation_sums, evaluation_sums_hidden
from .engines import unwrap
from .step import head_call, student_head

__all__ = [
    "SUM_COLUMNS",
    "EvaluationMixin",
    "RougeDuringTraining",
    "eval_metrics",
]

SUM_COLUMNS = ("tokens", "ce", "kd", "hellinger")  # the columns of the per-sequence sums


def eval_metrics(totals: Sequence[float], kd_ratio: float, with_teacher: bool, prefix: str = "eval") -> dict[str, Any]:
    """The logged means from the whole eval set's totals.

    Args:
        totals: the four sums of :data:`SUM_COLUMNS`, over every sequence of the set (and every rank).
        kd_ratio: the run's mix; ``{prefix}_loss`` = (1 − kd_ratio)·CE + kd_ratio·KD.
        with_teacher: False for plain SFT: CE only (and ``{prefix}_loss`` = CE).
        prefix: the Trainer's ``metric_key_prefix``.

    Returns:
        ``{prefix}_ce_loss``, ``{prefix}_kd_loss``, ``{prefix}_hellinger``, ``{prefix}_loss``, ``{prefix}_tokens``;
        NaN means for a set without a valid token.
    """
    tokens, ce, kd, hellinger = (float(x) for x in totals)
    mean = (lambda s: s / tokens) if tokens > 0 else (lambda s: math.nan)
    out = {f"{prefix}_ce_loss": mean(ce)}
    if with_teacher:
        out[f"{prefix}_kd_loss"] = mean(kd)
        out[f"{prefix}_hellinger"] = mean(hellinger)
        out[f"{prefix}_loss"] = (1 - kd_ratio) * mean(ce) + kd_ratio * mean(kd)
    else:
        out[f"{prefix}_loss"] = mean(ce)
    out[f"{prefix}_tokens"] = int(tokens)
    return out


def _rng_devices(device: torch.device) -> list[int]:
    """The CUDA device whose RNG ``torch.random.fork_rng`` must save and restore besides the CPU's."""
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


@dataclass
class RougeDuringTraining:
    """ROUGE-L on a small set every ``every`` optimizer steps, with ``adakd eval``'s code.

    Args:
        every: optimizer steps between two scorings (> 0).
        eval_set: the prompts and references (:func:`adakd.eval.sets.load_eval_set`).
        generation: the decoding settings, as ``adakd eval``'s flags give them.
        seed: the sampling seed (one, as ``adakd eval --seeds SEED``).
        chat_template: None: the records' raw prompts; else each record as one user turn of this template, as
            ``adakd eval --chat-template`` (:class:`adakd.eval.sets.ChatTemplate`; :meth:`from_config` resolves it).
    """

    every: int
    eval_set: Any  # adakd.eval.sets.EvalSet
    generation: Any  # adakd.generation.GenerationConfig
    seed: int
    chat_template: Any = None  # adakd.eval.sets.ChatTemplate | None

    @classmethod
    def from_sections(
        cls,
        eval_section: Any,
        data_section: Any,
        student_section: Any,
        *,
        eval_set: Any,
        generation: Any,
        tokenizer: Any,
    ) -> RougeDuringTraining:
        """The scorer a run's ``eval`` section asks for: ``eval.rouge_every``, ``eval.seed`` and
        ``eval.chat_template`` (the ``data`` section's template and the ``student`` section's name serve the last).

        With ``eval.chat_template: true`` the template is the one the training data was rendered with when that is a
        chat template (``data.template``: ``qwen2`` or a Jinja file), else the student tokenizer's own; every record
        must be one user turn (an ``instruction``, or a ``prompt`` in the MiniLLM/Alpaca template).

        Raises:
            ConfigError: a tokenizer without a chat template, a template file that cannot be read, or a record that
                cannot be one user turn, named under ``eval.chat_template``; at start, not at the first scoring step.
        """
        from ..errors import ConfigError, InputError
        from ..eval.sets import chat_template_for, user_turns

        ev = eval_section
        chat = None
        if ev.chat_template:
            key = "eval.chat_template"
            # The instruction template "minillm" is no chat template; "qwen2" is both (the same ChatML text).
            template = data_section.template
            spec = None if template in (None, "minillm") else template
            st = student_section
            name = st.tokenizer or st.name_or_path or st.gguf_file or "student"
            try:
                chat = chat_template_for(tokenizer, spec, name, option=key)
                user_turns(eval_set, option=key)
            except InputError as e:
                raise ConfigError(str(e)) from e
        return cls(ev.rouge_every, eval_set, generation, ev.seed, chat)

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is a scoring step."""
        return step > 0 and step % self.every == 0

    def score(self, model: torch.nn.Module, tokenizer: Any, device: torch.device, output: Path, step: int) -> float:
        """Generate for the set with ``model`` as it is in memory and return its ROUGE-L (× 100, mean over examples).

        Writes ``output/step-{step}.json`` and the predictions in ``output/step-{step}.predictions/``, exactly as
        ``adakd eval --output output/step-{step}.json`` would. The global RNG (CPU and the device's) is restored
        afterwards and the model's train/eval mode too: scoring never changes the training that follows.
        """
        from ..eval.run import evaluate
        from ..generation import HFBackend

        was_training = model.training
        generation = dataclasses.replace(self.generation, stats={"tokens": 0.0, "seconds": 0.0})
        try:
            with torch.random.fork_rng(devices=_rng_devices(device)):
                backend = HFBackend(model, tokenizer, device=device)  # sets eval mode, as adakd eval does
                results = evaluate(
                    backend,
                    [self.eval_set],
                    [self.seed],
                    generation,
                    Path(output) / f"step-{step}.json",
                    f"step {step}",
                    show_progress=False,
                    chat_template=self.chat_template,
                )
        finally:
            model.train(was_training)
        return float(results["average"]["mean"])


class EvaluationMixin:
    """The evaluation hooks of :class:`adakd.train.AdaKDTrainer` (placed before ``transformers.Trainer`` in its
    bases): the Trainer's own ``evaluate`` and loop (model preparation, eval dataloader, speed metrics, ``log``,
    ``on_evaluate``) with our per-batch step, and ROUGE-L. The Trainer's per-batch loss average is not used: a
    mean of batch means is not token-weighted. It reads the trainer's ``loss_fn`` (its base divergence only),
    ``teacher`` and ``teacher_source``, ``kd_ratio``, ``fused``, ``chunk_size``, ``accelerator`` and ``rouge``."""

    def _eval_sums(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sequence ``[B, 4]`` float64 sums (tokens, Σ CE, Σ KD, Σ Hellinger) of one eval batch
        (:mod:`adakd.train.evaluation`), through the engine's wrappers as in training (the step's student forward
        and the teacher object's part); the loss is not called. A teacher without a model (a cache) is not used."""
        labels = inputs["labels"][:, 1:]
        div, vocab = self.loss_fn.div, self.loss_fn.vocab_size
        teacher = self.teacher_source if self.teacher is not None else None
        if not self.fused:
            student = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits[:, :-1]
            t_logits = None if teacher is None else teacher.part(inputs, hidden=False).values
            return evaluation_sums(student, t_logits, labels, div, vocab, self.chunk_size)
        part = None if teacher is None else teacher.part(inputs, hidden=True)
        head = unwrap(model).get_output_embeddings()

        def head_forward(hidden: torch.Tensor) -> torch.Tensor:
            # As in training: the student's lm_head is full inside its own forward; the teacher's is gathered.
            with part.head_parameters() if part is not None else contextlib.nullcontext((None, None)) as t_head:
                weight, bias = student_head(head, hidden.dtype)
                t_parts = None if part is None else (part.values, *t_head)
                return evaluation_sums_hidden(
                    (hidden, weight, bias), t_parts, labels, div, vocab_size=vocab, chunk_size=self.chunk_size
                )

        return head_call(model, inputs, head_forward, self.accelerator)

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[None, None, None]:
        """One eval batch: its per-sequence sums, gathered from every rank, join the evaluation's totals.

        Several processes: ``gather_for_metrics`` concatenates every rank's ``[B, 4]`` rows and drops the sequences
        the distributed sampler repeated to give every rank equally many batches, so each sequence of the set counts
        exactly once, and every rank holds the same totals (an all-reduce of sums would count the repeats). Every
        rank runs every batch, as the Trainer's loop guarantees, so the engine's collectives stay in step.

        Returns:
            ``(None, None, None)``: the Trainer gathers no loss or predictions; the metrics come from the totals.
        """
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            sums = self._eval_sums(model, inputs)
        sums = self.accelerator.gather_for_metrics(sums).sum(0)
        self._eval_totals = sums if self._eval_totals is None else self._eval_totals + sums
        return None, None, None

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """The Trainer's evaluation loop, plus ``{prefix}_ce_loss``, ``_kd_loss``, ``_hellinger``, ``_loss`` and
        ``_tokens``: token-weighted means over the whole set (:func:`adakd.train.evaluation.eval_metrics`)."""
        self._eval_totals = None
        try:
            # The eval data loader draws its base seed from the global RNG: without the fork, a run with
            # evaluation would draw other dropout masks afterwards than the same run without.
            with torch.random.fork_rng(devices=_rng_devices(self.args.device)):
                output = super().evaluation_loop(
                    dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
                )
            totals = self._eval_totals
        finally:
            self._eval_totals = None
        if totals is not None:
            metrics = eval_metrics(totals.tolist(), self.kd_ratio, self.teacher is not None, metric_key_prefix)
            output.metrics.update(metrics)
        return output

    def log_rouge(self) -> float:
        """Score ROUGE-L now (main process; the others wait for its value) and log it as ``eval_rouge_l``.

        Under DDP the main process generates alone, so keep ``eval.rouge_limit`` small: the other ranks wait at the
        broadcast, within the process group's timeout (``training.ddp_timeout``)."""
        step = self.state.global_step
        value = None
        if self.accelerator.is_main_process:
            folder = Path(self.args.output_dir) / "rouge"
            value = self.rouge.score(unwrap(self.model), self.processing_class, self.args.device, folder, step)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            value = broadcast_object_list([value])[0]
        # Called from on_step_end, before the Trainer logs this step's training row: its log handler clears
        # should_log, which would drop that row.
        should_log = self.control.should_log
        self.log({"eval_rouge_l": value})
        self.control.should_log = should_log
        return value
