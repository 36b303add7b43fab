"""Sampling from a causal LM: :func:`generate_ids`, shared by evaluation and on-policy training, and the text-level
backends of ``adakd eval``: Hugging Face ``generate`` (default), vLLM's offline engine (when installed:
:mod:`adakd.generation.vllm_engine`) and a running vLLM server (:mod:`adakd.generation.server`).

It lives outside both ``eval/`` and ``train/`` so that training samples exactly as evaluation does without importing
the evaluation package. The paper's protocol: sampling with temperature 1.0, top-p 1.0, top-k 0 (off), total length
≤ 512 tokens with the prompt ≤ 256 (longer prompts keep their last 256 tokens, which hold the instruction's end and
"### Response:").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError

if TYPE_CHECKING:
    from .server import ServerBackend
    from .vllm_engine import VLLMBackend

__all__ = ["BACKENDS", "GenerationConfig", "HFBackend", "generate_ids", "load_backend"]

BACKENDS = ("hf", "vllm", "vllm-server")


@dataclass
class GenerationConfig:
    """How ``adakd eval`` decodes. ``greedy`` overrides the sampling parameters; lengths are in tokens; ``stats``
    accumulates, over every call, the tokens decoded (``tokens``: each answer's tokens and the token that ended it,
    one decoding step each, whatever the backend), the tokens kept in the answers (``answer_tokens``) and the
    seconds spent in the backend's generate (``seconds``), for the tokens/s figure."""

    max_length: int = 512
    max_prompt_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    batch_size: int = 8
    stats: dict[str, float] = field(default_factory=lambda: {"tokens": 0.0, "answer_tokens": 0.0, "seconds": 0.0})


def _encode_prompts(tokenizer: Any, prompts: list[str], config: GenerationConfig) -> list[list[int]]:
    """Each prompt's ids, without added special tokens (a rendered chat prompt holds its own), cut to its last
    ``config.max_prompt_length`` tokens; both backends encode alike, so they see the same prompts."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"][-config.max_prompt_length :] for p in prompts]


def _stop_ids(tokenizer: Any, stop_token_ids: Sequence[int]) -> list[int]:
    """The tokens that end an answer: the tokenizer's eos, then ``stop_token_ids`` (no repeats)."""
    return list(dict.fromkeys(i for i in (tokenizer.eos_token_id, *stop_token_ids) if i is not None))


def _decode_answers(tokenizer: Any, answers: list[list[int]], stops: list[int], stats: dict[str, float]) -> list[str]:
    """Each answer's text without the stop token that ended it (``decode(skip_special_tokens=True).strip()``), the
    way every backend decodes; ``stats`` counts the decoded tokens (the stop token included) and the kept ones."""
    texts = []
    for ids in answers:
        stats["tokens"] += len(ids)
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        stats["answer_tokens"] = stats.get("answer_tokens", 0.0) + len(ids)
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


class HFBackend:
    """Batched ``model.generate`` with the KV cache and left padding (so every prompt ends where decoding starts)."""

    name = "hf"  # recorded in adakd eval's results (generation.backend)

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    def _encode(self, prompts: list[str], config: GenerationConfig) -> list[list[int]]:
        return _encode_prompts(self.tokenizer, prompts, config)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seed: int,
        config: GenerationConfig,
        progress=None,
        stop_token_ids: Sequence[int] = (),
    ) -> list[str]:
        """Texts generated for ``prompts`` (in order), without the token that ended them. Same seed and batch size:
        the same texts.

        ``progress``: a tqdm-like object advanced by each batch's size, or None. ``stop_token_ids``: tokens that end
        an answer besides the tokenizer's eos (a chat template's end of turn, :func:`adakd.eval.sets.end_of_turn_ids`).
        """
        tok = self.tokenizer
        encoded = self._encode(prompts, config)
        stops = _stop_ids(tok, stop_token_ids)
        # One id as before (HF's own default); several: a list, which generate stops at any of.
        eos = stops[0] if len(stops) == 1 else stops or None
        pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0] if stops else None
        torch.manual_seed(seed)
        outputs: list[str] = []
        for start in range(0, len(encoded), config.batch_size):
            batch = encoded[start : start + config.batch_size]
            start_time = time.perf_counter()
            new = generate_ids(
                self.model,
                batch,
                pad_token_id=pad,
                eos_token_id=eos,
                max_length=config.max_length,
                greedy=config.greedy,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=config.top_k,
            )
            config.stats["seconds"] += time.perf_counter() - start_time
            outputs.extend(_decode_answers(tok, new, stops, config.stats))
            if progress is not None:
                progress.update(len(batch))
        return outputs


class _CropVocabulary:
    """A logits processor that never samples a row at or beyond ``vocab_size``: the padding rows of an lm_head
    larger than the tokenizer (Qwen2's 151,936 rows for 151,646 tokens) hold no token."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.vocab_size :] = -float("inf")
        return scores


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    *,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """One batched ``model.generate`` over token-id prompts, with the KV cache and left padding (so every prompt
    ends where decoding starts). Shared by evaluation (:class:`HFBackend`) and on-policy training.

    Args:
        model: a ``transformers`` causal LM, on its device; its mode is the caller's (eval for no dropout).
        prompts: token ids of each prompt, of any lengths (left-padded to ``[B, max len]`` here).
        max_length: total length limit (prompt + new tokens; at least one new token); or give ``max_new_tokens``.
        eos_token_id: the token that ends an answer, or several (any of them ends it).
        vocab_size: never sample ids at or beyond it (the tokenizer's size, when the lm_head has padding rows).

    Returns:
        the new tokens of each prompt, in order, cut after the first end token (which is kept).
    """
    width = max(len(x) for x in prompts)
    device = next(model.parameters()).device
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):  # left padding
        input_ids[row, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    kwargs: dict = dict(do_sample=not greedy, pad_token_id=pad_token_id, eos_token_id=eos_token_id, use_cache=True)
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    else:
        kwargs["max_length"] = max(max_length or 0, width + 1)
    if not greedy:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    if vocab_size is not None:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([_CropVocabulary(vocab_size)])
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    if eos_token_id is None:
        ends = set()
    else:
        ends = set(eos_token_id) if isinstance(eos_token_id, Sequence) else {eos_token_id}
    result = []
    for row in out[:, width:].cpu():
        ids = row.tolist()
        end = next((i for i, t in enumerate(ids) if t in ends), None)
        result.append(ids if end is None else ids[: end + 1])
    return result


def load_backend(
    backend: str,
    model_path: str,
    *,
    base_model: str | None = None,
    tokenizer: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    server_url: str | None = None,
    server_model: str | None = None,
    server_api_key_env: str | None = None,
    server_timeout: float = 600.0,
) -> HFBackend | ServerBackend | VLLMBackend:
    """Load the model to evaluate: a full model directory (or hub id), or a LoRA adapter on ``base_model``; with
    ``vllm-server``, the server at ``server_url`` serving ``server_model``, and ``model_path`` is only the tokenizer's
    source (the served model's folder or hub id) unless ``tokenizer`` is given.

    Returns:
        an :class:`HFBackend`, a :class:`~adakd.generation.vllm_engine.VLLMBackend` or a
        :class:`~adakd.generation.server.ServerBackend`.

    Raises:
        InputError: an unknown backend, a LoRA adapter with vLLM, or a model or tokenizer that cannot be loaded
            (the message names the flag, ``--model`` or ``--tokenizer``, and the path); for the server, a missing
            ``--server-url``, a model it does not serve, a tokenizer other than the served model's.
        adakd.errors.ServerError: the server does not answer.
    """
    from ..data import tokenizer_for
    from ..models import load_causal_lm

    if backend not in BACKENDS:
        raise InputError(f"--backend: unknown {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "hf" and base_model is not None:
        raise InputError(f"--backend {backend}: merge the LoRA adapter first (--base-model is for --backend hf)")
    if backend == "vllm-server" and not server_url:
        raise InputError("--backend vllm-server: give the server's --server-url (http://host:port)")
    flag, source = ("--tokenizer", tokenizer) if tokenizer is not None else ("--model", model_path)
    tok = tokenizer_for(source, label=flag)
    if backend == "vllm-server":
        from ..serving.completions import CompletionsClient
        from ..serving.http import Endpoint, api_key_from_env
        from .server import ServerBackend

        key = api_key_from_env(server_api_key_env, "--server-api-key-env")
        endpoint = Endpoint(server_url, api_key=key, timeout=server_timeout, key="--server-url")
        return ServerBackend(CompletionsClient(endpoint, server_model), tok, tokenizer_flag=flag)
    if backend == "vllm":
        from .vllm_engine import VLLMBackend

        return VLLMBackend(model_path, tokenizer=tok, dtype=dtype)
    model = load_causal_lm(model_path, base=base_model, dtype=dtype, name="--model")
    return HFBackend(model, tok, device=device)
