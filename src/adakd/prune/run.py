"""``adakd prune`` as a function: load the teacher, measure its layers, choose, prune, measure the CE, save.

The checks that need no model come first (flags, the output folder, the calibration file and its records), so that
a bad flag or line is reported in a second, not after loading a large teacher.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import InputError
from ..files import input_file, write_json
from .calibration import batches, read_calibration
from .layers import METHODS, check_keep, choose_layers, contiguous_block, decoder_layers, prune_layers
from .measure import layer_scores, mean_cross_entropy

__all__ = ["PruneOptions", "check_output", "prune_teacher", "save_atomically"]

RECORD = "prune.json"
DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class PruneOptions:
    """What ``adakd prune`` is asked (its flags; see ``docs/prune.md``). ``method`` None: ``importance``, or the
    explicit ``keep``."""

    teacher: str
    output: str
    layers: int | None = None
    method: str | None = None
    keep: list[int] | None = None
    calibration: str | None = None
    calibration_examples: int = 64
    eval_examples: int = 32
    max_length: int = 256
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    compare: bool = False
    overwrite: bool = False
    progress: bool = True


def check_options(opts: PruneOptions) -> None:
    """The flags' own checks, before anything is read."""
    if opts.method is not None and opts.method not in METHODS:
        raise InputError(f"--method {opts.method}: unknown; valid: {', '.join(METHODS)}")
    if opts.keep is not None and opts.method is not None:
        raise InputError(f"--keep and --method {opts.method}: give one of them (--keep names the layers itself)")
    if opts.keep is None and opts.layers is None:
        raise InputError("--layers N: required (or --keep i,j,...)")
    if opts.layers is not None and opts.layers < 1:
        raise InputError(f"--layers {opts.layers}: must be at least 1")
    for flag, value, least in (("--calibration-examples", opts.calibration_examples, 1),
                               ("--eval-examples", opts.eval_examples, 0), ("--max-length", opts.max_length, 2),
                               ("--batch-size", opts.batch_size, 1)):  # fmt: skip
        if value < least:
            raise InputError(f"{flag} {value}: must be at least {least}")
    if opts.dtype not in DTYPES:
        raise InputError(f"--dtype {opts.dtype}: unknown; valid: {', '.join(DTYPES)}")
    measured = (opts.method or ("importance" if opts.keep is None else None)) in ("importance", "contiguous")
    if opts.calibration is None and (measured or opts.compare):
        what = "--compare" if opts.compare and not measured else f"--method {opts.method or 'importance'}"
        raise InputError(f"{what} measures the layers on data: give --calibration FILE (a JSONL file)")
    if opts.calibration is not None:
        input_file(opts.calibration, "--calibration")
    check_output(opts.output, opts.overwrite)


def check_output(output: str, overwrite: bool) -> None:
    """An output folder that exists is replaced only with ``--overwrite``; a file never."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise InputError(f"--output {output}: exists and is not a folder")
    if path.exists() and not overwrite:
        raise InputError(f"--output {output}: exists; pass --overwrite to replace it")


def prune_teacher(opts: PruneOptions) -> dict[str, Any]:
    """Run ``adakd prune`` and return what it recorded in ``prune.json`` (plus ``compare``'s rows when asked).

    Scoring reads the first ``calibration_examples`` records of ``--calibration``, the CE the next
    ``eval_examples`` (a disjoint slice, so that the CE is not measured on the text that chose the layers).
    """
    check_options(opts)
    from ..data import tokenizer_for
    from ..models import load_causal_lm

    tokenizer = tokenizer_for(opts.teacher, label="TEACHER")
    score_batches = eval_batches = None
    if opts.calibration is not None:
        wanted = opts.calibration_examples + opts.eval_examples
        examples = read_calibration(
            opts.calibration, tokenizer, limit=wanted, max_length=opts.max_length, tokenizer_name=opts.teacher
        )
        held_out = examples[opts.calibration_examples :]
        if opts.eval_examples and not held_out:
            raise InputError(
                f"--calibration {opts.calibration}: {len(examples)} records, none left after --calibration-examples "
                f"{opts.calibration_examples} to measure the CE on (--eval-examples 0 skips it)"
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        score_batches = batches(examples[: opts.calibration_examples], opts.batch_size, pad)
        eval_batches = batches(held_out, opts.batch_size, pad) if held_out else None

    model = load_causal_lm(opts.teacher, dtype=opts.dtype, name="TEACHER")
    num_layers = len(decoder_layers(model, f"TEACHER {opts.teacher}"))
    model.to(opts.device).eval()
    if opts.keep is not None:
        keep = check_keep(opts.keep, num_layers, opts.layers)
        n = len(keep)
    else:
        keep, n = None, opts.layers
        if n >= num_layers:
            raise InputError(f"--layers {n}: must be below the teacher's {num_layers} layers")
    method = "keep" if opts.keep is not None else opts.method or "importance"

    scores = None if score_batches is None else layer_scores(model, _bar(score_batches, "scoring", opts))
    # The chosen layers first; with --compare, every method's too (measured alike, on the held-out text).
    candidates = {method: keep if keep is not None else choose_layers(method, n, num_layers, scores)}
    for name in METHODS if opts.compare else ():
        candidates.setdefault(name, choose_layers(name, n, num_layers, scores))
    ce: dict[str, dict[str, Any]] = {}
    if eval_batches is not None:
        ce["teacher"] = mean_cross_entropy(model, _bar(eval_batches, "CE teacher", opts))
        for name, kept in candidates.items():
            if name in ce:
                continue
            view = prune_layers(model, kept, share_weights=True)  # shares the teacher's tensors: no copy to measure
            ce[name] = mean_cross_entropy(view, _bar(eval_batches, f"CE {name}", opts))
            del view

    student = prune_layers(model, candidates[method], share_weights=True)  # the teacher is not used after this
    record = _record(opts, method, num_layers, candidates[method], scores, ce)
    if opts.compare:
        record["compare"] = [{"method": name, "kept": kept, **ce.get(name, {})} for name, kept in candidates.items()]
    save_atomically(opts.output, student, tokenizer, record, opts.overwrite)
    return record


def _record(
    opts: PruneOptions,
    method: str,
    num_layers: int,
    kept: list[int],
    scores: dict[str, Any] | None,
    ce: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """``prune.json``: where the student comes from and what it measured."""
    removed = num_layers - len(kept)
    block = None
    if scores is not None:
        import torch

        start, cost = contiguous_block(torch.as_tensor(scores["angular_distance"]), removed)
        block = {"start": start, "length": removed, "angular_distance": cost}
    calibration = None
    if opts.calibration is not None:
        calibration = {"file": opts.calibration, "scoring_examples": opts.calibration_examples,
                       "eval_examples": opts.eval_examples, "max_length": opts.max_length}  # fmt: skip
    return {
        "teacher": opts.teacher,
        "teacher_layers": num_layers,
        "method": method,
        "layers": len(kept),
        "kept": kept,
        "removed": [i for i in range(num_layers) if i not in kept],
        "scores": None if scores is None else {**scores, "contiguous_block": block},
        "calibration": calibration,
        "ce": {"teacher": ce.get("teacher"), "pruned": ce.get(method)} if ce else None,
        "dtype": opts.dtype,
        "adakd_version": __version__,
    }


def save_atomically(output: str, model: Any, tokenizer: Any, record: dict[str, Any], overwrite: bool) -> Path:
    """Write the model (safetensors, config, generation config), the tokenizer (with its chat template) and
    ``prune.json`` into a temporary folder beside ``output``, then rename it to ``output``: a crash leaves the old
    folder or nothing, never half a model. With ``overwrite``, an existing ``output`` is moved aside first and
    deleted once the new one is in place."""
    out = Path(output)
    check_output(output, overwrite)  # again: the folder may have appeared while the teacher was measured
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / RECORD, record)
        # A folder cannot be renamed over a non-empty one: the old one steps aside, and comes back if the new one
        # cannot take its place.
        moved = out.exists()
        if moved:
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if moved:
                os.replace(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _bar(items: list[Any], desc: str, opts: PruneOptions) -> Any:
    """``items`` behind a tqdm bar (batches), unless progress is off."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"adakd prune: {desc}", unit="batch", disable=not opts.progress, leave=False)
