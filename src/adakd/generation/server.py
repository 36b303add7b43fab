"""``adakd eval --backend vllm-server``: answers sampled by a running vLLM server (OpenAI-compatible
``/v1/completions``), from prompts encoded here and answers decoded here with the same tokenizer as the other
backends, so that the texts are comparable with theirs (the HTTP part: :mod:`adakd.serving.completions`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..errors import InputError
from ..serving.completions import CompletionsClient, Sampling
from . import GenerationConfig, _decode_answers, _encode_prompts, _stop_ids

__all__ = ["ServerBackend"]


class ServerBackend:
    """A vLLM server's ``/v1/completions`` behind :meth:`HFBackend.generate`'s contract.

    Prompts are encoded and cut as :class:`adakd.generation.HFBackend` does, and sent as token ids; the answers'
    token ids are decoded here as HFBackend decodes them. Each answer may hold ``max_length − len(prompt)`` tokens (as
    :class:`~adakd.generation.vllm_engine.VLLMBackend`; HFBackend's batched ``generate`` gives every prompt of a
    batch the room left by the batch's longest, the same at batch size 1). Greedy batches go as one request of
    ``batch_size`` prompts; sampled prompts go one per request, ``batch_size`` in flight at a time, because prompt i
    samples with its own seed ``seed + i`` (vLLM's per-request seed; a request's seed applies to all its prompts).

    Args:
        client: the checked server (:class:`adakd.serving.completions.CompletionsClient`).
        tokenizer: the served model's tokenizer (checked against the server's ``/tokenize`` when it has one).
        tokenizer_flag: the flag that named the tokenizer, for messages.
    """

    name = "vllm-server"  # recorded in adakd eval's results (generation.backend), with the server

    def __init__(self, client: CompletionsClient, tokenizer: Any, tokenizer_flag: str = "--tokenizer") -> None:
        self.client, self.tokenizer = client, tokenizer
        client.check_tokenizer(lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer_flag)

    @property
    def served(self) -> dict[str, Any]:
        """The server and the model that generated: ``{"url", "model", "root"}`` (``root``: what the server loaded)."""
        return {"url": self.client.endpoint.url, "model": self.client.model, "root": self.client.root}

    def generate(
        self,
        prompts: list[str],
        seed: int,
        config: GenerationConfig,
        progress=None,
        stop_token_ids: Sequence[int] = (),
    ) -> list[str]:
        """As :meth:`adakd.generation.HFBackend.generate`; prompt i samples with seed ``seed + i``.

        Raises:
            InputError: ``--max-length`` beyond the served model's context, or a request the server refuses.
            adakd.errors.ServerError: the server stops answering (after the endpoint's retries).
        """
        limit = self.client.max_model_len
        if limit is not None and config.max_length > limit:
            raise InputError(f"--max-length {config.max_length} exceeds the served model's max_model_len {limit}")
        encoded = _encode_prompts(self.tokenizer, prompts, config)
        stops = _stop_ids(self.tokenizer, stop_token_ids)
        sampling = Sampling(config.greedy, config.temperature, config.top_p, config.top_k)
        outputs: list[str] = []
        for start in range(0, len(encoded), config.batch_size):
            batch = encoded[start : start + config.batch_size]
            rooms = [max(1, config.max_length - len(ids)) for ids in batch]
            start_time = time.perf_counter()
            if config.greedy:
                answers = self.client.complete(batch, rooms, sampling, stop_token_ids=stops)
            else:
                seeds = [seed + start + i for i in range(len(batch))]
                answers = self.client.complete_each(
                    batch, rooms, sampling, seeds, stop_token_ids=stops, parallel=len(batch)
                )
            config.stats["seconds"] += time.perf_counter() - start_time
            outputs.extend(_decode_answers(self.tokenizer, [a.token_ids for a in answers], stops, config.stats))
            if progress is not None:
                progress.update(len(batch))
        return outputs
