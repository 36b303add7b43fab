"""Servers adakd talks to over HTTP: a teacher served by vLLM (top-k log-probabilities of prompt tokens) and a
generator served by vLLM (OpenAI-compatible ``/v1/completions``). See ``docs/serving.md``."""

from .http import Endpoint, Refusal, api_key_from_env

__all__ = ["Endpoint", "Refusal", "api_key_from_env"]
