"""Resident memory over a training run: does a long run keep growing?

Runs ``adakd train CONFIG`` in a child process per variant, samples the child's resident set size (VmRSS, from
/proc) every ``--interval`` seconds, and places each sample on the step being trained through the wall time that
every ``metrics.jsonl`` row carries. Prints, per variant, the peak over the first ``--early`` steps, the peak over
the whole run and their ratio (a run whose memory does not grow stays within a few percent), and writes the samples
as JSON (and a chart with ``--plot``).

    python bench/memory_bench.py configs/smollm2/rkl-adakd.yaml --steps 200 --output bench/results/memory \\
        --variant default: --variant no-trim:ADAKD_MALLOC_TRIM=0

A variant is ``NAME:ENV=VALUE,ENV=VALUE`` (environment variables for the child; empty for none). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _tree_rss(pid: int) -> int:
    """RSS of ``pid`` and its children (data-loader workers, if any)."""
    total = _rss_bytes(pid) or 0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(_tree_rss(int(c)) for c in children)


def run_variant(config: str, name: str, env: dict[str, str], steps: int, out: Path, overrides: list[str],
                interval: float) -> dict:  # fmt: skip
    """Train one variant, sampling its memory; returns {"name", "env", "samples": [[t, rss]], "rows": [[step, t]]}."""
    run_dir = out / name
    cmd = [sys.executable, "-m", "adakd", "train", config, f"training.output_dir={run_dir}",
           f"training.max_steps={steps}", "training.logging_steps=1", "training.save_strategy=no",
           "training.disable_tqdm=true", *overrides, "--overwrite"]  # fmt: skip
    log = (out / f"{name}.log").open("w")
    child = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    samples = []
    while child.poll() is None:
        samples.append([time.time(), _tree_rss(child.pid)])
        time.sleep(interval)
    if child.returncode != 0:
        raise SystemExit(f"{name}: adakd train exited {child.returncode}; see {out / f'{name}.log'}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [[r["step"], r["time"]] for r in rows if "loss" in r and "time" in r]
    return {"name": name, "env": env, "samples": samples, "rows": rows}


def summarise(result: dict, early: int) -> dict:
    """Peak RSS up to step ``early`` and over the whole run (GB), their ratio, and the RSS by step."""
    rows = result["rows"]
    end_early = next((t for step, t in rows if step >= early), None)
    samples = [(t, rss) for t, rss in result["samples"] if rss]
    if end_early is None or not samples:
        raise SystemExit(f"{result['name']}: the run has no step {early}; give more --steps or a smaller --early")
    first_step = rows[0][1]
    early_peak = max(rss for t, rss in samples if t <= end_early)
    peak = max(rss for _, rss in samples)
    by_step = []
    for step, t in rows:
        near = [rss for ts, rss in samples if ts <= t]
        by_step.append([step, near[-1] if near else None])
    return {
        "name": result["name"],
        "early_peak_gb": early_peak / 1e9,
        "peak_gb": peak / 1e9,
        "ratio": peak / early_peak,
        "steps": rows[-1][0],
        "seconds": rows[-1][1] - first_step,
        "by_step": by_step,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--early", type=int, default=50, help="the peak after this many steps is the baseline")
    p.add_argument("--variant", action="append", default=None, help="NAME:ENV=VALUE,...; repeatable")
    p.add_argument("--output", type=Path, default=Path("bench/results/memory"))
    p.add_argument("--interval", type=float, default=0.25)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="key.sub=value for adakd train")
    args = p.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    variants = []
    for spec in args.variant or ["default:"]:
        name, _, env = spec.partition(":")
        variants.append((name, dict(kv.split("=", 1) for kv in env.split(",") if kv)))
    summaries = []
    for name, env in variants:
        result = run_variant(args.config, name, env, args.steps, args.output, args.overrides, args.interval)
        (args.output / f"{name}.json").write_text(json.dumps(result))
        s = summarise(result, args.early)
        summaries.append(s)
        print(f"{name}: peak {s['peak_gb']:.2f} GB over {s['steps']} steps, {s['early_peak_gb']:.2f} GB over the "
              f"first {args.early}: ratio {s['ratio']:.3f} ({s['seconds']:.0f} s)", flush=True)  # fmt: skip
    print(f"\n| variant | peak, first {args.early} steps (GB) | peak, {args.steps} steps (GB) | ratio |")
    print("|---|---:|---:|---:|")
    for s in summaries:
        print(f"| {s['name']} | {s['early_peak_gb']:.2f} | {s['peak_gb']:.2f} | {s['ratio']:.3f} |")
    (args.output / "summary.json").write_text(json.dumps(summaries, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        for s in summaries:
            pts = [(step, rss / 1e9) for step, rss in s["by_step"] if rss]
            ax.plot([a for a, _ in pts], [b for _, b in pts], label=s["name"])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("resident memory (GB)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
