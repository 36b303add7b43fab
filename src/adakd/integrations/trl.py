"""AdaKD inside TRL: :class:`AdaKDDistillationTrainer`, TRL's ``DistillationTrainer`` with the AdaKD loss.

TRL keeps what it does (prompt handling and chat templates, on-policy generation with transformers or vLLM, PEFT,
the hub, its logging); the per-token loss on the completion tokens TRL marks becomes :class:`adakd.AdaKDLoss`
(difficulty scores, LATF selection, IDTS temperatures, any base divergence), normalised like
:class:`adakd.train.AdaKDTrainer`'s:

- KD = Σ_kept τ²·D over the micro-batch, divided by the accumulation window's completion-token count (all
  micro-batches and ranks: TRL's ``num_items_in_batch``) times the micro-batch's kept share;
- LATF advances once per optimizer step (a callback at ``on_step_end``) with L_t averaged over the step's
  micro-batches and all-reduced over ranks (:func:`adakd.integrations.step_latf`, through ``adakd train``'s
  :class:`adakd.train.callbacks.LossStateCallback`);
- the loss state is written into every ``checkpoint-N`` as ``adakd_state.pt`` (:mod:`adakd.train.checkpoints`)
  and restored by ``train(resume_from_checkpoint=...)``;
- ``adakd/ratio``, ``adakd/kept_tokens``, ``adakd/valid_tokens``, ``adakd/tau_mean|min|max`` go through TRL's
  metric averaging to every ``report_to`` backend.

TRL 1.16's ``DistillationTrainer`` always samples completions from the student. ``lmbda`` (GKD's name) makes that
a per-step choice: with probability ``lmbda`` a step trains on student samples, otherwise on the dataset's own
completions (TRL's prompt-completion format, standard or conversational); ``lmbda=1`` (the default) is TRL's
behaviour. The decision is a function of the seed and the step, so every rank and a resumed run agree.

The subclass overrides TRL hooks that are not public API (``compute_loss``, ``_generate``,
``_generate_and_score_completions``, ``_save_checkpoint``; it calls ``_tokenize_prompts``,
``_get_last_hidden_state``, ``_forward_redirection``); they are pinned against TRL 1.16 by
``tests/integrations/test_trl.py``.
"""

from __future__ import annotations

import inspect
import random
import warnings
from pathlib import Path
from typing import Any

import torch

try:
    import trl
    from trl import DistillationConfig, DistillationTrainer
    from trl.data_utils import common_prefix_length, is_conversational
except ModuleNotFoundError as e:  # the optional extra
    raise ModuleNotFoundError(f"adakd.integrations.trl needs TRL: pip install 'adakd[trl]' ({e})", name=e.name) from e
except ImportError as e:  # a TRL without the DistillationTrainer (before 1.16)
    raise ImportError(f"adakd.integrations.trl needs trl>=1.16 (found an older TRL: {e})") from e
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import ConfigError, InputError
from ..fused import entropy_sum
from ..loss import AdaKDLoss, LossReport, Mix
from ..train.callbacks import LossStateCallback
from ..train.checkpoints import load_loss_state, resolve_checkpoint, save_loss_state
from ..train.engines import call_through, check_linear_head
from ..train.step import hidden_loss
from ..train.teacher import TeacherPart
from ..train.trainer import LOGGED
from .trl_checks import build_loss, check_arguments

__all__ = ["AdaKDDistillationTrainer"]

if tuple(int(x) for x in trl.__version__.split(".")[:2]) != (1, 16):
    warnings.warn(
        f"adakd.integrations.trl is tested with TRL 1.16 and overrides non-public TRL hooks; found TRL "
        f"{trl.__version__}",
        RuntimeWarning,
        stacklevel=2,
    )

# Multimodal fields TRL splits per micro-batch and passes to the models' forward (distillation_trainer.py).
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")  # fmt: skip


class AdaKDDistillationTrainer(DistillationTrainer):
    """TRL's ``DistillationTrainer`` whose token loss is :class:`adakd.AdaKDLoss`.

    Args:
        model: the student, as for ``trl.DistillationTrainer`` (a hub id, a path, a model or a ``PeftModel``).
        teacher_model: the teacher (required), a hub id, a path or a model with the student's vocabulary size.
        args: a ``trl.DistillationConfig``. Its ``beta`` (TRL's choice of divergence) must stay at its default:
            the divergence is ``adakd_loss``'s ``base``. Its ``temperature`` applies to sampling only: AdaKD's
            temperatures are IDTS's (``adakd_loss``'s ``temperature``, ``tau_base``, ``c``).
        train_dataset: TRL's format: ``prompt`` (text or messages); with ``lmbda < 1`` also ``completion``.
        eval_dataset: as ``train_dataset``; evaluated on its ``completion`` when ``lmbda < 1``, on samples
            otherwise.
        processing_class: the tokenizer (``padding_side="left"``, as TRL requires) or processor.
        adakd_loss: an ``AdaKDLoss(reduction="sum")``, or a dict of its arguments (``{"base": "fkl", "c": 0.5,
            "warmup_steps": 10}``); default ``AdaKDLoss(base="rkl")``, the paper's AdaKD-RKL.
        lmbda: probability that an optimizer step trains on completions the student samples (TRL's on-policy
            generation); otherwise on the dataset's ``completion``. 1 (default): always sampled, as TRL.
        fused: compute the loss from the final hidden states and lm_head weights chunk by chunk
            (``AdaKDLoss.forward_hidden``), never materialising the completion logits; refused for models whose
            logits are not ``hidden @ lm_head.weightᵀ`` (soft-capping, logit scaling). Default: the models' logits.
        chunk_size: rows per chunk of the fused loss.
        **trl_kwargs: the other ``trl.DistillationTrainer`` arguments (``callbacks``, ``optimizers``,
            ``peft_config``, ``quantization_config``, ``tools``; ``tools`` only with ``lmbda=1``).

    Raises:
        InputError: an argument AdaKD cannot honour (named in the message).
    """

    _tag_names = ["trl", "distillation", "adakd"]
    _name = "AdaKD Distillation"
    distils = True  # always a teacher and a KD term: LATF steps after every optimizer step

    def __init__(
        self,
        model: Any,
        teacher_model: Any = None,
        args: DistillationConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        adakd_loss: AdaKDLoss | dict[str, Any] | None = None,
        lmbda: float = 1.0,
        fused: bool = False,
        chunk_size: int | None = None,
        **trl_kwargs: Any,
    ) -> None:
        self.loss_fn = build_loss(adakd_loss)
        datasets = {"train_dataset": train_dataset, "eval_dataset": eval_dataset}
        check_arguments(args, teacher_model, lmbda, chunk_size, datasets, trl_kwargs.get("tools"))
        self.lmbda = float(lmbda)
        self.fused = bool(fused)
        self.chunk_size = chunk_size
        self._dataset_batch: list[dict[str, Any]] | None = None  # the examples whose completions _generate returns
        self._warned_prefix = False
        super().__init__(model, teacher_model, args, train_dataset, eval_dataset, processing_class, **trl_kwargs)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        # Which forward arguments the teacher takes (logits_to_keep), read as TRL reads the student's.
        base = teacher.get_base_model() if hasattr(teacher, "get_base_model") else teacher
        self.teacher_kwarg_keys = set(inspect.signature(base.forward).parameters)
        if self.fused:
            for role, module in (("student", self.accelerator.unwrap_model(self.model)), ("teacher", teacher)):
                try:
                    check_linear_head(module, role)
                except ConfigError as e:  # worded for the YAML key there; name the argument here
                    why = f"{e.reason}: use fused=False"
                    raise InputError(f"fused=True: {why}") from e
        self.add_callback(LossStateCallback(self))

    # ----------------------------------------------------------------------------------------------------------
    # Completions: the student's samples (TRL) or the dataset's (lmbda < 1).
    def _dataset_completions_now(self) -> bool:
        """Whether the current generation batch uses the dataset's completions: in evaluation whenever
        ``lmbda < 1``; in training with probability 1 − lmbda, drawn from (seed, optimizer step)."""
        if self.lmbda >= 1:
            return False
        if not self.model.training or self.lmbda <= 0:
            return True
        # A string seed is hashed with SHA-512 by random.Random: the same draw on every rank and after a resume.
        return random.Random(f"adakd-lmbda:{self.args.seed}:{self.state.global_step}").random() >= self.lmbda

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's batch preparation; with the dataset's completions when this step does not sample."""
        from_dataset = self._dataset_completions_now()
        if self.model.training:
            self._metrics["train"]["onpolicy/generated"].append(0.0 if from_dataset else 1.0)
        self._dataset_batch = inputs if from_dataset else None
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._dataset_batch = None

    def _generate(self, prompts: list) -> tuple:
        """TRL's sampling, or the dataset's completions tokenized as TRL's SFT trainer does."""
        if self._dataset_batch is None:
            return super()._generate(prompts)
        prompt_ids, completion_ids = self.tokenize_completions(prompts, self._dataset_batch)
        if self.model.training:  # as TRL counts sampled batches
            lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
            lengths = torch.tensor(lengths, device=self.accelerator.device)
            self.state.num_input_tokens_seen += self.accelerator.gather(lengths).sum().item()
        return prompt_ids, completion_ids, None, None, []

    def tokenize_completions(self, prompts: list, examples: list[dict[str, Any]]) -> tuple[list, list]:
        """Token ids of the examples' prompts and dataset completions, as TRL's ``SFTTrainer`` builds them.

        Conversational examples: the chat template renders prompt + completion; the prompt is what it shares with
        the prompt rendered alone with the generation prompt (the tokens TRL's sampling would start from), the
        completion is the rest (the assistant turn and its end-of-turn tokens). Text examples: prompt and
        prompt + completion + eos tokenized. The completion is cut to ``max_completion_length``.

        Returns:
            ``(prompt_ids, completion_ids)``, one list of ids per example.

        Raises:
            InputError: an example without a ``completion``, with images, or whose completion has no token.
        """
        for i, example in enumerate(examples):
            if "completion" not in example:
                raise InputError(
                    f"example {i} of the batch has no 'completion' (keys: {', '.join(example)}); lmbda < 1 trains on "
                    "the dataset's completions (keep remove_unused_columns=False)"
                )
            if example.get("image") is not None or example.get("images"):
                raise InputError(f"example {i}: images are supported with lmbda=1 only (sampled completions)")
        completions = [example["completion"] for example in examples]
        if is_conversational({"prompt": prompts[0]}):
            prompt_ids, _, _ = self._tokenize_prompts(prompts)  # what TRL's sampling starts from
            full = self.processing_class.apply_chat_template(
                conversation=[list(p) + list(c) for p, c in zip(prompts, completions, strict=True)],
                chat_template=self.chat_template,
                tokenize=True,
                return_dict=True,
                **self.chat_template_kwargs,
            )["input_ids"]
        else:
            eos = self._tokenizer.eos_token
            prompt_ids = self.processing_class(text=list(prompts))["input_ids"]
            texts = [p + c + ("" if c.endswith(eos) else eos) for p, c in zip(prompts, completions, strict=True)]
            full = self.processing_class(text=texts)["input_ids"]
        out_prompts, out_completions = [], []
        limit = self.max_completion_length
        for i, (prompt, ids) in enumerate(zip(prompt_ids, full, strict=True)):
            n = common_prefix_length(list(prompt), list(ids))
            if n < len(prompt) and not self._warned_prefix:
                self._warned_prefix = True
                warnings.warn(
                    "adakd: the tokenized prompt is not a prefix of the tokenized prompt + completion (the chat "
                    "template renders the prompt differently alone, or tokens merge across the boundary); the "
                    "completion starts where they diverge",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if n == len(ids):
                raise InputError(f"example {i} of the batch: the completion has no token")
            out_prompts.append(list(ids[:n]))
            out_completions.append(list(ids[n:] if limit is None else ids[n : n + limit]))
        return out_prompts, out_completions

    # ----------------------------------------------------------------------------------------------------------
    # The loss.
    @staticmethod
    def _sequence(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, Any]]:
        """(input_ids [B, P+C], attention_mask [B, P+C], C, multimodal fields) of one TRL micro-batch."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}
        return input_ids, attention_mask, inputs["completion_ids"].shape[1], multimodal

    def _labels(self, inputs: dict[str, Any]) -> torch.Tensor:
        """``[B, C]``: the completion ids where TRL's loss mask (completion mask × tool mask) is 1, else ignored."""
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        return inputs["completion_ids"].masked_fill(mask == 0, self.loss_fn.ignore_index)

    def _completion_logits(self, module: Any, keys: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """``[B, C, V]``: the logits at the positions that predict the completion tokens (the model's own logits,
        with any soft-capping or scaling it applies)."""
        input_ids, attention_mask, keep, multimodal = self._sequence(inputs)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False, **multimodal}
        if "logits_to_keep" in keys:
            kwargs["logits_to_keep"] = keep + 1  # the last position predicts past the sequence
        return module(**kwargs).logits[:, :-1][:, -keep:]

    def _logits_terms(self, model: Any, inputs: dict[str, Any], labels: torch.Tensor, mix: Mix) -> tuple:
        """(the window's KD share, the loss's report, Σ student entropy over valid positions) on materialised
        completion logits."""
        student = self._completion_logits(model, self.model_kwarg_keys, inputs)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher = self._completion_logits(self.teacher_model, self.teacher_kwarg_keys, inputs)
        loss, report = self.loss_fn(student, teacher, labels, mix=mix, return_report=True)
        valid = labels != self.loss_fn.ignore_index
        return loss, report, entropy_sum(student.detach()[valid])

    def _fused_kd(
        self, unwrapped_student: Any, inputs: dict[str, Any], labels: torch.Tensor, mix: Mix
    ) -> tuple[torch.Tensor, LossReport]:
        """The window's KD share and its report from hidden states and lm_head weights, as TRL's own chunked loss
        gets them: the backbones run inside their wrappers' forwards (TRL's forward redirection); the loss then runs
        inside the student lm_head's own forward (:func:`adakd.train.engines.call_through`, with ``adakd train``'s
        head path :func:`adakd.train.step.hidden_loss`), where DeepSpeed ZeRO-3 and FSDP2 hold its full weight and
        attach their backward hooks to the loss."""
        input_ids, attention_mask, keep, multimodal = self._sequence(inputs)
        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep, **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                self._get_last_hidden_state,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                keep,
                **multimodal,
            )
        teacher = TeacherPart(teacher_hidden, unwrapped_teacher.get_output_embeddings())
        head = unwrapped_student.get_output_embeddings()

        def head_loss(student_hidden: torch.Tensor) -> tuple[torch.Tensor, LossReport]:
            with teacher.head_parameters() as t_head:
                values = teacher.values
                return hidden_loss(
                    self.loss_fn, student_hidden, head, values, t_head, labels, chunk_size=self.chunk_size, mix=mix
                )

        return call_through(head, head_loss, hidden)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, None]:
        """The micro-batch's AdaKD loss, normalised over the accumulation window.

        Args:
            model: the student, as the engine wraps it.
            inputs: TRL's micro-batch: ``prompt_ids``/``prompt_mask`` ``[B, P]`` (left-padded),
                ``completion_ids``/``completion_mask`` ``[B, C]`` (right-padded), ``num_items_in_batch`` (the
                window's completion tokens over every rank), optionally ``tool_mask`` and multimodal fields.
            return_outputs: return ``(loss, None)``.
            num_items_in_batch: replaced in training by TRL's count over the completions actually trained on;
                in evaluation the micro-batch is normalised by its own valid tokens.

        Returns:
            A scalar: Σ_kept τ²·D / (window tokens × kept share), scaled for DDP's gradient averaging.

        Raises:
            NonFiniteLossError: the AdaKD loss is NaN or inf (nothing in the loss's state has moved).
        """
        training = self.model.training
        mode = "train" if training else "eval"
        if training and inputs.get("num_items_in_batch") is not None:
            # As TRL: the window's count over every rank, divided by the ranks to undo DDP's gradient averaging.
            num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        # Evaluation forwards must not move LATF: the loss counts L_t towards its next step in training mode only.
        self.loss_fn.train(training)
        labels = self._labels(inputs)
        # KD alone (no CE), normalised by the window's tokens (None: this micro-batch's own valid tokens).
        mix = Mix(1.0, num_items_in_batch)
        entropy = None
        if self.fused:
            unwrapped = self.accelerator.unwrap_model(model)
            loss, report = self._forward_redirection(model, unwrapped, self._fused_kd, unwrapped, inputs, labels, mix)
        else:
            loss, report, entropy = self._logits_terms(model, inputs, labels, mix)

        stats = report.as_dict()
        for key in LOGGED:
            self._metrics[mode][f"adakd/{key}"].append(stats[key])
        if entropy is not None:
            count = torch.tensor(float(report.valid_tokens), device=entropy.device)
            count = self.accelerator.gather_for_metrics(count).sum()
            entropy = self.accelerator.gather_for_metrics(entropy).sum()
            self._metrics[mode]["entropy"].append((entropy / count).item() if count > 0 else 0.0)
        return (loss, None) if return_outputs else loss

    # ----------------------------------------------------------------------------------------------------------
    # Checkpoints: TRL's, plus adakd_state.pt.
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The loss state goes into ``checkpoint-N`` before TRL writes its files: ``trainer_state.json``, the
        Trainer's last file and what a resume looks for, then implies the loss state is there."""
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            save_loss_state(self.loss_fn, folder)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``; on resume the AdaKD loss state (LATF) is restored first.

        ``resume_from_checkpoint=True`` picks the newest ``checkpoint-N`` of ``output_dir`` holding both the
        Trainer's state and ``adakd_state.pt``.

        Raises:
            CheckpointError: no such checkpoint, or one without ``adakd_state.pt`` or with a corrupted one.
        """
        if resume_from_checkpoint:
            resume_from_checkpoint = resolve_checkpoint(self.args.output_dir, resume_from_checkpoint, need_state=True)
            load_loss_state(self.loss_fn, resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
