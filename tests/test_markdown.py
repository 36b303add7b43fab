"""The one markdown table writer: escaping and alignment."""

from __future__ import annotations

import pytest

from adakd.markdown import table


def test_table_escapes_pipes_and_aligns():
    assert table(["a", "b|c"], [[1, "x|y"]]) == "| a | b\\|c |\n|---|---|\n| 1 | x\\|y |"
    assert table(["", "n"], [["r", 2]], [":---", "---:"]).splitlines()[1] == "| :--- | ---: |"
    with pytest.raises(ValueError, match="align has 1 markers for 2 columns"):
        table(["a", "b"], [], ["---"])
