"""The README's Python examples run as written, and its CI command blocks exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_examples_run(index, capsys):
    code = _blocks("python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_readme_names_one_install_and_one_test_command():
    text = README.read_text()
    for tag in ("ci:install", "ci:test"):
        block = re.search(rf"<!-- {tag} -->\n```bash\n(.*?)```", text, flags=re.S)
        assert block, tag
        assert len(block.group(1).strip().splitlines()) == 1, tag


def test_readme_links_point_at_files_that_exist():
    # The documentation site checks its own pages' links (mkdocs --strict in CI); the README is not one of them.
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "the README links to its documentation pages"
    missing = [t for t in local if not (README.parent / t).exists()]
    assert not missing, missing
