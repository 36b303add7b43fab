"""The paper's five evaluation sets, in the MiniLLM JSONL layout, selected by name under a data directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import Record, read_minillm_jsonl
from ..errors import InputError

__all__ = ["EVAL_SETS", "EvalSet", "load_eval_set", "resolve_eval_sets"]

# name -> candidate paths under the data directory, the first that exists wins (MiniLLM's layout).
EVAL_SETS: dict[str, tuple[str, ...]] = {
    "dolly": ("dolly/valid.jsonl",),
    "self-inst": ("self-inst/valid.jsonl",),
    "vicuna": ("vicuna/valid.jsonl",),
    "sinst": ("sinst/11_/valid.jsonl",),
    "uinst": ("uinst/11_/valid.jsonl", "uinst-subset1050/valid.jsonl"),
}


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: its name, the file it came from, and its records (prompt and references)."""

    name: str
    path: Path
    records: list[Record]


def resolve_eval_sets(data_dir: str | Path | None, names: list[str]) -> dict[str, Path]:
    """Map each requested set to its file: ``name`` under ``data_dir`` (MiniLLM's layout) or ``name=path``.

    Raises:
        InputError: an unknown name (listing the valid ones) or a missing file (naming the paths tried).
    """
    out: dict[str, Path] = {}
    for item in names:
        name, sep, explicit = item.partition("=")
        if sep:
            path = Path(explicit)
            if not path.is_file():
                raise InputError(f"--datasets {item}: {path} does not exist")
            out[name] = path
            continue
        if name not in EVAL_SETS:
            raise InputError(f"--datasets: unknown set {name!r}; valid: {', '.join(EVAL_SETS)} (or name=path)")
        if data_dir is None:
            raise InputError(f"--data-dir is needed to find {name!r} (or pass {name}=path)")
        candidates = [Path(data_dir) / rel for rel in EVAL_SETS[name]]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise InputError(f"--datasets {name}: none of {', '.join(map(str, candidates))} exists")
        out[name] = found
    return out


def load_eval_set(name: str, path: Path, limit: int | None = None) -> EvalSet:
    """Read one set (``prompt``, ``output`` as one reference or a list of them), its first ``limit`` records.

    Raises:
        InputError: a malformed line (``path:line: reason``) or a record without ``prompt`` / ``output``.
    """
    return EvalSet(name, path, read_minillm_jsonl(path, limit=limit))
