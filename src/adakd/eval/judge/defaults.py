"""The judge's defaults, in one module that imports nothing, so that the CLI can show them in ``--help`` without
loading the client."""

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
# The AdaKD paper (following MiniLLM) samples the judge at 0.2: near-deterministic, yet not greedy.
DEFAULT_TEMPERATURE = 0.2
# Room for a short explanation before the verdict line; a truncated reply loses its verdict (and counts as unparsed).
DEFAULT_MAX_TOKENS = 1024
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 4
DEFAULT_CONCURRENCY = 8
