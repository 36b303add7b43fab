"""The import structure: the math modules import only torch (and each other), and nothing imports in a cycle."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import adakd

MATH = {"adakd", "adakd._version", "adakd._without_numpy", "adakd.adaptive", "adakd.controllers", "adakd.divergences",
        "adakd.errors", "adakd.fused", "adakd.fused.function", "adakd.fused.measures", "adakd.fused.outcome",
        "adakd.fused.plans", "adakd.fused.sources", "adakd.fused.terms", "adakd.labels", "adakd.loss",
        "adakd.loss_mix", "adakd.loss_options", "adakd.loss_paths", "adakd.loss_report", "adakd.shapes",
        "adakd.sparse"}  # fmt: skip

PROBE = """
import json, sys
import torch
base = set(sys.modules)
import adakd
new = sorted(set(sys.modules) - base)
print(json.dumps(new))
"""


def test_the_public_losses_load_only_torch_and_the_math_modules():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    foreign = [m for m in loaded if m.split(".")[0] not in sys.stdlib_module_names | {"adakd", "torch"}]
    assert not foreign, foreign  # e.g. numpy, transformers, yaml: the losses must work with torch alone
    ours = {m for m in loaded if m.split(".")[0] == "adakd"}
    assert ours == MATH, ours ^ MATH


@functools.cache
def _architecture():
    """tools/architecture.py, the one parser of adakd's imports (it is not a package module)."""
    import importlib.util

    path = Path(__file__).parents[1] / "tools" / "architecture.py"
    spec = importlib.util.spec_from_file_location("architecture", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _module_level_imports(path: Path, name: str, is_package: bool) -> set[str]:
    """The adakd modules that ``name`` imports at module level (function-level imports are lazy by design)."""
    return _architecture().imports(path, name, is_package, local=False)


def test_no_import_cycles():
    root = Path(adakd.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {n: _module_level_imports(p, n, pkg) & modules.keys() for n, (p, pkg) in modules.items()}
    # A package's __init__ importing its own submodules is not a cycle; a submodule importing its package is only
    # a cycle if that goes round, which the search below finds through the real edges.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if m == n or (m.startswith(n + ".") and modules[n][1]):
                continue
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m) :] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
