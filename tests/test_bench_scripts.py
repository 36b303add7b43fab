"""The benchmark and GPU-check scripts run (on the CPU, at tiny shapes), so they cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_gpu_check_passes_on_the_cpu(capsys):
    # The same parity checks gpu_check.sh runs on a GPU, at small shapes (impl='compile' is covered by test_fused).
    assert _load("gpu_check").main(["--device", "cpu", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and " 0 failed" in out


def test_gpu_check_reports_a_failure():
    gpu_check = _load("gpu_check")
    report = gpu_check.Report()
    report.check("an error above its tolerance", 2e-5, 1e-5)
    report.check("a NaN", float("nan"), 1.0)
    assert report.failed == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "variants"),
    [
        ("loss_bench", ["--tokens", "64", "--vocab", "128", "--device", "cpu"], {"plain-kd", "adakd-all", "adakd"}),
        ("fused_bench", ["--tokens", "64", "--vocab", "128", "--h-student", "8", "--h-teacher", "16", "--no-liger"],
         {"naive", "fused", "fused-one-pass"}),
    ],
)  # fmt: skip
def test_benchmarks_run(tmp_path, script, args, variants):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(BENCH / f"{script}.py"), *args, "--repeats", "1", "--warmup", "0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {r["variant"] for r in rows} == variants
    for r in rows:
        assert r["ms"] > 0 and r["extra_bytes"] >= 0
    assert "ratios against" in proc.stdout
