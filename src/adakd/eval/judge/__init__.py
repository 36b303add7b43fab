"""LLM-as-judge evaluation: pairwise comparison of two answers by a chat model (the AdaKD paper's protocol).

Following MiniLLM / DistiLLM, a strong chat model compares a student's answers with either the dataset's reference
answers or another model's answers, with the reference answer shown to the judge. Each pair is judged in both orders
(A as answer 1, then A as answer 2) so that the judge's position bias cancels: A wins only when both orders prefer A,
loses only when both prefer B, and everything else is a tie.

The judge is any OpenAI-compatible chat-completions server (OpenAI, vLLM, SGLang, llama.cpp, TGI, ...), reached with
the official ``openai`` SDK (the ``judge`` extra), which also does the retrying::

    with ChatClient("http://localhost:8000/v1", "Qwen2.5-72B-Instruct") as client:
        with JudgeCache("judge.cache.jsonl") as cache:
            examples = judge_pairs(pairs, client, cache=cache, concurrency=8)
    summary = aggregate(examples)

Replies are cached by a hash of (URL, model, temperature, max_tokens, messages), one JSON line each, so that an
interrupted or repeated run never pays twice for the same judgement.

The modules: :mod:`.defaults` (no imports, read by the CLI), :mod:`.prompts` (the prompt and verdict parsing),
:mod:`.client` (the HTTP client), :mod:`.cache` (the reply cache), :mod:`.pairs` (prediction files to pairs) and
:mod:`.run` (judging a run and summing it up). Importing this package does not import ``openai``.
"""

from .cache import JudgeCache
from .client import ChatClient, JudgeRequestError, chat_completions_url
from .defaults import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE
from .pairs import Pair, load_predictions, make_pairs
from .prompts import SYSTEM_PROMPT, USER_TEMPLATE, build_messages, parse_verdict
from .run import aggregate, judge_pairs

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_TEMPERATURE",
    "SYSTEM_PROMPT",
    "USER_TEMPLATE",
    "ChatClient",
    "JudgeCache",
    "JudgeRequestError",
    "Pair",
    "aggregate",
    "build_messages",
    "chat_completions_url",
    "judge_pairs",
    "load_predictions",
    "make_pairs",
    "parse_verdict",
]
