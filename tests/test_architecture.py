"""The code's shape, as tools/architecture.py measures it: the limits the redesign reached, kept.

Each figure is counted from the code itself (its imports, its syntax tree), so a change that adds a circle, an import
up a layer, a sixth chunk loop or a 19-argument call fails here with the place named."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "architecture.py"


@functools.cache
def tool():
    spec = importlib.util.spec_from_file_location("architecture", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def figures() -> dict:
    return tool().measure()


def test_no_import_circle_even_through_function_local_imports_and_package_inits():
    assert figures()["circles_all_imports"] == []
    assert figures()["circles_with_package_inits"] == []


def test_no_import_goes_up_a_layer():
    assert figures()["upward_imports"] == []


def test_every_module_has_a_layer():
    for name in tool().modules():
        tool().layer(name)  # raises KeyError naming a module added without one


def test_no_module_over_400_lines_and_no_function_over_60_lines_of_code():
    assert figures()["modules_over_limit"] == []
    assert figures()["functions_over_limit"] == []


def test_no_long_positional_calls_and_no_argument_lists_packed_by_fmt_skip():
    assert figures()["long_positional_calls"] == []
    assert figures()["packed_calls"] == []


def test_the_fused_math_has_one_chunk_loop_and_one_autograd_function():
    loops = {name: n for name, n in figures()["chunk_loops"].items() if name.split(".")[:2] == ["adakd", "fused"]}
    assert sum(loops.values()) == 1, loops
    assert figures()["autograd_functions"] == 1


def test_the_tool_sees_what_it_counts(tmp_path, monkeypatch):
    """The counters find a circle, an upward import, a long call, a packed call and a chunk loop when there is one."""
    package = tmp_path / "adakd"
    (package / "train").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "labels.py").write_text("def f():\n    from .train import run\n")  # math -> runs: up, and a circle
    (package / "train" / "__init__.py").write_text("from . import run\n")
    (package / "train" / "run.py").write_text(
        "from .. import labels\n"
        "g(1, 2, 3, 4, 5, 6, 7, 8, 9)\n"
        "h(\n    1,\n    2)  # fmt: skip\n"
        "for s in range(0, 10, 2):\n    pass\n"
    )
    monkeypatch.setattr(tool(), "SOURCE", package)
    m = tool().measure()
    assert m["circles_all_imports"] == [["adakd.labels", "adakd.train", "adakd.train.run"]]
    assert ["adakd.labels", "adakd.train", "math -> runs"] in m["upward_imports"]
    assert m["long_positional_calls"] == ["adakd.train.run:2 (9 positional)"]
    assert m["packed_calls"] == ["adakd.train.run:3"]
    assert m["chunk_loops"] == {"adakd.train.run": 1}
