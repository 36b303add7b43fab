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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adaptive import score_fn
from ..divergences import DivergenceFn, log_probs
from ..fused import default_chunk_size, linear
from ..labels import IGNORE_INDEX
from ..shapes import align_vocab
from .engines import unwrap
from .step import head_call, student_head

__all__ = [
    "SUM_COLUMNS",
    "EvaluationMixin",
    "RougeDuringTraining",
    "eval_metrics",
    "sequence_sums",
    "sequence_sums_hidden",
    "token_terms",
]

SUM_COLUMNS = ("tokens", "ce", "kd", "hellinger")  # the columns of the per-sequence sums

# rows [n] of the flattened [B·T] positions -> (student logits [n, V_s], teacher logits [n, V_t] or None)
RowLogits = Callable[[Tensor], tuple[Tensor, "Tensor | None"]]


@torch.no_grad()
def token_terms(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    targets: Tensor,
    divergence: DivergenceFn,
    vocab_size: int | None = None,
) -> Tensor:
    """Per-token CE, KD at τ = 1 and Hellinger difficulty, computed and returned in float64 ``[n, 3]``.

    float64 throughout (training computes in float32): a measurement should not carry the float32 rounding of
    a log-space mixture (JSD, skewed KL), which reaches ~1e-5 relative on small divergences.

    Args:
        student_logits: ``[n, V_s]``.
        teacher_logits: ``[n, V_t]``, V_t ≥ V_s (its padding rows are cropped, as the loss does), or None: the KD
            and Hellinger columns are then 0.
        targets: ``[n]`` label ids (no -100 here: the caller passes valid positions only).
        divergence: the run's base divergence (``AdaKDLoss.div``), ``f(student_log_probs, teacher_log_probs)``.
        vocab_size: the tokenizer's size, checked by :func:`adakd.align_vocab`.
    """
    lq = log_probs(student_logits, 1.0, torch.float64)
    ce = -lq.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if teacher_logits is None:
        zeros = torch.zeros_like(ce)
        return torch.stack([ce, zeros, zeros], -1)
    _, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
    lp = log_probs(teacher_logits, 1.0, torch.float64)
    kd = divergence(lq, lp)
    # The difficulty score LATF ranks tokens by (Eq. 3); it works in place on its inputs, which are spent by now.
    hellinger = score_fn("hellinger")(lq, lp, None)
    return torch.stack([ce, kd, hellinger], -1)


def _sums(labels: Tensor, row_logits: RowLogits, divergence: DivergenceFn, vocab_size: int | None, chunk: int):
    """Per-sequence ``[B, 4]`` sums over the valid positions of ``labels [B, T]``, ``chunk`` rows of logits at a
    time (float64 ``[chunk, V]`` buffers, never ``[B·T, V]`` beyond what the model itself returned)."""
    width = labels.shape[1]
    flat = labels.reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    terms = torch.zeros(labels.shape[0], 3, dtype=torch.float64, device=labels.device)
    for start in range(0, rows.numel(), chunk):
        r = rows[start : start + chunk]
        student, teacher = row_logits(r)
        terms.index_add_(0, r // width, token_terms(student, teacher, flat[r], divergence, vocab_size))
    tokens = (labels != IGNORE_INDEX).sum(1).double()
    return torch.cat([tokens.unsqueeze(1), terms], 1)


@torch.no_grad()
def sequence_sums(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    divergence: DivergenceFn,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-sequence sums of one eval batch on materialised logits.

    Args:
        student_logits: ``[B, T, V_s]``, shifted: position i predicts ``labels[:, i]``.
        teacher_logits: ``[B, T, V_t]`` or None (plain SFT: CE only).
        labels: ``[B, T]``, -100 where there is no target.
        divergence: the run's base divergence (``AdaKDLoss.div``).
        vocab_size: the tokenizer's size (for the teacher's crop check).
        chunk_size: rows of logits per chunk; default half of :func:`adakd.fused.default_chunk_size` (float64).

    Returns:
        ``[B, 4]`` float64: tokens, Σ CE, Σ KD, Σ Hellinger (:data:`SUM_COLUMNS`) of each sequence.
    """
    v = student_logits.shape[-1]
    student = student_logits.reshape(-1, v)
    teacher = None if teacher_logits is None else teacher_logits.reshape(-1, teacher_logits.shape[-1])

    def row_logits(r: Tensor) -> tuple[Tensor, Tensor | None]:
        return student.index_select(0, r), None if teacher is None else teacher.index_select(0, r)

    chunk = chunk_size or max(1, default_chunk_size(v, student.device) // 2)
    return _sums(labels, row_logits, divergence, vocab_size, chunk)


@torch.no_grad()
def sequence_sums_hidden(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    labels: Tensor,
    divergence: DivergenceFn,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """:func:`sequence_sums` from final hidden states and lm_head weights (the fused path): the logits of each
    chunk of valid rows are computed here, ``hidden @ Wᵀ (+ b)``, and never for the whole batch.

    Args:
        student_hidden: ``[B, T, H_s]``; student_weight ``[V_s, H_s]``; student_bias ``[V_s]`` or None.
        teacher_hidden: ``[B, T, H_t]`` or None; teacher_weight ``[V_t, H_t]``; teacher_bias ``[V_t]`` or None.
        labels: ``[B, T]``, -100 where there is no target.

    Returns:
        ``[B, 4]`` float64, as :func:`sequence_sums`.
    """
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1])

    def row_logits(r: Tensor) -> tuple[Tensor, Tensor | None]:
        student = linear(hs.index_select(0, r), student_weight, student_bias)
        if ht is None:
            return student, None
        return student, linear(ht.index_select(0, r), teacher_weight, teacher_bias)

    chunk = chunk_size or max(1, default_chunk_size(student_weight.shape[0], hs.device) // 2)
    return _sums(labels, row_logits, divergence, vocab_size, chunk)


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
    def from_config(cls, config: Any, eval_set: Any, generation: Any, tokenizer: Any) -> RougeDuringTraining:
        """The scorer a run's ``eval`` section asks for: ``eval.rouge_every``, ``eval.seed`` and
        ``eval.chat_template``.

        With ``eval.chat_template: true`` the template is the one the training data was rendered with when that is a
        chat template (``data.template``: ``qwen2`` or a Jinja file), else the student tokenizer's own; every record
        must be one user turn (an ``instruction``, or a ``prompt`` in the MiniLLM/Alpaca template).

        Raises:
            ConfigError: a tokenizer without a chat template, a template file that cannot be read, or a record that
                cannot be one user turn, named under ``eval.chat_template``; at start, not at the first scoring step.
        """
        from ..errors import ConfigError, InputError
        from ..eval.sets import chat_template_for, user_turns

        ev = config.eval
        chat = None
        if ev.chat_template:
            key = "eval.chat_template"
            # The instruction template "minillm" is no chat template; "qwen2" is both (the same ChatML text).
            spec = None if config.data.template in (None, "minillm") else config.data.template
            name = config.student.tokenizer or config.student.name_or_path or config.student.gguf_file or "student"
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
            return sequence_sums(student, t_logits, labels, div, vocab, self.chunk_size)
        part = None if teacher is None else teacher.part(inputs, hidden=True)
        head = unwrap(model).get_output_embeddings()

        def head_forward(hidden: torch.Tensor) -> torch.Tensor:
            # As in training: the student's lm_head is full inside its own forward; the teacher's is gathered.
            with part.head_parameters() if part is not None else contextlib.nullcontext((None, None)) as t_head:
                weight, bias = student_head(head, hidden.dtype)
                return sequence_sums_hidden(
                    hidden,
                    weight,
                    bias,
                    None if part is None else part.values,
                    *t_head,
                    labels,
                    divergence=div,
                    vocab_size=vocab,
                    chunk_size=self.chunk_size,
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
