"""The shape of the code, measured from the source: module sizes, long functions, import circles (function-local
imports included, where they hide), ``autograd.Function`` classes and ``# fmt: skip`` lines. `python
tools/architecture.py` prints the figures the redesign is tracked by (docs/development.md); `--json` for tools.

An import circle is a strongly connected component of the graph of adakd modules with an edge for every import, at
module level or inside a function (importing a package runs its ``__init__``, an edge to the submodules it imports;
a submodule's import of its own package is not followed).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "adakd"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_POSITIONAL = 8


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is_package) for every module of adakd."""
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imports(path: Path, name: str, is_package: bool, local: bool) -> set[str]:
    """The adakd modules ``name`` imports: at module level, and with ``local`` inside functions too."""
    tree = ast.parse(path.read_text())
    package = name if is_package else name.rpartition(".")[0]
    nodes = ast.walk(tree) if local else iter(tree.body)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] == "adakd"}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def graph(local: bool = True, packages: bool = False) -> dict[str, set[str]]:
    """Module -> the adakd modules it imports (at module level; with ``local`` inside functions too).

    With ``packages``, importing ``a.b.c`` also runs the ``__init__`` of the packages ``a`` and ``a.b`` (except those
    the importer is inside of, already running): an edge to the node ``a.b.__init__``, whose own edges are the
    package's module-level imports (what running it imports; a PEP 562 ``__getattr__`` imports later, on use)."""
    mods = modules()
    out: dict[str, set[str]] = {}
    for name, (path, is_package) in mods.items():
        targets = imports(path, name, is_package, local) & mods.keys()
        # An edge to one's own ancestor package is not followed (a submodule running `from . import x` needs x, which
        # the edge to x records); a package's edges to its submodules are (importing the package runs them).
        out[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
        if packages:
            own = set(_ancestors(name)) | {name}
            out[name] |= {f"{a}.__init__" for t in targets for a in _ancestors(t) if a not in own}
            if is_package:
                runs = imports(path, name, is_package, local=False) & mods.keys()
                out[f"{name}.__init__"] = {t for t in runs if t != name}
    for node in {t for targets in out.values() for t in targets} - out.keys():
        out[node] = set()  # a package whose __init__ imports nothing
    return out


# The layers, lowest first: a module imports only from its own layer or lower ones. A module's layer is that of its
# own name in LAYER_OF, else of its longest listed prefix. ``adakd`` itself is the public façade, above everything:
# no module of adakd imports it. ``adakd.train`` (the package) and ``adakd.train.runner`` compose everything below.
LAYERS = ("math", "support", "domain", "training", "cache and integrations", "runs", "command line", "façade")
MATH_MODULES = (
    "adakd._version",
    "adakd._without_numpy",
    "adakd.errors",
    "adakd.labels",
    "adakd.divergences",
    "adakd.adaptive",
    "adakd.controllers",
    "adakd.sparse",
    "adakd.shapes",
    "adakd.fused",
    "adakd.loss",
    "adakd.loss_options",
    "adakd.loss_report",
    "adakd.loss_mix",
    "adakd.loss_paths",
    "adakd.window",
)
LAYER_OF = {
    **dict.fromkeys(MATH_MODULES, "math"),
    **dict.fromkeys(("adakd.files", "adakd.markdown", "adakd.memory", "adakd.models", "adakd.serving"), "support"),
    **dict.fromkeys(
        ("adakd.data", "adakd.generation", "adakd.eval", "adakd.analysis", "adakd.prune", "adakd.report"), "domain"
    ),
    "adakd.train.": "training",  # every module inside adakd/train/ but the two below
    **dict.fromkeys(("adakd.cache", "adakd.integrations"), "cache and integrations"),
    **dict.fromkeys(("adakd.train", "adakd.train.runner", "adakd.demo"), "runs"),
    **dict.fromkeys(("adakd.cli", "adakd.__main__"), "command line"),
}


def layer(name: str) -> str:
    """The layer of module ``name`` (see :data:`LAYERS`)."""
    if name == "adakd":
        return "façade"
    if name in LAYER_OF:
        return LAYER_OF[name]
    prefixes = [p for p in LAYER_OF if name.startswith(p if p.endswith(".") else p + ".")]
    if not prefixes:
        raise KeyError(f"{name}: no layer; add it to tools/architecture.py LAYER_OF")
    return LAYER_OF[max(prefixes, key=len)]


def upward_imports() -> list[list[str]]:
    """``[importer, imported, "layer -> higher layer"]`` for every import (function-local ones included) from a
    lower layer to a higher one."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    found = []
    for name, targets in graph(local=True).items():
        for t in sorted(targets):
            if rank[layer(t)] > rank[layer(name)]:
                found.append([name, t, f"{layer(name)} -> {layer(t)}"])
    mods = modules()
    for name, (path, is_package) in mods.items():
        # `from .. import AdaKDLoss`: a name taken from the façade (the graph drops edges to one's own ancestors)
        names = {t for t in imports(path, name, is_package, local=True) if t.rpartition(".")[0] == "adakd"}
        if name != "adakd" and names - mods.keys():
            found.append([name, "adakd", f"{layer(name)} -> façade"])
    return sorted(found)


def long_calls(limit: int = MAX_POSITIONAL) -> list[str]:
    """``module:line`` of every call with more than ``limit`` positional arguments."""
    found = []
    for name, (path, _) in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and len(node.args) > limit:
                found.append(f"{name}:{node.lineno} ({len(node.args)} positional)")
    return found


def packed_calls() -> list[str]:
    """``module:line`` of every call whose argument list ``# fmt: skip`` keeps packed (the marker on the line that
    closes a call spanning several lines or a definition's parameter list); data tables may keep theirs."""
    found = []
    for name, (path, _) in modules().items():
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call):
                closing = node.end_lineno
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                closing = node.body[0].lineno - 1  # the signature's last line
            else:
                continue
            if closing > node.lineno and "# fmt: skip" in lines[closing - 1]:
                found.append(f"{name}:{node.lineno}")
    return sorted(set(found))


def chunk_loops() -> dict[str, int]:
    """Module -> its stepped loops (over row chunks of logits, batches or shards): ``for`` over
    ``range(start, stop, step)`` or over ``x.split(n)``."""
    found: dict[str, int] = {}
    for name, (path, _) in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.For) or not isinstance(node.iter, ast.Call):
                continue
            call = node.iter
            stepped = isinstance(call.func, ast.Name) and call.func.id == "range" and len(call.args) == 3
            split = isinstance(call.func, ast.Attribute) and call.func.attr == "split" and len(call.args) == 1
            if stepped or split:
                found[name] = found.get(name, 0) + 1
    return found


def circles(local: bool = True, packages: bool = False) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module), each sorted; ``local`` and
    ``packages`` as :func:`graph`."""
    edges = graph(local, packages)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def strong(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return sorted(found)


def _code_lines(node: ast.AST, source: list[str]) -> int:
    """Lines of a function without its docstring and blank lines."""
    first = node.body[0] if node.body else None
    value = first.value if isinstance(first, ast.Expr) else None
    has_doc = isinstance(value, ast.Constant) and isinstance(value.value, str)
    start = first.end_lineno if has_doc else node.lineno
    return sum(1 for line in source[start : node.end_lineno] if line.strip())


def measure() -> dict:
    """Every figure, as one JSON-able dict."""
    sizes, long_functions, functions_classes, skips = {}, [], 0, 0
    for name, (path, _) in modules().items():
        text = path.read_text()
        lines = text.splitlines()
        sizes[name] = len(lines)
        skips += sum("# fmt: skip" in line for line in lines)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node, lines)
                if n > MAX_FUNCTION_LINES:
                    long_functions.append([f"{name}.{node.name}", n])
            if isinstance(node, ast.ClassDef) and any(
                (isinstance(b, ast.Attribute) and b.attr == "Function") for b in node.bases
            ):
                functions_classes += 1
    return {
        "modules": len(sizes),
        "lines": sum(sizes.values()),
        "modules_over_limit": sorted([[n, s] for n, s in sizes.items() if s > MAX_MODULE_LINES], key=lambda x: -x[1]),
        "functions_over_limit": sorted(long_functions, key=lambda x: -x[1]),
        "circles_module_level": circles(local=False),
        "circles_all_imports": circles(local=True),
        "circles_with_package_inits": circles(local=True, packages=True),
        "upward_imports": upward_imports(),
        "long_positional_calls": long_calls(),
        "chunk_loops": chunk_loops(),
        "packed_calls": packed_calls(),
        "autograd_functions": functions_classes,
        "fmt_skip_lines": skips,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    m = measure()
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    print(f"{m['modules']} modules, {m['lines']} lines")
    print(f"modules over {MAX_MODULE_LINES} lines: {len(m['modules_over_limit'])}")
    for name, n in m["modules_over_limit"]:
        print(f"  {name}: {n}")
    print(f"functions over {MAX_FUNCTION_LINES} lines of code: {len(m['functions_over_limit'])}")
    for name, n in m["functions_over_limit"]:
        print(f"  {name}: {n}")
    print(f"import circles, module-level imports: {len(m['circles_module_level'])}")
    print(f"import circles, function-local imports included: {len(m['circles_all_imports'])}")
    for c in m["circles_all_imports"]:
        print("  " + ", ".join(c))
    print(f"import circles, package __init__ runs included: {len(m['circles_with_package_inits'])}")
    for c in m["circles_with_package_inits"]:
        print("  " + ", ".join(c))
    print(f"imports from a lower layer to a higher one: {len(m['upward_imports'])}")
    for importer, imported, how in m["upward_imports"]:
        print(f"  {importer} -> {imported} ({how})")
    print(f"calls with more than {MAX_POSITIONAL} positional arguments: {len(m['long_positional_calls'])}")
    for where in m["long_positional_calls"]:
        print(f"  {where}")
    print(f"calls whose arguments '# fmt: skip' packs: {len(m['packed_calls'])}")
    loops = m["chunk_loops"]
    print(
        f"stepped loops (over row chunks, batches or shards): {sum(loops.values())} ("
        + ", ".join(f"{k} {v}" for k, v in sorted(loops.items()))
        + ")"
    )
    print(f"autograd.Function classes: {m['autograd_functions']}; '# fmt: skip' lines: {m['fmt_skip_lines']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
