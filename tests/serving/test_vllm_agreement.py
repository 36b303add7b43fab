"""Greedy answers of vLLM (a running server, or the engine in this process) against Hugging Face ``generate`` on the
first 20 Dolly prompts, both in float32 with the same tokenizer: most answers must be identical.

Skipped unless a vLLM is at hand: ``ADAKD_VLLM_URL`` (a running server, its served name in ``ADAKD_VLLM_MODEL``,
default ``smollm2``) and ``ADAKD_VLLM_TOKENIZER`` (the served model's folder, also the model HF and the in-process
engine load); the in-process run also needs ``vllm`` importable. Data: ``$ADAKD_EVAL_DATA`` or the shared
``minillm-eval`` folder.

Why not all 20: the two compute the same float32 logits with different kernels (summation order), so a near-tie
between the top two tokens can flip somewhere in a long greedy answer, and the answers part from there.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

N = 20
SHARED = Path(os.environ.get("ADAKD_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
DATA = Path(os.environ.get("ADAKD_EVAL_DATA") or SHARED / "minillm-eval")
MODEL = os.environ.get("ADAKD_VLLM_TOKENIZER")


def _eval(tmp_path: Path, name: str, *flags: str) -> list[str]:
    from adakd.cli import main

    out = tmp_path / f"{name}.json"
    argv = [
        "eval", "--model", str(MODEL), "--data-dir", str(DATA), "--datasets", "dolly", "--limit", str(N),
        "--seeds", "10", "--greedy", "--dtype", "float32", "--output", str(out), "--quiet", *flags,
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text())["generation"]
    print(f"{name}: {results['generated_tokens']} tokens, {results['tokens_per_second']:.1f} tokens/s")
    rows = (out.with_name(f"{name}.predictions") / "dolly.seed10.jsonl").read_text().splitlines()
    return [json.loads(r)["prediction"] for r in rows]


@pytest.fixture(scope="module")
def hf_answers(tmp_path_factory):
    if not MODEL or not (DATA / "dolly" / "valid.jsonl").is_file():
        pytest.skip("set ADAKD_VLLM_TOKENIZER (the served model's folder) and ADAKD_EVAL_DATA")
    # Batch size 1: each answer gets max_length - len(prompt) tokens, as vLLM gives it, and no padding.
    return _eval(tmp_path_factory.mktemp("hf"), "hf", "--backend", "hf", "--batch-size", "1", "--device", "cpu")


def _agreement(name: str, theirs: list[str], ours: list[str]) -> int:
    same = sum(a == b for a, b in zip(theirs, ours, strict=True))
    prefix = [len(os.path.commonprefix([a, b])) for a, b in zip(theirs, ours, strict=True) if a != b]
    print(f"{name} vs hf: {same}/{len(ours)} identical; the others part after {prefix} characters")
    return same


@pytest.mark.slow
def test_a_vllm_server_answers_as_hf_greedy(hf_answers, tmp_path):
    url = os.environ.get("ADAKD_VLLM_URL")
    if not url:
        pytest.skip("set ADAKD_VLLM_URL to a running vLLM server of ADAKD_VLLM_TOKENIZER's model")
    served = os.environ.get("ADAKD_VLLM_MODEL", "smollm2")
    flags = ("--backend", "vllm-server", "--server-url", url, "--server-model", served, "--batch-size", "8")
    assert _agreement("vllm-server", _eval(tmp_path, "server", *flags), hf_answers) >= 15


@pytest.mark.slow
def test_the_vllm_engine_answers_as_hf_greedy(hf_answers, tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    answers = _eval(tmp_path, "engine", "--backend", "vllm", "--batch-size", "8")
    assert _agreement("vllm", answers, hf_answers) >= 15
