"""adakd.data: templates and readers against the shared MiniLLM data, the example builder's policy, the collator.

Shared data is found through ``ADAKD_SHARED_DATA`` (default ``../shared/data`` beside the repository); tests that
need it skip when it is absent.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adakd.data as data
from adakd.data import (
    DistillCollator,
    Record,
    TokenRecord,
    build_examples,
    format_prompt,
    load_hf_dataset,
    read_instruction_jsonl,
    read_minillm_jsonl,
    read_token_shards,
    synthetic_instructions,
    tokenizer_for,
)
from adakd.data.templates import MINILLM_PROMPT_NO_INPUT, MINILLM_PROMPT_WITH_INPUT
from adakd.errors import InputError

SHARED = Path(os.environ.get("ADAKD_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
EVAL_FILES = {  # file -> record count (see each folder's SOURCE.md)
    "dolly/dev.jsonl": 1000,
    "dolly/valid.jsonl": 500,
    "self-inst/valid.jsonl": 242,
    "vicuna/valid.jsonl": 80,
    "sinst/11_/valid.jsonl": 1694,
    "uinst-subset1050/valid.jsonl": 1050,
}
GPT2_EOS = 50256


def shared(rel: str) -> Path:
    """A path under the shared data folder; skips the test when it is missing."""
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set ADAKD_SHARED_DATA)")
    return path


def shard(name: str) -> Path:
    """The prefix of a dolly GPT-2 token shard (``train_0`` or ``valid_0``)."""
    return shared(f"dolly-train-gpt2-tokens/{name}.idx").with_suffix("")


@pytest.fixture(scope="module")
def gpt2():
    return tokenizer_for(str(shared("tokenizers/gpt2")))


@functools.cache
def _byte_tok():
    # Built once: hypothesis calls its test many times.
    return tokenizer_for("byte")


@pytest.fixture(scope="module")
def byte_tok():
    return _byte_tok()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_public_api():
    assert set(data.__all__) == {
        "Record", "TokenRecord", "TEMPLATES", "format_prompt", "read_minillm_jsonl", "read_instruction_jsonl",
        "read_token_shards", "load_hf_dataset", "synthetic_instructions", "build_examples", "DistillCollator",
        "tokenizer_for", "fit_example", "FORMATS", "CHAT_TEMPLATES", "chat_example", "detect_format", "load_rows",
        "tokenize_rows", "TokenizedData", "ExampleStream", "check_shard_tokenizer",
    }  # fmt: skip
    assert data.FORMATS == ("messages", "prompt_completion", "minillm", "instructions")
    assert data.TEMPLATES == ("minillm", "qwen2")


# ---------------------------------------------------------------------------------------------- templates


@pytest.mark.parametrize("rel", sorted(EVAL_FILES))
def test_minillm_template_reproduces_every_shared_prompt(rel):
    rows = [json.loads(line) for line in shared(f"minillm-eval/{rel}").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == EVAL_FILES[rel]
    for i, row in enumerate(rows):
        assert format_prompt(row["instruction"], row.get("input")) == row["prompt"], f"{rel} record {i}"
    # The instruction reader (raw fields) and the MiniLLM reader (stored prompt) must agree record for record.
    path = shared(f"minillm-eval/{rel}")
    assert read_instruction_jsonl(path) == read_minillm_jsonl(path)


def test_shared_dev_uses_both_template_variants():
    rows = [json.loads(line) for line in shared("minillm-eval/dolly/dev.jsonl").read_text().splitlines()]
    with_input = sum(r["prompt"].startswith(MINILLM_PROMPT_WITH_INPUT[:60]) for r in rows)
    no_input = sum(r["prompt"].startswith(MINILLM_PROMPT_NO_INPUT[:60]) for r in rows)
    assert (with_input, no_input) == (197, 803)


def test_format_prompt_minillm_exact():
    assert format_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert format_prompt("Say hi.", "") == format_prompt("Say hi.", None) == format_prompt("Say hi.")
    assert format_prompt("Sum", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write "
        "a response that appropriately completes the request.\n\n### Instruction:\nSum\n\n### Input:\n1 2\n\n"
        "### Response:\n"
    )
    # Braces in user text are literal, never placeholders.
    assert "### Instruction:\nuse {input} here\n\n### Input:\n{instruction}\n" in format_prompt(
        "use {input} here", "{instruction}"
    )


def test_format_prompt_qwen2_exact():
    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    tail = "<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt("Say hi.", template="qwen2") == head + "Say hi." + tail
    assert format_prompt("Sum", "1 2", template="qwen2") == head + "Sum\n\n1 2" + tail


def test_format_prompt_unknown_template():
    with pytest.raises(InputError, match="unknown template 'alpaca'.*minillm, qwen2"):
        format_prompt("x", template="alpaca")


# ---------------------------------------------------------------------------------------------- JSONL readers


def test_read_minillm_jsonl_sinst_references():
    records = read_minillm_jsonl(shared("minillm-eval/sinst/11_/valid.jsonl"))
    assert len(records) == 1694
    assert all(r.response == r.references[0] for r in records)
    assert sum(len(r.references) > 1 for r in records) == 388
    assert max(len(r.references) for r in records) == 20
    first = records[0]
    assert first.references == ("Cuts fear for 'most vulnerable' students in East Sussex",)
    assert first.prompt.endswith("### Response:\n")


def test_read_minillm_jsonl_limit_and_blank_lines(tmp_path):
    path = write_lines(
        tmp_path / "ok.jsonl",
        [
            json.dumps({"prompt": "P1", "output": "R1"}),
            "",
            "   ",
            json.dumps({"prompt": "P2", "output": ["R2a", "R2b"], "extra": 1}),
            json.dumps({"prompt": "P3", "output": "R3"}),
        ],
    )
    assert read_minillm_jsonl(path) == [
        Record("P1", "R1", ("R1",)),
        Record("P2", "R2a", ("R2a", "R2b")),
        Record("P3", "R3", ("R3",)),
    ]
    assert read_minillm_jsonl(path, limit=2) == read_minillm_jsonl(path)[:2]
    assert read_minillm_jsonl(path, limit=0) == []
    with pytest.raises(InputError, match="limit"):
        read_minillm_jsonl(path, limit=-1)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "P", "output": ', "invalid JSON"),
        ('["prompt", "output"]', "expected a JSON object, got list"),
        ('{"output": "R"}', "missing key 'prompt'"),
        ('{"prompt": "P"}', "missing key 'output'"),
        ('{"prompt": 3, "output": "R"}', "key 'prompt' must be a str, got int"),
        ('{"prompt": "P", "output": 7}', "key 'output' must be a str or a non-empty list of str, got int"),
        ('{"prompt": "P", "output": []}', "got an empty list"),
        ('{"prompt": "P", "output": ["a", 1]}', "got a list with non-str items"),
    ],
)
def test_read_minillm_jsonl_errors_name_path_and_line(tmp_path, bad_line, message):
    # Line 2 is blank, so the bad record is on line 3 of the file (not the 2nd record).
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "P", "output": "R"}), "", bad_line])
    with pytest.raises(InputError) as err:
        read_minillm_jsonl(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_read_instruction_jsonl_dolly_keys_and_templates(tmp_path):
    path = write_lines(
        tmp_path / "dolly.jsonl",
        [
            json.dumps({"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "open_qa"}),
            json.dumps({"instruction": "Summarize.", "context": "Long text.", "response": "Short."}),
            json.dumps({"instruction": "Echo.", "input": "hi", "output": ["hi", "HI"]}),
            json.dumps({"instruction": "No context key.", "output": "ok", "input": None}),
        ],
    )
    records = read_instruction_jsonl(path)
    assert [r.prompt for r in records] == [
        format_prompt("Name a fruit."),
        format_prompt("Summarize.", "Long text."),
        format_prompt("Echo.", "hi"),
        format_prompt("No context key."),
    ]
    assert [r.references for r in records] == [("Apple.",), ("Short.",), ("hi", "HI"), ("ok",)]
    qwen = read_instruction_jsonl(path, template="qwen2", limit=2)
    assert [r.prompt for r in qwen] == [
        format_prompt("Name a fruit.", template="qwen2"),
        format_prompt("Summarize.", "Long text.", template="qwen2"),
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"context": "", "response": "R"}, "missing key 'instruction'"),
        ({"instruction": "I", "context": ""}, "missing key 'response' or 'output'"),
        ({"instruction": "I", "context": 5, "response": "R"}, "key 'context' must be a str, got int"),
        ({"instruction": ["I"], "response": "R"}, "key 'instruction' must be a str, got list"),
    ],
)
def test_read_instruction_jsonl_errors(tmp_path, row, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(row)])
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}:1: {re.escape(message)}"):
        read_instruction_jsonl(path)


def test_read_instruction_jsonl_unknown_template_names_line(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [json.dumps({"instruction": "I", "response": "R"})])
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}:1: unknown template 'chatml'"):
        read_instruction_jsonl(path, template="chatml")


# ---------------------------------------------------------------------------------------------- token shards


def test_dolly_train_shard_counts():
    records = read_token_shards(shard("train_0"))
    assert len(records) == 11435
    # Every item is prompt + separator + response + eos: the sizes add up to the documented token total.
    assert sum(len(r.prompt_ids) + len(r.response_ids) + 2 for r in records) == 1_742_452
    assert all(r.response_ids for r in records)
    assert max(len(r.prompt_ids) for r in records) == 256
    assert all(65535 not in r.prompt_ids and 65535 not in r.response_ids for r in records[:500])
    # MiniLLM's policy on the real train split (prompts <= 256 by construction; 10 sit exactly at the cap).
    eos_only = SimpleNamespace(eos_token_id=GPT2_EOS)
    _, counts = build_examples(records, eos_only, max_length=512, max_prompt_length=255)
    assert counts == {"kept": 11425, "skipped_long_prompt": 10, "truncated": 198, "skipped_empty_response": 0}


def test_dolly_valid_shard_is_dev_jsonl_in_blocks_of_50(gpt2):
    """valid_0 holds the dev.jsonl records, permuted in blocks of 50 (MiniLLM's unordered worker pool)."""
    items = read_token_shards(shard("valid_0"))
    dev = read_minillm_jsonl(shared("minillm-eval/dolly/dev.jsonl"))
    assert len(items) == len(dev) == 1000
    decoded = list(
        zip(
            gpt2.batch_decode([r.prompt_ids for r in items]),
            gpt2.batch_decode([r.response_ids for r in items]),
            strict=True,
        )
    )
    # The same 1000 records exactly, but not in file order.
    assert sorted(decoded) == sorted((r.prompt, r.response) for r in dev)
    assert decoded[:50] == [(r.prompt, r.response) for r in dev[700:750]]
    assert decoded[400:450] == [(r.prompt, r.response) for r in dev[0:50]]
    assert decoded[0] != (dev[0].prompt, dev[0].response)


def test_build_examples_text_matches_minillm_token_ids(gpt2):
    """Tokenizing dev records ourselves gives the ids MiniLLM wrote (shard items 0..49 are dev records 700..749)."""
    tokens = read_token_shards(shard("valid_0"), limit=50)
    texts = read_minillm_jsonl(shared("minillm-eval/dolly/dev.jsonl"), limit=750)[700:]
    from_text, text_counts = build_examples(texts, gpt2, max_length=1024)
    from_tokens, token_counts = build_examples(tokens, gpt2, max_length=1024)
    assert from_text == from_tokens
    expected = {"kept": 50, "skipped_long_prompt": 0, "truncated": 0, "skipped_empty_response": 0}
    assert text_counts == token_counts == expected
    assert all(ex["input_ids"][-1] == GPT2_EOS for ex in from_text)


def write_shard(prefix: Path, items: list[list[int]], code: int = 8, magic: bytes = b"MMIDIDX\x00\x00", version=1):
    """Write an MMIDIDX pair the way Megatron/MiniLLM do (uint16 for code 8, int32 for code 4)."""
    fmt, size = {8: ("<H", 2), 4: ("<i", 4), 5: ("<q", 8)}[code]
    sizes = [len(it) for it in items]
    pointers = [sum(sizes[:i]) * size for i in range(len(items))]
    idx = struct.pack("<9sQBQQ", magic, version, code, len(items), 1)
    idx += struct.pack(f"<{len(items)}i", *sizes) + struct.pack(f"<{len(items)}q", *pointers) + struct.pack("<q", 0)
    Path(str(prefix) + ".idx").write_bytes(idx)
    Path(str(prefix) + ".bin").write_bytes(b"".join(struct.pack(fmt, t) for it in items for t in it))
    return prefix


def test_read_token_shards_uint16_and_int32(tmp_path):
    u16 = write_shard(tmp_path / "u16", [[1, 2, 65535, 3, 4, 9], [5, 65535, 6, 9], [65535, 7, 9]])
    assert read_token_shards(u16) == [TokenRecord([1, 2], [3, 4]), TokenRecord([5], [6]), TokenRecord([], [7])]
    assert read_token_shards(str(u16), limit=1) == [TokenRecord([1, 2], [3, 4])]
    assert read_token_shards(u16, limit=0) == []
    # Large-vocabulary shards are int32 with -1 as the separator; 65535 is then an ordinary token.
    i32 = write_shard(tmp_path / "i32", [[70000, 65535, -1, 151643, 2], [8, -1, 9]], code=4)
    assert read_token_shards(i32) == [TokenRecord([70000, 65535], [151643]), TokenRecord([8], [])]


@pytest.mark.parametrize(
    ("kwargs", "items", "suffix", "message"),
    [
        ({"magic": b"NOTANIDX\x00"}, [[1, 65535, 2, 9]], ".idx", "bad magic"),
        ({"version": 2}, [[1, 65535, 2, 9]], ".idx", "unsupported MMIDIDX version 2"),
        ({"code": 5}, [[1, 65535, 2, 9]], ".idx", "unsupported dtype code 5"),
        ({}, [[1, 65535, 2, 9], [1, 2, 3]], ".bin", "item 1 has no separator 65535"),
        ({}, [[1, 2, 65535]], ".bin", "item 0 ends at the separator"),
    ],
)
def test_read_token_shards_errors(tmp_path, kwargs, items, suffix, message):
    prefix = write_shard(tmp_path / "s", items, **kwargs)
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 's') + suffix)}: {message}"):
        read_token_shards(prefix)


def test_read_token_shards_truncated_files(tmp_path):
    prefix = write_shard(tmp_path / "s", [[1, 65535, 2, 9], [3, 65535, 4, 9]])
    bin_path = Path(str(prefix) + ".bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    assert read_token_shards(prefix, limit=1) == [TokenRecord([1], [2])]  # only the bytes it needs
    with pytest.raises(InputError, match="index points up to byte 16"):
        read_token_shards(prefix)
    Path(str(prefix) + ".idx").write_bytes(b"MMIDIDX")
    with pytest.raises(InputError, match="too short for the 34-byte MMIDIDX header"):
        read_token_shards(prefix)


def test_missing_files_are_input_errors_naming_them(tmp_path):
    """A file that is not there is the user's to fix: an InputError naming it, never a bare FileNotFoundError."""
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 'gone.jsonl'))}: no such file"):
        read_minillm_jsonl(tmp_path / "gone.jsonl")
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 's.idx'))}: no such file"):
        read_token_shards(tmp_path / "s")
    prefix = write_shard(tmp_path / "s", [[1, 65535, 2, 9]])
    Path(str(prefix) + ".bin").unlink()
    assert read_token_shards(prefix, limit=0) == []  # the .bin is not needed for no item
    with pytest.raises(InputError, match=f"^{re.escape(str(prefix) + '.bin')}: no such file"):
        read_token_shards(prefix)


# ---------------------------------------------------------------------------------------------- datasets


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


def test_load_hf_dataset_local_json_matches_jsonl_reader(tmp_path, hf_cache):
    rows = [
        {"instruction": "Name a fruit.", "context": "", "response": "Apple."},
        {"instruction": "Summarize.", "context": "Long text.", "response": "Short."},
        {"instruction": "Echo.", "context": "hi", "response": "hi"},
    ]
    path = write_lines(tmp_path / "dolly.jsonl", [json.dumps(r) for r in rows])
    for template in ("minillm", "qwen2"):
        assert load_hf_dataset(f"json:{path}", template=template) == read_instruction_jsonl(path, template=template)
    assert load_hf_dataset(f"json:{path}", limit=2) == read_instruction_jsonl(path, limit=2)


def test_load_hf_dataset_minillm_rows(tmp_path, hf_cache):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"prompt": "P", "output": ["a", "b"]})])
    assert load_hf_dataset(f"json:{path}") == [Record("P", "a", ("a", "b"))]
    with pytest.raises(InputError, match=r"row 0: only a preformatted 'prompt'.*'qwen2'"):
        load_hf_dataset(f"json:{path}", template="qwen2")


def test_load_hf_dataset_hub_name_is_forwarded(tmp_path, monkeypatch, hf_cache):
    # No hub here: the recording wrapper takes the call a hub id makes and answers it from a local dataset folder.
    folder = tmp_path / "dolly-folder"
    folder.mkdir()
    rows = [
        {"instruction": "I", "context": None, "response": "R"},
        {"instruction": None, "context": "", "response": "R"},
    ]
    write_lines(folder / "train.jsonl", [json.dumps(r) for r in rows])
    write_lines(folder / "test.jsonl", [json.dumps(r) for r in rows])
    real, calls = hf_cache.load_dataset, []

    def recording_load_dataset(name, *args, **kwargs):
        calls.append((name, *args, kwargs["split"]))
        return real(str(folder), *args, **kwargs)

    monkeypatch.setattr(hf_cache, "load_dataset", recording_load_dataset)
    assert load_hf_dataset("databricks/databricks-dolly-15k", split="train", limit=1) == [
        Record(format_prompt("I"), "R", ("R",))
    ]
    with pytest.raises(InputError, match=r"^databricks/databricks-dolly-15k \(test\) row 1: missing key"):
        load_hf_dataset("databricks/databricks-dolly-15k", split="test")
    assert calls == [
        ("databricks/databricks-dolly-15k", None, "train"),
        ("databricks/databricks-dolly-15k", None, "test"),
    ]


def test_load_hf_dataset_that_cannot_load_names_the_label_and_chains_the_cause(tmp_path, hf_cache):
    missing = tmp_path / "gone.jsonl"
    with pytest.raises(
        InputError, match=rf"^data.path: json:{re.escape(str(missing))} \(train\): cannot load \("
    ) as info:
        load_hf_dataset(f"json:{missing}", label="data.path")
    assert isinstance(info.value.__cause__, FileNotFoundError)
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"instruction": "I", "response": "R"})])
    with pytest.raises(InputError, match=rf"^json:{re.escape(str(path))} \(nope\): cannot load \("):
        load_hf_dataset(f"json:{path}", split="nope")


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_instructions_deterministic_and_varied():
    a = synthetic_instructions(200, seed=0)
    assert a == synthetic_instructions(200, seed=0)
    assert a != synthetic_instructions(200, seed=1)
    assert synthetic_instructions(50, seed=0) == a[:50]
    assert len(a) == 200 and synthetic_instructions(0) == []
    assert all(r.prompt.startswith("Below is an instruction") and r.prompt.endswith("### Response:\n") for r in a)
    assert all(0 < len(r.response.split()) < 30 and r.references == (r.response,) for r in a)
    instructions = {r.prompt.split("### Instruction:\n")[1].split("\n")[0] for r in a}
    assert len(instructions) > 50  # varied, not one prompt repeated
    assert any("### Input:" in r.prompt for r in a) and any("### Input:" not in r.prompt for r in a)
    with pytest.raises(InputError):
        synthetic_instructions(-1)


def test_synthetic_instructions_answers_are_correct():
    for r in synthetic_instructions(300, seed=3):
        instruction = r.prompt.split("### Instruction:\n")[1].split("\n")[0]
        if instruction.startswith("Add the numbers"):
            a, b = (int(w.strip(".")) for w in instruction.split()[3::2])
            assert r.response == f"{a} + {b} = {a + b}"
        elif instruction.startswith("Reverse the order"):
            words = r.prompt.split("### Input:\n")[1].split("\n")[0].split()
            assert r.response.split() == words[::-1]


def _rederived(instruction: str, text: str | None) -> str | None:
    """The answer of a synthetic task, worked out from its prompt alone (None: a kind this does not know)."""
    words = text.split() if text else []
    if instruction.startswith("Add "):
        a, b = (int(w.strip(".")) for w in instruction.split()[-3::2])
        return f"{a} + {b} = {a + b}"
    if instruction.startswith("Reverse the order"):
        return " ".join(reversed(words))
    if instruction.startswith("Sort these numbers"):
        return " ".join(str(x) for x in sorted(int(w) for w in words))
    if instruction.startswith("Sort these letters"):
        return " ".join(sorted(words))
    if instruction.startswith("Rewrite the input in uppercase"):
        return text.upper()
    if instruction.startswith("Convert the date"):
        y, m, d = text.split("-")
        return f"{d}/{m}/{y}"
    if instruction.startswith("Repeat the word"):
        return " ".join([instruction.split("'")[1]] * 3)
    if instruction.startswith("How many words"):
        return f"There are {len(words)} words."
    return None


@pytest.mark.parametrize("family_set", ["INSTRUCTION_FAMILIES", "FAMILIES"])
def test_every_synthetic_task_kind_answers_its_prompt(family_set):
    # Both sets come from one module (adakd.data.synthetic); the demo's tasks module hands its families on as they are.
    import adakd.data.synthetic as synthetic
    import adakd.demo.tasks as demo

    assert demo.FAMILIES is synthetic.FAMILIES and demo.SOFT_FAMILIES is synthetic.SOFT_FAMILIES
    rng = random.Random(0)
    for name, task in getattr(synthetic, family_set).items():
        for _ in range(50):
            instruction, text, answer = task(rng)
            if instruction.startswith("What is the capital of "):
                country = instruction.removeprefix("What is the capital of ").rstrip("?")
                assert answer.startswith(f"The capital of {country} is ") and answer.endswith("."), name
            else:
                assert answer == _rederived(instruction, text), (name, instruction, text, answer)


# ---------------------------------------------------------------------------------------------- examples


def test_build_examples_masks_prompt_and_appends_eos(byte_tok):
    examples, counts = build_examples([Record("ab", "cd", ("cd",)), TokenRecord([5, 6, 7], [8])], byte_tok)
    assert examples == [
        {"input_ids": [97, 98, 99, 100, 256], "labels": [-100, -100, 99, 100, 256]},
        {"input_ids": [5, 6, 7, 8, 256], "labels": [-100, -100, -100, 8, 256]},
    ]
    assert counts == {"kept": 2, "skipped_long_prompt": 0, "truncated": 0, "skipped_empty_response": 0}


def test_build_examples_label_masking_on_real_prompts(gpt2):
    records = synthetic_instructions(20, seed=5)
    examples, _ = build_examples(records, gpt2)
    for record, ex in zip(records, examples, strict=True):
        n_prompt = len(gpt2(record.prompt, add_special_tokens=False)["input_ids"])
        response = gpt2(record.response, add_special_tokens=False)["input_ids"] + [GPT2_EOS]
        assert len(ex["input_ids"]) == len(ex["labels"]) == n_prompt + len(response)
        assert ex["labels"][:n_prompt] == [-100] * n_prompt
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] == response


def test_build_examples_length_policy_counts(byte_tok):
    records = [
        Record("12345", "r", ("r",)),  # prompt 5 > 4: skipped
        Record("123", "ab", ("ab",)),  # 3 + 2 + eos = 6: kept as is
        Record("1234", "abc", ("abc",)),  # 4 + 3 + eos = 8 = max_length: kept as is
        Record("1234", "abcdefgh", ("abcdefgh",)),  # 13 > 8: cut to 8, the eos is lost
        TokenRecord([1, 2], list(range(10, 30))),  # 23 > 8: cut to 8
    ]
    examples, counts = build_examples(records, byte_tok, max_length=8, max_prompt_length=4)
    assert counts == {"kept": 4, "skipped_long_prompt": 1, "truncated": 2, "skipped_empty_response": 0}
    assert [len(ex["input_ids"]) for ex in examples] == [6, 8, 8, 8]
    assert examples[2] == {"input_ids": list(b"1234abcd"), "labels": [-100] * 4 + list(b"abcd")}
    assert examples[3]["labels"] == [-100, -100, 10, 11, 12, 13, 14, 15]
    assert examples[1]["input_ids"][-1] == 256


def test_build_examples_skips_fully_truncated_responses(byte_tok):
    records = [Record("12345678", "r", ("r",)), Record("123456789", "r", ("r",)), Record("1234567", "r", ("r",))]
    examples, counts = build_examples(records, byte_tok, max_length=8, max_prompt_length=8)
    assert counts == {"kept": 1, "skipped_long_prompt": 1, "truncated": 1, "skipped_empty_response": 1}
    assert examples == [{"input_ids": list(b"1234567r"), "labels": [-100] * 7 + [ord("r")]}]


def test_build_examples_errors(byte_tok):
    with pytest.raises(InputError, match="no eos_token_id"):
        build_examples([TokenRecord([1], [2])], SimpleNamespace(eos_token_id=None))
    with pytest.raises(ValueError, match="record 1: expected Record or TokenRecord, got dict"):
        build_examples([TokenRecord([1], [2]), {"prompt": "p"}], byte_tok)


def test_collator_pads_right():
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": torch.tensor([1, 2, 3, 4, 5]), "labels": torch.tensor([-100, -100, 3, 4, 5]), "extra": "x"},
    ]
    batch = DistillCollator(pad_token_id=0)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 3, 4, 5]]
    padded = DistillCollator(pad_token_id=9, pad_to_multiple_of=4)(features)
    assert padded["input_ids"].shape == (2, 8)
    assert padded["input_ids"][0].tolist() == [5, 6, 7, 9, 9, 9, 9, 9]
    assert padded["attention_mask"].sum().item() == 8
    assert DistillCollator(0, pad_to_multiple_of=4)(features[:1])["input_ids"].shape == (1, 4)


def test_collator_errors():
    collate = DistillCollator(pad_token_id=0)
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(ValueError, match="feature 0: input_ids has 2 tokens but labels has 1"):
        collate([{"input_ids": [1, 2], "labels": [2]}])
    with pytest.raises(ValueError, match="feature 1: missing key 'labels'"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1]}])


def test_collator_on_built_examples(byte_tok):
    examples, _ = build_examples(synthetic_instructions(8), byte_tok)
    batch = DistillCollator(byte_tok.pad_token_id)(examples)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(ex["input_ids"]) for ex in examples]
    for row, ex in enumerate(examples):
        assert batch["labels"][row, : lengths[row]].tolist() == ex["labels"]


# ---------------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_layout(byte_tok):
    assert len(byte_tok) == 257
    assert byte_tok.eos_token_id == byte_tok.bos_token_id == byte_tok.pad_token_id == 256
    assert byte_tok.eos_token == "<|endoftext|>"
    text = "héllo ✓ 日本語 🤖\n\t\x00 end "
    assert byte_tok(text, add_special_tokens=False)["input_ids"] == list(text.encode("utf-8"))
    assert byte_tok.encode("a<|endoftext|>b", add_special_tokens=False) == [97, 256, 98]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = _byte_tok()
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    if "<|endoftext|>" not in text:
        assert ids == list(text.encode("utf-8"))


def test_tokenizer_for_gpt2_sets_eos_and_pad(gpt2):
    assert len(gpt2) == 50257
    assert gpt2.eos_token == "<|endoftext|>" and gpt2.eos_token_id == GPT2_EOS
    assert gpt2.pad_token_id == GPT2_EOS


def test_tokenizer_for_a_folder_that_cannot_load_names_it(tmp_path):
    missing = tmp_path / "no-tokenizer"
    with pytest.raises(
        InputError, match=f"^--tokenizer {re.escape(str(missing))}: cannot load the tokenizer \\(no such"
    ):
        tokenizer_for(str(missing), label="--tokenizer")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"^{re.escape(str(empty))}: cannot load the tokenizer \\(no tokenizer files"):
        tokenizer_for(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(InputError, match=f"^{re.escape(str(broken))}: cannot load the tokenizer") as info:
        tokenizer_for(str(broken))
    assert info.value.__cause__ is not None  # the library's own error is chained
