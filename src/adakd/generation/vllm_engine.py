"""vLLM's offline engine (``vllm.LLM``, in this process): ``adakd eval --backend vllm``.

vLLM is optional: this module imports it only when an engine is made, so adakd imports and runs without it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..errors import InputError
from . import GenerationConfig, _decode_answers, _encode_prompts, _stop_ids

__all__ = ["VLLMBackend", "make_engine", "sampling_params"]


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
