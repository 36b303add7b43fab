"""Every file adakd writes goes through one atomic writer: a failure mid-write leaves the old file whole."""

from __future__ import annotations

import json

import pytest
import torch

from adakd.files import atomic_write, torch_save, write_json, write_jsonl


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_json(path, {"a": 1})

    def half(tmp):
        tmp.write_text('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_writers_round_trip(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"x": "é"}, {"x": 2}])
    assert [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text(encoding="utf-8").splitlines()] == [
        {"x": "é"}, {"x": 2},
    ]  # fmt: skip
    torch_save({"t": torch.arange(3)}, tmp_path / "state.pt")
    assert torch.equal(torch.load(tmp_path / "state.pt")["t"], torch.arange(3))
