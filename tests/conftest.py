"""Test configuration: deterministic property tests in CI, explorative ones locally."""

from __future__ import annotations

import os

from hypothesis import settings

# In CI every run checks the same examples (a red CI must be reproducible); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
