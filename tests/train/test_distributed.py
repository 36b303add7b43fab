"""Several processes on the CPU (gloo) through the real launcher: DDP, FSDP2 and DeepSpeed ZeRO-3, logits and fused
loss paths. The property proven is the one users need: after training, every rank's student parameters are the same
and equal a single-process run over the same global batches (not merely a shared LATF ratio).

Each test launches ``tests/train/distributed/worker.py`` with ``torchrun --nproc_per_node=2``; the single-process
reference is the same worker under plain ``python`` with twice the per-device batch. ``selection: all`` and
``temperature: fixed`` make the loss independent of how a batch is split, so the runs must agree to float error.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "train" / "distributed" / "worker.py"
_PORTS = itertools.count(29600 + os.getpid() % 200)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 4
COMMON = [
    "loss.selection=all",
    "loss.temperature=fixed",
    f"training.max_steps={STEPS}",
    "training.save_strategy=steps",
    "training.save_steps=2",  # checkpoint-2 is what the resume tests continue from
    "training.logging_steps=1",
    "training.disable_tqdm=true",
    "data.synthetic_size=64",
    "training.ddp_timeout=300",  # a collective that waits longer fails by itself, in every worker
]
PER_DEVICE = 4  # two ranks × 4 sequences = the single process's 8
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def engines(*names: str) -> list:
    """Engine parameters; DeepSpeed's tests skip where it is not installed."""
    skip = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
    return [pytest.param(n, marks=skip) if n == "deepspeed" else n for n in names]


ENGINES = engines("ddp", "fsdp2", "deepspeed")


def launch(
    out: Path,
    engine: str,
    *overrides: str,
    resume: Path | None = None,
    poison_rank: int | None = None,
    timeout: float = 600,
):
    """Run the worker (two processes unless ``engine == 'single'``); return each rank's results."""
    if engine == "single":
        cmd = [sys.executable, str(WORKER)]
        batch = 2 * PER_DEVICE
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={next(_PORTS)}", str(WORKER)]
        batch = PER_DEVICE
    cmd += ["--engine", engine, "--out", str(out / "results")]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    if poison_rank is not None:
        cmd += ["--poison-rank", str(poison_rank)]
    cmd += [
        *COMMON,
        f"training.output_dir={out / 'run'}",
        f"training.per_device_train_batch_size={batch}",
        *overrides,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = out / f"{engine}.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as sink:  # a file, not a pipe: a stray worker cannot block the reading
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun ends its workers (each in its own session) when it is terminated.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"the {engine} run did not finish within {timeout:.0f} s (a hang):\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-8000:]
    ranks = 1 if engine == "single" else 2
    return [torch.load(out / "results" / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_close_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=rtol * float(b[k].abs().max()), msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Single-process references, one per loss path, computed once."""
    cache: dict[bool, dict] = {}

    def get(fused: bool) -> dict:
        if fused not in cache:
            out = tmp_path_factory.mktemp(f"single-{'fused' if fused else 'logits'}")
            cache[fused] = launch(out, "single", f"loss.fused={str(fused).lower()}")[0]
        return cache[fused]

    return get


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    """Two-process runs, one per (engine, loss path), computed once: (output folder, per-rank results)."""
    cache: dict[tuple[str, bool], tuple[Path, list[dict]]] = {}

    def get(engine: str, fused: bool) -> tuple[Path, list[dict]]:
        key = (engine, fused)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{engine}-{'fused' if fused else 'logits'}")
            cache[key] = out, launch(out, engine, f"loss.fused={str(fused).lower()}")
        return cache[key]

    return get


def assert_really_sharded(result: dict, engine: str) -> None:
    """The engine holds what it should: FSDP2 and ZeRO-3 keep half of each model on each of the two ranks (a
    silent fall-back to DDP would hold whole replicas), DDP whole replicas."""
    assert result["engine"] == engine and result["world"] == 2
    for model in ("student", "teacher"):
        fraction = result[model]["fraction"]
        if engine == "ddp":
            assert fraction == 1.0, (model, result[model])
        else:
            assert fraction == pytest.approx(0.5, abs=0.02), (model, result[model])


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("engine", ENGINES)
def test_every_rank_equals_the_single_process_run(engine, fused, engine_run, single):
    out, (rank0, rank1) = engine_run(engine, fused)
    reference = single(fused)
    assert_really_sharded(rank0, engine)
    assert rank0["global_step"] == rank1["global_step"] == reference["global_step"] == STEPS
    # The ranks agree exactly: one all-reduced (or reduce-scattered) gradient, one update.
    assert max_diff(rank0["params"], rank1["params"]) == 0.0
    assert_close_params(rank0["params"], reference["params"])
    # The training moved the weights well beyond the tolerance: the comparison is not between untrained models.
    assert max_diff(reference["params"], reference["initial"]) > 1e-3


def test_ddp_from_a_whole_vocabulary_cache_equals_the_single_process_live_run(tmp_path, single):
    # The cache's rows reach each rank through its own collator (by example index): with k = the student's
    # vocabulary the two ranks' parameters equal the single-process run with the live teacher.
    from adakd.cache import build_cache
    from adakd.train import load_config

    common = [*COMMON, "loss.fused=true", f"training.output_dir={tmp_path / 'cache-run'}"]
    build_cache(load_config(ROOT / "configs" / "tiny-cpu.yaml", common), str(tmp_path / "cache"), top_k=288,
                dtype="float32")  # fmt: skip
    rank0, rank1 = launch(tmp_path / "ddp", "ddp", "loss.fused=true", f"teacher.cache={tmp_path / 'cache'}")
    assert rank0["teacher"] is None
    reference = single(True)
    assert_close_params(rank0["params"], reference["params"])
    assert_close_params(rank1["params"], reference["params"])
    assert rank0["ratio"] == rank1["ratio"] == reference["ratio"]


def test_ddp_from_a_served_teacher_equals_the_single_process_live_run(tmp_path):
    # teacher.server under two processes: each rank asks the server for its own micro-batches (nothing is rank 0's
    # alone). With top_k = the vocabulary the served teacher is the whole distribution, so both ranks' parameters
    # equal a single-process run with the live teacher.
    from adakd.data import tokenizer_for
    from adakd.train import load_config
    from adakd.train.models import load_model

    from ..serving.fake_vllm import FakeVLLM

    same = ["teacher.config.vocab_size=288", "loss.fused=true"]  # no padding rows the server could not crop
    config = load_config(ROOT / "configs" / "tiny-cpu.yaml", [*COMMON, *same, f"training.output_dir={tmp_path}"])
    teacher = load_model(config.teacher, "teacher", device="cpu")  # the weights the workers would build
    reference = launch(tmp_path / "single", "single", *same)[0]
    with FakeVLLM(teacher, tokenizer_for("byte"), name="tiny", max_logprobs=288) as fake:
        served = [f"teacher.server.url={fake.url}", "teacher.server.model=tiny", "teacher.server.top_k=288"]
        rank0, rank1 = launch(tmp_path / "ddp", "ddp", *same, *served)
        asked = sum(path == "/v1/completions" for path in fake.log)
    assert rank0["teacher"] is None and rank0["world"] == 2
    assert asked >= 2 * STEPS  # every rank's micro-batch of every step, plus the checks
    assert max_diff(rank0["params"], rank1["params"]) == 0.0
    assert_close_params(rank0["params"], reference["params"])
    assert rank0["ratio"] == rank1["ratio"] == reference["ratio"]


@pytest.mark.parametrize("engine", ENGINES)
def test_final_model_loads_with_from_pretrained(engine, engine_run):
    from transformers import AutoModelForCausalLM

    out, (rank0, _) = engine_run(engine, True)
    model = AutoModelForCausalLM.from_pretrained(out / "run" / "final")
    loaded = {k: v.detach().float() for k, v in model.named_parameters()}
    assert loaded.keys() == rank0["params"].keys()
    assert max_diff(loaded, rank0["params"]) == 0.0


@pytest.mark.parametrize("engine", engines("fsdp2", "deepspeed"))
def test_resume_under_the_engine_continues_exactly(engine, engine_run, tmp_path):
    out, (straight, _) = engine_run(engine, True)
    resumed = launch(tmp_path, engine, "loss.fused=true", resume=out / "run" / "checkpoint-2")
    assert resumed[0]["global_step"] == STEPS
    assert max_diff(resumed[0]["params"], straight["params"]) == 0.0
    assert max_diff(resumed[0]["params"], resumed[1]["params"]) == 0.0


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_rank_with_only_nonfinite_batches_does_not_hang(engine, tmp_path):
    """Rank 1's teacher gives NaN on every micro-batch; under ``nonfinite: skip`` it still enters every collective
    (the gradient reduction and LATF's all-reduce), so the run finishes (``launch`` has a timeout) with both ranks
    equal, and the skips counted on rank 1 only. LATF moves at every step here, on the ranks' shared loss."""
    latf = ["loss.selection=latf", "loss.temperature=inverse", "loss.nonfinite=skip", "loss.ema_decay=0.0",
            "loss.tolerance=0.0", "loss.step_size=0.2", "loss.warmup_steps=1", "loss.min_ratio=0.2"]  # fmt: skip
    # A hang is bounded: the run takes about 15 s here (the DeepSpeed extension is not involved).
    rank0, rank1 = launch(tmp_path, engine, "loss.fused=true", *latf, poison_rank=1, timeout=180)
    assert rank1["skipped"] == STEPS and rank0["skipped"] == 0
    assert max_diff(rank0["params"], rank1["params"]) == 0.0
    assert rank0["ratio"] == rank1["ratio"] < 1.0


def test_lora_student_under_fsdp2_equals_the_single_process_run(tmp_path):
    lora = ["student.lora.r=4", "student.lora.alpha=8", "student.lora.dropout=0.0", "loss.fused=true"]
    reference = launch(tmp_path / "single", "single", *lora)[0]
    rank0, rank1 = launch(tmp_path / "fsdp2", "fsdp2", *lora)
    assert_really_sharded(rank0, "fsdp2")
    assert any("lora_" in k for k in rank0["params"])
    assert max_diff(rank0["params"], rank1["params"]) == 0.0
    assert_close_params(rank0["params"], reference["params"])
    assert (tmp_path / "fsdp2" / "run" / "final" / "adapter_config.json").is_file()
