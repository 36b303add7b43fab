"""vLLM generation, run for real (:mod:`tests.serving.real_vllm`): greedy answers of a vLLM server
(``--backend vllm-server``) and of vLLM's engine inside adakd's process (``--backend vllm``, run in the vLLM
environment with this checkout's adakd on the path) against Hugging Face ``generate`` on the first Dolly prompts,
SmolLM2-135M-Instruct in float32 on every side, the same tokenizer and chat template: most answers must be identical.
And on-policy GKD with ``onpolicy.generator: vllm`` trains (tests/train/test_onpolicy_vllm.py's slow test, run in
the vLLM environment).

Why not every answer: the backends compute the same float32 logits with different kernels (summation order), so a
near-tie between the two most likely tokens can flip somewhere in a long greedy answer, and the answers part there.
``ADAKD_AGREEMENT_N`` sets how many prompts (default 8, about a minute per backend on 2 cores); the figures in
docs/serving.md are for 20.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .real_vllm import in_vllm_env

pytestmark = pytest.mark.slow
N = int(os.environ.get("ADAKD_AGREEMENT_N", "8"))
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
DATA = Path(os.environ.get("ADAKD_EVAL_DATA") or SHARED / "minillm-eval")


def _flags(model: Path, out: Path) -> list[str]:
    return [
        "eval", "--model", str(model), "--data-dir", str(DATA), "--datasets", "dolly", "--limit", str(N),
        "--seeds", "10", "--greedy", "--chat-template", "--max-length", "384", "--output", str(out), "--quiet",
    ]  # fmt: skip


def _answers(out: Path) -> tuple[list[str], dict]:
    rows = (out.with_name(f"{out.stem}.predictions") / "dolly.seed10.jsonl").read_text().splitlines()
    return [json.loads(r)["prediction"] for r in rows], json.loads(out.read_text())["generation"]


def _agreement(name: str, theirs: list[str], ours: list[str], stats: dict) -> int:
    same = sum(a == b for a, b in zip(theirs, ours, strict=True))
    parted = [len(os.path.commonprefix([a, b])) for a, b in zip(theirs, ours, strict=True) if a != b]
    print(
        f"\n{name} vs hf: {same}/{len(ours)} identical (the others part after {parted} characters); "
        f"{stats['generated_tokens']} tokens at {stats['tokens_per_second']:.1f} tokens/s"
    )
    return same


@pytest.fixture(scope="module")
def hf_answers(vllm_server, tmp_path_factory):
    from adakd.cli import main

    if not (DATA / "dolly" / "valid.jsonl").is_file():
        pytest.skip(f"no Dolly evaluation set in {DATA} (set ADAKD_EVAL_DATA)")
    out = tmp_path_factory.mktemp("hf") / "hf.json"
    # batch size 1: each answer gets max_length − len(prompt) tokens, as vLLM gives it (a batch of generate gives each
    # the room its longest prompt leaves), and no padding
    hf = ["--backend", "hf", "--dtype", "float32", "--device", "cpu", "--batch-size", "1"]
    assert main([*_flags(vllm_server.folder, out), *hf]) == 0
    answers, stats = _answers(out)
    print(f"\nhf: {stats['generated_tokens']} tokens at {stats['tokens_per_second']:.1f} tokens/s")
    return answers


def test_a_vllm_server_answers_as_hf_greedy(vllm_server, hf_answers, tmp_path):
    from adakd.cli import main

    out = tmp_path / "server.json"
    server = ["--backend", "vllm-server", "--server-url", vllm_server.url, "--server-model", vllm_server.model]
    server += ["--batch-size", "8"]
    assert main([*_flags(vllm_server.folder, out), *server]) == 0
    answers, stats = _answers(out)
    assert _agreement("vllm-server", answers, hf_answers, stats) >= N * 3 // 4


def test_the_vllm_engine_in_process_answers_as_hf_greedy(vllm_env, vllm_server, hf_answers, tmp_path):
    out = tmp_path / "engine.json"
    done = in_vllm_env(vllm_env, "-m", "adakd", *_flags(vllm_server.folder, out), "--backend", "vllm",
                       "--dtype", "float32", "--batch-size", "8")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    answers, stats = _answers(out)
    assert _agreement("vllm (in process)", answers, hf_answers, stats) >= N * 3 // 4


def test_on_policy_gkd_trains_with_the_vllm_generator(vllm_env):
    test = "tests/train/test_onpolicy_vllm.py"
    done = in_vllm_env(vllm_env, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow", test)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "1 passed" in done.stdout, done.stdout[-2000:]
