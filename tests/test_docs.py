"""The generated documentation is current: docs/errors.md lists every error message the source raises."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _catalogue():
    spec = importlib.util.spec_from_file_location("error_catalogue", ROOT / "tools" / "error_catalogue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_error_catalogue_is_current():
    catalogue = _catalogue()
    assert (ROOT / "docs" / "errors.md").read_text() == catalogue.render(), "run python tools/error_catalogue.py"


def test_error_catalogue_finds_a_raise_and_its_template(tmp_path, monkeypatch):
    catalogue = _catalogue()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.py").write_text(
        "def f(path, n):\n"
        "    raise InputError(f'{path}: expected {n} records')\n"
        "    raise NonFiniteLossError('the loss is NaN')\n"
        "    raise ValueError('a bug, not listed')\n"
    )
    monkeypatch.setattr(catalogue, "SOURCE", tmp_path)
    page = catalogue.render()
    assert "- `…: expected … records`\n" in page
    assert "- `the loss is NaN` *exit 1*\n" in page
    assert "a bug" not in page
