"""Shared measurement for the benchmark scripts: time and extra peak memory, side by side in one run.

Every variant is called once before anything is measured (lazy initialisation, compilation, state such as the
one-pass thresholds). Extra peak memory is what one further call needs beyond what is allocated before it:

- CUDA: ``max_memory_allocated`` during the call minus ``memory_allocated`` before it.
- CPU: there is no allocator counter, so each variant runs in a fresh subprocess (:func:`cpu_row`) with glibc's
  mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``): every buffer above it is mapped on allocation and
  unmapped on free, so the resident set follows the live tensors rather than the heap's high-water mark. The peak
  resident set (VmHWM) is reset through ``/proc/self/clear_refs`` just before the call and compared with the
  resident set (VmRSS) at that moment. That allocator setting costs page faults, so the time is measured in a
  second fresh subprocess with the default allocator.

Times are the median of ``repeats`` calls after ``warmup`` further calls.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def extra_peak_bytes(once: Callable[[], None], device: str) -> int:
    """Peak memory of one call of ``once`` beyond what is allocated before it (see the module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        once()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set (Linux >= 4.0)
    before = _proc_status_bytes("VmRSS")
    once()
    # The kernel updates VmHWM lazily (its RSS counters are per-thread caches synced at intervals), so for a call
    # that allocates almost nothing the reading can fall a few hundred KB below the baseline: a peak cannot.
    return max(0, _proc_status_bytes("VmHWM") - before)


def measure(once: Callable[[], None], device: str, repeats: int, warmup: int, what: str = "both") -> dict:
    """Extra peak memory and median time of ``once`` (inputs already built), after one unmeasured call.

    ``what``: ``both``, ``memory`` or ``time``.
    """
    once()
    result: dict = {}
    if what != "time":
        result["extra_bytes"] = extra_peak_bytes(once, device)
    if what == "memory":
        return result
    for _ in range(warmup):
        once()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        once()
        _sync(device)
        times.append(time.perf_counter() - start)
    result["ms"] = 1e3 * statistics.median(times)
    return result


def run_isolated(script: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``python script args`` in a fresh process; it prints one JSON line last."""
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_row(script: str, worker_args: list[str]) -> dict:
    """Memory and time of one CPU variant, each measured in its own fresh process (see the module docstring)."""
    memory = run_isolated(script, [*worker_args, "--measure", "memory"], env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    timing = run_isolated(script, [*worker_args, "--measure", "time"])
    return {**timing, "extra_bytes": memory["extra_bytes"]}


def cuda_row(run: Callable[[], dict], variant: str) -> dict:
    """Run one CUDA variant in this process; an out-of-memory error becomes a row that says so."""
    try:
        row = run()
    except torch.cuda.OutOfMemoryError:
        row = {"variant": variant, "ms": math.nan, "extra_bytes": math.nan, "error": "out of memory"}
    torch.cuda.empty_cache()
    return row


def step_timer(times: list[float], device: str = "cpu"):
    """A ``transformers.TrainerCallback`` that appends each optimizer step's wall time (seconds) to ``times``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        start = 0.0

        def on_step_begin(self, *args, **kwargs):
            _sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            _sync(device)
            times.append(time.perf_counter() - self.start)

    return StepTimer()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def print_table(rows: list[dict], baseline: str, descriptions: dict[str, str]) -> None:
    """Print rows (``variant``, ``ms``, ``extra_bytes``) with ratios against the ``baseline`` variant."""
    base = next((r for r in rows if r["variant"] == baseline), rows[0])  # NaN ratios where a variant ran out of memory
    width = max(len(r["variant"]) for r in rows) + 1
    print(f"{'variant':<{width}} {'time (ms)':>10} {'extra peak (MB)':>16} {'time ×':>8} {'memory ×':>9}  what")
    for r in rows:
        r["time_ratio"] = r["ms"] / base["ms"]
        r["memory_ratio"] = r["extra_bytes"] / base["extra_bytes"] if base["extra_bytes"] else math.nan
        note = f"  [{r['error']}]" if "error" in r else ""
        print(
            f"{r['variant']:<{width}} {r['ms']:>10.1f} {r['extra_bytes'] / 2**20:>16.0f} {r['time_ratio']:>8.2f} "
            f"{r['memory_ratio']:>9.3f}  {descriptions.get(r['variant'], '')}{note}"
        )
    print(f"(ratios against {base['variant']})")
