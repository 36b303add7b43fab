"""Shared helpers of the fault suite: tiny configs and the CLI, in process and as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from adakd.cli import main
from adakd.train import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny-cpu.yaml"


def tiny(tmp_path: Path, *overrides: str, name: str = "run"):
    """The tiny CPU config, writing into ``tmp_path/name``, logging every step."""
    base = [
        f"training.output_dir={tmp_path / name}",
        "training.logging_steps=1",
        "training.disable_tqdm=true",
        "data.synthetic_size=64",
        # These tests name the logits path's messages (teacher *logits*); the ones about the fused path say so.
        "loss.fused=false",
    ]
    return load_config(TINY, [*base, *overrides])


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``adakd ARGS`` in process; (exit status, stderr)."""
    code = main(list(args))
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str) -> str:
    """Assert the CLI's error contract (status 2, one ``adakd: error:`` line, no traceback); return the line."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("adakd: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def cli_subprocess(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "adakd", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def small_disk(folder: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` (e.g. ``"64k"``) on ``folder`` (created) for a test of a full disk; False where
    mounting is not allowed (not root, a container without the capability): the caller falls back to injecting the
    error. Unmount with :func:`unmount`."""
    folder.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def one_line(code: int, err: str, status: int) -> str:
    """The CLI's error contract for exit ``status``: one ``adakd: error:`` line and no traceback; the line."""
    assert code == status, err
    lines = [line for line in err.splitlines() if line.startswith("adakd: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
