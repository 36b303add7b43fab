"""The real vLLM fixtures (:mod:`.real_vllm`), defined once for the folder: a session-scoped fixture imported into
two test modules would be two fixtures, and start two servers."""

from .real_vllm import vllm_env, vllm_server  # noqa: F401
