"""Bad training data (docs/data.md) is refused in one line that names the file and row, before any model loads.

Chat data read through ``datasets`` (bad bytes, empty files, templates that fail, refuse or drop the content, empty
answers), token shards written by another tokenizer, and the smaller promises of docs/data.md: split syntax for
``save_to_disk`` folders, ``data.config`` there, the byte tokenizer's end of turn, and rendering time that grows
with the kept length, not with the square of the turns.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import struct
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

import adakd.data as data  # noqa: E402
from adakd.data import (  # noqa: E402
    chat_example,
    fit_example,
    load_rows,
    read_token_shards,
    tokenize_rows,
    tokenizer_for,
)
from adakd.data.chat import QWEN2_CHAT_TEMPLATE  # noqa: E402
from adakd.errors import InputError  # noqa: E402
from adakd.train.config import ConfigError  # noqa: E402

from .common import ROOT, TINY, cli, one_line_error, tiny  # noqa: E402

SHARED = Path(os.environ.get("ADAKD_SHARED_DATA", ROOT.parent / "shared" / "data"))
IGNORE = -100
# The words of datasets' own messages, which must not be what the user reads.
DATASETS_WORDS = ("An error occurred while generating", "corresponds to no data", "task.toml", "StopIteration")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CHAT = [user("What is 2 + 3?"), assistant("5.")]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def no_models(monkeypatch):
    """Any model load fails the test: every refusal here must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was refused")

    monkeypatch.setattr(importlib.import_module("adakd.train.inputs"), "load_model", boom)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train(capsys, tmp_path, *overrides: str) -> str:
    """``adakd train`` on the tiny config; its one error line."""
    args = ["train", str(TINY), f"training.output_dir={tmp_path / 'out'}", "data.source=null", *overrides]
    return one_line_error(*cli(capsys, *args))


def trained_text(tok, ids, labels) -> str:
    return tok.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE])


# ---------------------------------------------------------------------------------------------- 1. files, templates


def test_invalid_utf8_in_a_jsonl_names_the_file_and_line(capsys, tmp_path, no_models):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": CHAT}).encode()
    path.write_bytes(good + b"\n\n" + good.replace(b"2 + 3", b"2 \xff 3") + b"\n")
    line = train(capsys, tmp_path, f"data.path={path}", "data.template=qwen2")
    column = good.index(b"2 + 3") + 3
    assert line == f"adakd: error: data.path: {path}:3: not UTF-8 (byte {column}: invalid start byte)"
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:3: not UTF-8 \(byte {column}: invalid start"):
        load_rows(str(path))


@pytest.mark.parametrize(("content", "what"), [(b"", "an empty file"), (b"\n \n\t\n", "an empty file")])
def test_an_empty_jsonl_is_one_line(capsys, tmp_path, no_models, content, what):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(content)
    line = train(capsys, tmp_path, f"data.path={path}", "data.template=qwen2")
    assert line == f"adakd: error: data.path: {path}: no records ({what})"


def test_a_json_file_that_datasets_cannot_parse_names_its_line(capsys, tmp_path, no_models):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + '{"messages": [\n')
    line = train(capsys, tmp_path, f"data.path={path}", "data.template=qwen2")
    assert line == f"adakd: error: data.path: {path}:2: invalid JSON (Expecting value at column 1)"
    array = tmp_path / "empty.json"
    array.write_text("[]")
    line = train(capsys, tmp_path, f"data.path={array}", "data.template=qwen2")
    assert line == f"adakd: error: data.path: {array}: no records (an empty JSON array)"
    assert not any(words in line for words in DATASETS_WORDS)


def test_datasets_messages_become_adakd_lines(tmp_path):
    rows = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 3)
    with pytest.raises(InputError, match=r"chat.jsonl \(train\[5:\]\): the split selects no record$"):
        load_rows(str(rows), split="train[5:]")
    harbor = tmp_path / "harbor"  # a folder that also holds an instruction.md reads as a Harbor task set
    harbor.mkdir()
    write_jsonl(harbor / "train.jsonl", [{"messages": CHAT}])
    (harbor / "instruction.md").write_text("How this data was made.\n")
    from datasets import packaged_modules

    if "harbor" in packaged_modules._PACKAGED_DATASETS_MODULES:  # datasets >= 5.1 reads such a folder as Harbor's
        with pytest.raises(
            InputError, match=r"^data.name: .*harbor: datasets reads a folder that holds an instruction"
        ):
            load_rows(str(harbor), label="data.name")
    else:
        assert len(load_rows(str(harbor), label="data.name")) == 1
    (tmp_path / "none").mkdir()
    with pytest.raises(InputError, match=r"none: no data files in the folder"):
        load_rows(str(tmp_path / "none"))
    empty = tmp_path / "folder"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    with pytest.raises(InputError, match=rf"^{re.escape(str(empty / 'train.jsonl'))}: no records \(an empty file\)$"):
        load_rows(str(empty))


def test_a_string_column_that_is_not_utf8_names_the_row():
    pa = pytest.importorskip("pyarrow")
    good, bad = json.dumps(CHAT).encode(), b"\xff"
    offsets = pa.py_buffer(struct.pack("<3i", 0, len(good), len(good) + 1))
    column = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(good + bad)])  # not validated
    rows = datasets.Dataset(pa.table({"prompt": column, "completion": pa.array(["a", "b"])}))
    with pytest.raises(InputError, match=r"^d \(train\) row 1: not UTF-8 \(byte 1 of a string: invalid start byte\)$"):
        tokenize_rows(rows, tokenizer_for("byte"), where="d (train)")


def test_a_template_with_a_syntax_error_names_data_template(capsys, tmp_path, no_models):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    jinja = tmp_path / "broken.jinja"
    jinja.write_text("{% for m in messages %}{{ m['content'] }{% endfor %}")
    line = train(capsys, tmp_path, f"data.path={path}", f"data.template={jinja}")
    assert line == f"adakd: error: data.template: {jinja}: not a valid Jinja template (line 1: unexpected '}}')"
    tok = tokenizer_for("byte")
    tok.chat_template = "{% if %}"
    with pytest.raises(InputError, match=r"^the chat template of the tokenizer 'models/x' \(set data.template to an"):
        tokenize_rows(datasets.Dataset.from_list([{"messages": CHAT}]), tok, tokenizer_name="models/x")


LLAMA2_STYLE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' <|endoftext|>' }}{% endif %}{% endfor %}"
)


def test_a_template_that_refuses_a_record_names_the_row(capsys, tmp_path, no_models):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": [user("a"), user("b"), *CHAT]}])
    jinja = tmp_path / "llama2.jinja"
    jinja.write_text(LLAMA2_STYLE)
    line = train(capsys, tmp_path, f"data.path={path}", f"data.template={jinja}")
    assert line == (
        f"adakd: error: {path} (train) row 1: 'messages': data.template {jinja} refuses this conversation: "
        "Conversation roles must alternate user/assistant/user/assistant/..."
    )


# ---------------------------------------------------------------------------------------------- 2. silent acceptance


@pytest.mark.parametrize("answer", ["", "  \n "])
def test_an_empty_assistant_turn_is_refused_with_its_row_and_turn(capsys, tmp_path, no_models, answer):
    rows = [{"messages": CHAT}, {"messages": [*CHAT, user("And 3 + 4?"), assistant(answer)]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    line = train(capsys, tmp_path, f"data.path={path}", "data.template=qwen2")
    assert line == f"adakd: error: {path} (train) row 1: 'messages': turn 3 (assistant): empty response"
    pc = datasets.Dataset.from_list([{"prompt": [user("q")], "completion": [assistant(answer)]}])
    with pytest.raises(InputError, match=r"^d row 0: turn 1 \(assistant\): empty response$"):
        tokenize_rows(pc, tokenizer_for("byte"), template="qwen2", where="d")
    # An empty assistant turn in a completion's context (the prompt) is not trained, so it is no error.
    context = [user("q"), assistant(answer), user("again")]
    pc = datasets.Dataset.from_list([{"prompt": context, "completion": [assistant("a")]}])
    made = tokenize_rows(pc, tokenizer_for("byte"), template="qwen2")
    assert made.counts["kept"] == 1


def test_a_template_that_renders_no_content_is_refused_naming_the_template(capsys, tmp_path, no_models):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    jinja = tmp_path / "text.jinja"  # message.text instead of message.content: renders '', trains <|im_end|> alone
    jinja.write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{{ m.text }}{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    line = train(capsys, tmp_path, f"data.path={path}", f"data.template={jinja}")
    assert line == (
        f"adakd: error: {path} (train) row 0: 'messages': data.template {jinja} renders assistant turn 1 without its "
        "content, so only its end marker would be trained (does the template write message['content']?)"
    )
    marked = jinja.read_text().replace("{{ m.text }}", "{% generation %}{{ m.text }}{% endgeneration %}")
    with pytest.raises(InputError, match=r"^r: the chat template renders assistant turn 1 without its content"):
        chat_example(CHAT, tokenizer_for("byte"), marked, where="r")


# ---------------------------------------------------------------------------------------------- 3. token shards


def write_shard(prefix: Path, items: list[list[int]], code: int = 8) -> Path:
    """An MMIDIDX pair as Megatron/MiniLLM write it (uint16 for code 8, int32 for code 4)."""
    fmt, size = {8: ("<H", 2), 4: ("<i", 4)}[code]
    sizes = [len(it) for it in items]
    pointers = [sum(sizes[:i]) * size for i in range(len(items))]
    idx = struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, code, len(items), 1)
    idx += struct.pack(f"<{len(items)}i", *sizes) + struct.pack(f"<{len(items)}q", *pointers) + struct.pack("<q", 0)
    Path(str(prefix) + ".idx").write_bytes(idx)
    Path(str(prefix) + ".bin").write_bytes(b"".join(struct.pack(fmt, t) for it in items for t in it))
    return prefix


# GPT-2 ids ("I love" / " you", "Hello" / " world"), each item ending in GPT-2's eos.
GPT2_ITEMS = [[40, 1842, 65535, 345, 50256], [15496, 65535, 995, 50256]]


def test_shards_of_a_larger_tokenizer_are_refused_before_the_models_load(capsys, tmp_path, no_models):
    prefix = write_shard(tmp_path / "train_0", GPT2_ITEMS)
    args = ["train", str(TINY), f"training.output_dir={tmp_path / 'out'}", "data.source=shards", f"data.path={prefix}"]
    code, err = cli(capsys, *args)
    line = one_line_error(code, err)
    assert "[adakd] data.shard_tokenizer is not set: the shards' ids are only checked to be below the student " in err
    assert line == (
        f"adakd: error: {prefix}.bin: item 0 holds the token id 1842, which the tokenizer's 257 tokens do not have "
        "(ids 0 to 256): these shards were written by another tokenizer"
    )
    i32 = write_shard(tmp_path / "i32", [[5, -1, 6, -1, 7, 0]], code=4)  # a second -1 is not a separator
    with pytest.raises(InputError, match=r"i32.bin: item 0 holds the token id -1, which"):
        read_token_shards(i32, vocab_size=257)
    assert read_token_shards(i32) and read_token_shards(prefix, vocab_size=50257)[0].prompt_ids == [40, 1842]


def permuted_byte_tokenizer(folder: Path) -> Path:
    """A byte-level tokenizer of the same size as adakd's, whose ids mean other bytes (a stand-in for any other
    tokenizer whose ids fall inside the student's vocabulary)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from adakd.data.examples import _bytes_to_unicode

    core = Tokenizer(models.BPE(vocab={c: 255 - b for b, c in _bytes_to_unicode().items()}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(str(folder))
    return folder


def test_shards_of_another_tokenizer_inside_the_vocabulary_are_refused_by_data_shard_tokenizer(
    capsys, tmp_path, no_models
):
    other = permuted_byte_tokenizer(tmp_path / "permuted")
    prefix = write_shard(tmp_path / "train_0", [[72, 105, 65535, 111, 256]])  # byte ids: "Hi" / "o"
    tokenizers = [f"student.tokenizer={other}", f"teacher.tokenizer={other}"]
    line = train(
        capsys, tmp_path, "data.source=shards", f"data.path={prefix}", "data.shard_tokenizer=byte", *tokenizers
    )
    assert line.startswith(
        "adakd: error: data.shard_tokenizer: byte is not the student's tokenizer: 256 of its 257 tokens have another "
        "id, or none, among the student's 257 (e.g. 'Ā': 0 in the shards, 255 in the student's), so the shards' ids "
        "would mean other tokens"
    )
    data.check_shard_tokenizer("byte", tokenizer_for("byte"))  # the same tokenizer: nothing to say
    student = tokenizer_for("byte")
    student.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    data.check_shard_tokenizer("byte", student)  # the student's own tokens after the writer's keep their ids
    with pytest.raises(InputError, match=r"^data.shard_tokenizer: .*gone: cannot load the tokenizer \(no such fold"):
        data.check_shard_tokenizer(str(tmp_path / "gone"), student)


def test_data_shard_tokenizer_is_a_key_of_token_shards(tmp_path):
    prefix = write_shard(tmp_path / "train_0", [[72, 65535, 111, 256]])
    config = tiny(tmp_path, "data.source=shards", f"data.path={prefix}", "data.shard_tokenizer=byte")
    assert config.data.shard_tokenizer == "byte"
    with pytest.raises(ConfigError, match=r"data.shard_tokenizer: applies to token shards \(source 'shards'\), not to"):
        tiny(tmp_path, "data.shard_tokenizer=byte")


def test_the_shared_gpt2_shards_are_refused_for_the_byte_student():
    prefix = SHARED / "dolly-train-gpt2-tokens" / "valid_0"
    if not Path(str(prefix) + ".idx").exists():
        pytest.skip(f"shared data not found: {prefix} (set ADAKD_SHARED_DATA)")
    with pytest.raises(InputError, match=r"valid_0.bin: item 0 holds the token id \d+, which the tokenizer's 257"):
        read_token_shards(prefix, vocab_size=257)
    assert len(read_token_shards(prefix, vocab_size=50257)) == 1000
    gpt2 = SHARED / "tokenizers" / "gpt2"
    with pytest.raises(InputError, match=r"^data.shard_tokenizer: .*gpt2 is not the student's tokenizer"):
        data.check_shard_tokenizer(str(gpt2), tokenizer_for("byte"))
    data.check_shard_tokenizer(str(gpt2), tokenizer_for(str(gpt2)))


# ---------------------------------------------------------------------------------------------- 4. smaller promises


def test_save_to_disk_folders_take_the_split_syntax(tmp_path):
    rows = [{"messages": [user(f"q{i}"), assistant(f"a{i}")]} for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert [r["messages"] for r in load_rows(str(tmp_path / "one"), split="train[:4]")] == [
        r["messages"] for r in rows[:4]
    ]
    assert len(load_rows(str(tmp_path / "one"), split="train[50%:]")) == 3
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:4]), "test": datasets.Dataset.from_list(rows[4:])}
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert [r["messages"] for r in load_rows(str(tmp_path / "dict"), split="test[-1:]+train[:1]")] == [
        rows[5]["messages"],
        rows[0]["messages"],
    ]
    with pytest.raises(InputError, match=r"\(validation\[:2\]\): cannot load \(Unknown split 'validation'; the fo"):
        load_rows(str(tmp_path / "dict"), split="validation[:2]")
    with pytest.raises(InputError, match=r"one \(train\[9:\]\): the split selects no record$"):
        load_rows(str(tmp_path / "one"), split="train[9:]")


def test_data_config_for_a_save_to_disk_folder_is_refused(capsys, tmp_path, no_models):
    datasets.Dataset.from_list([{"messages": CHAT}]).save_to_disk(str(tmp_path / "saved"))
    line = train(capsys, tmp_path, f"data.name={tmp_path / 'saved'}", "data.config=en", "data.template=qwen2")
    assert line == (
        f"adakd: error: data.config: 'en' does not apply to {tmp_path / 'saved'}, a folder written by save_to_disk "
        "(it holds no configurations or revisions); leave it out"
    )


def test_the_byte_tokenizer_trains_the_end_of_turn_marker_not_the_newline():
    tok = tokenizer_for("byte")  # <|im_end|> is text to it, not a special token
    two = [user("Hi"), assistant("Hello."), user("And?"), assistant("Bye.")]
    ids, labels = chat_example(two, tok, QWEN2_CHAT_TEMPLATE)
    assert tok.decode(ids).endswith("Bye.<|im_end|>\n")
    assert trained_text(tok, ids, labels) == "Hello.<|im_end|>Bye.<|im_end|>"
    # A turn that ends in whitespace alone keeps it: it is that turn's only end.
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}"
    plain += "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    ids, labels = chat_example(CHAT, tok, plain)
    assert trained_text(tok, ids, labels) == "5.\n\n"


def test_a_long_conversation_renders_only_up_to_the_kept_length(monkeypatch):
    tok = tokenizer_for("byte")
    renders = []
    real = type(tok).apply_chat_template

    def counting(self, *args, **kwargs):
        renders.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "apply_chat_template", counting)
    turns = [m for i in range(750) for m in (user(f"Question {i}?"), assistant(f"Answer {i}."))]  # 1,500 turns
    ids, labels = chat_example(turns, tok, QWEN2_CHAT_TEMPLATE, max_length=320)
    # One render of the whole conversation, two per assistant turn within the first 320 tokens (about 7), where
    # rendering every prefix took 1,501 renders of up to 1,500 turns each.
    assert len(renders) < 20, len(renders)
    assert len(ids) > 30_000 and labels[320:] == [IGNORE] * (len(ids) - 320)
    # The same examples as without the bound, once the length policy cuts them, at every cut.
    short = turns[:40]
    full = chat_example(short, tok, QWEN2_CHAT_TEMPLATE)
    for cut in (20, 70, 71, 100, 333, len(full[0]), 10_000):
        bounded = chat_example(short, tok, QWEN2_CHAT_TEMPLATE, max_length=cut)
        assert fit_example(*bounded, cut, 60) == fit_example(*full, cut, 60), cut
    made = tokenize_rows(datasets.Dataset.from_list([{"messages": turns}]), tok, template="qwen2", max_length=320)
    assert made.counts["truncated"] == 1 and made.examples[0]["input_ids"] == ids[:320]


def test_the_tokenised_map_is_not_reused_after_the_tokenising_code_changes(tmp_path, monkeypatch):
    from adakd.data import hf

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    first = tokenize_rows(load_rows(str(path)), tokenizer_for("byte"), template="qwen2").examples.cache_files
    again = tokenize_rows(load_rows(str(path)), tokenizer_for("byte"), template="qwen2").examples.cache_files
    assert first == again  # the cache serves the same settings and code
    monkeypatch.setattr(hf, "_code_digest", lambda: "another adakd")
    other = tokenize_rows(load_rows(str(path)), tokenizer_for("byte"), template="qwen2").examples.cache_files
    assert other != first
