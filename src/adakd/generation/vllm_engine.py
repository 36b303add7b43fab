"""vLLM's offline engine (``vllm.LLM``, in this process): ``adakd eval --backend vllm``, and the on-policy generator
that samples for GKD / DistiLLM from a copy of the training student (``onpolicy.generator: vllm``).

vLLM is optional: this module imports it only when an engine is made, so adakd imports and runs without it.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InputError
from . import GenerationConfig, _decode_answers, _encode_prompts, _stop_ids

__all__ = ["VLLMBackend", "VLLMGenerator", "make_engine", "sampling_params"]


def make_engine(model: str, *, flag: str, dtype: str = "auto", seed: int = 0, **engine_kwargs: Any):
    """A ``vllm.LLM`` for ``model`` (a folder or hub id) in ``dtype`` (adakd's names, ``auto``, ``float32``,
    ``bfloat16``, ``float16``, are vLLM's too).

    Raises:
        InputError: vllm is not installed (the message names ``flag``).
    """
    try:
        from vllm import LLM
    except ImportError:
        raise InputError(f"{flag}: vllm is not installed (pip install vllm)") from None
    return LLM(model=model, dtype=dtype, seed=seed, **engine_kwargs)


def sampling_params(
    *, greedy: bool, temperature: float, top_p: float, top_k: int, max_tokens: int, seed: int | None, stops: list[int]
):
    """vLLM's ``SamplingParams`` for one prompt: answers end at exactly ``stops`` (the model's own eos ids from its
    generation config are not added: ``ignore_eos``), token ids only (adakd decodes them)."""
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0 if greedy else temperature,  # vLLM's greedy
        top_p=1.0 if greedy else top_p,
        top_k=-1 if greedy or top_k == 0 else top_k,  # vLLM's "off" is -1
        max_tokens=max_tokens,
        seed=None if greedy else seed,
        stop_token_ids=stops,
        ignore_eos=True,
        detokenize=False,
    )


class VLLMBackend:
    """vLLM's offline engine in this process (``--backend vllm``): prompts encoded and answers decoded as
    :class:`adakd.generation.HFBackend` does, so the texts are comparable. Each answer may hold
    ``max_length − len(prompt)`` tokens (HFBackend's batches: the room the batch's longest prompt leaves; the same at
    batch size 1); every prompt goes to the engine at once (it batches them itself).

    Args:
        model_path: a model folder or hub id vLLM can load (a LoRA adapter must be merged first).
        tokenizer: the tokenizer that encodes and decodes (default: the engine's).
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``.
        engine_kwargs: more ``vllm.LLM`` arguments.
    """

    name = "vllm"  # recorded in adakd eval's results (generation.backend)

    def __init__(self, model_path: str, tokenizer=None, dtype: str = "auto", **engine_kwargs) -> None:
        self.llm = make_engine(model_path, flag="--backend vllm", dtype=dtype, **engine_kwargs)
        self.tokenizer = tokenizer or self.llm.get_tokenizer()

    def generate(
        self,
        prompts: list[str],
        seed: int,
        config: GenerationConfig,
        progress=None,
        stop_token_ids: Sequence[int] = (),
    ) -> list[str]:
        """As :meth:`adakd.generation.HFBackend.generate`; prompt i samples with seed ``seed + i`` (vLLM seeds per
        request)."""
        from vllm import TokensPrompt

        encoded = _encode_prompts(self.tokenizer, prompts, config)
        stops = _stop_ids(self.tokenizer, stop_token_ids)
        params = [
            sampling_params(
                greedy=config.greedy,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=config.top_k,
                max_tokens=max(1, config.max_length - len(ids)),
                seed=seed + i,
                stops=stops,
            )
            for i, ids in enumerate(encoded)
        ]
        start_time = time.perf_counter()
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in encoded]
        results = self.llm.generate(requests, params, use_tqdm=False)
        config.stats["seconds"] += time.perf_counter() - start_time
        answers = [list(r.outputs[0].token_ids) for r in results]  # with the token that ended each
        if progress is not None:
            progress.update(len(prompts))
        return _decode_answers(self.tokenizer, answers, stops, config.stats)


class VLLMGenerator:
    """A vLLM copy of a training student, in this process, that samples on-policy generations: the student's weights
    are pushed into it before each generation (TRL's "colocate" mode; ``onpolicy.generator: vllm``).

    The engine is built once from the student as it is (its config and weights saved to a temporary folder), without
    a tokenizer (prompts and answers are token ids), and runs in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that :meth:`push` hands it the student's tensors without copying them
    to another process: the worker's ``reload_weights`` (``LLM.collective_rpc``) loads the student's state dict as a
    checkpoint (the model's own loader fuses q/k/v and gate/up and skips a tied ``lm_head``) and processes the
    weights again as after the first load.

    Args:
        student: a ``transformers`` causal LM of an architecture vLLM serves (Llama, Qwen2, ...), without LoRA.
        max_length: the longest prompt + answer (the engine's ``max_model_len``).
        seed: the engine's sampling seed.
        engine_kwargs: more ``vllm.LLM`` arguments.

    Raises:
        InputError: several processes, a LoRA student, or vllm not installed (naming ``onpolicy.generator``).
    """

    def __init__(self, student, *, max_length: int, seed: int = 0, **engine_kwargs: Any) -> None:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        world = max(world, int(os.environ.get("WORLD_SIZE", "1")))
        if world > 1:
            raise InputError(f"onpolicy.generator: vllm runs in one process, this run has {world}; use hf")
        if hasattr(student, "peft_config"):
            raise InputError("onpolicy.generator: vllm needs a student without LoRA (student.lora); use hf")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine's model in this process, for push()
        self._folder = tempfile.TemporaryDirectory(prefix="adakd-vllm-student-")
        student.save_pretrained(self._folder.name)
        dtype = str(next(student.parameters()).dtype).removeprefix("torch.")
        self.vocab_rows = int(student.config.vocab_size)
        self.llm = make_engine(
            self._folder.name,
            flag="onpolicy.generator",
            dtype=dtype,
            seed=seed,
            max_model_len=max_length,
            skip_tokenizer_init=True,
            enforce_eager=True,  # no compiled graphs to hold the old weights, no compile time
            **engine_kwargs,
        )

    @torch.no_grad()
    def push(self, student) -> None:
        """Copy ``student``'s current weights into the engine's model, and drop the prompt KV cached with the old."""
        weights = [(name, tensor.detach()) for name, tensor in student.state_dict().items()]
        # reload_weights, not the model's load_weights alone: after loading, vLLM's CPU build repacks every linear
        # layer's weight for its GEMM kernel and drops the parameter; the layerwise reload restores the parameters,
        # loads the checkpoint-format weights and runs that processing again.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down now, with the process group it made in this process: left to the interpreter's exit,
        vLLM's teardown would find the group already destroyed by the training's own teardown."""
        self.llm.llm_engine.engine_core.shutdown()
        self._folder.cleanup()

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        stops: list[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        vocab_size: int | None = None,
    ) -> list[list[int]]:
        """As :func:`adakd.generation.generate_ids`: the new tokens of each prompt, cut after the first of ``stops``
        (kept); never an id at or beyond ``vocab_size``."""
        from vllm import TokensPrompt

        params = sampling_params(
            greedy=False,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_tokens=max_new_tokens,
            seed=None,
            stops=stops,
        )
        if vocab_size is not None and vocab_size < self.vocab_rows:  # an lm_head with padding rows
            params.allowed_token_ids = list(range(vocab_size))
        results = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(r.outputs[0].token_ids) for r in results]
