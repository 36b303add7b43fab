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


def circles(local: bool = True) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module), each sorted."""
    mods = modules()
    graph = {}
    for name, (path, is_package) in mods.items():
        targets = imports(path, name, is_package, local) & mods.keys()
        # An edge to one's own ancestor package is not followed (a submodule running `from . import x` needs x, which
        # the edge to x records); a package's edges to its submodules are (importing the package runs them).
        graph[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
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
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
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
    print(f"autograd.Function classes: {m['autograd_functions']}; '# fmt: skip' lines: {m['fmt_skip_lines']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
