"""Chat and TRL data formats, and Hugging Face datasets as users pass them (docs/data.md).

The supervised tokens are checked against texts the tests build by hand from the conversation (ChatML written out
as strings), never against the code's own rendering; the hub is replaced, only where it would be needed, by a
recording wrapper that answers from a local dataset folder.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

from adakd.cli import main  # noqa: E402
from adakd.data import (  # noqa: E402
    ExampleStream,
    Record,
    build_examples,
    chat_example,
    detect_format,
    format_prompt,
    load_rows,
    read_instruction_jsonl,
    read_minillm_jsonl,
    tokenize_rows,
    tokenizer_for,
)
from adakd.data.chat import QWEN2_CHAT_TEMPLATE  # noqa: E402
from adakd.data.examples import byte_tokenizer  # noqa: E402
from adakd.errors import InputError  # noqa: E402
from adakd.train import build_trainer, load_config, run  # noqa: E402
from adakd.train.config import ConfigError  # noqa: E402
from adakd.train.examples import ExampleDataset, training_examples  # noqa: E402
from adakd.train.inputs import training_arguments  # noqa: E402

from ..faults.common import TINY, one_line_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("ADAKD_SHARED_DATA", ROOT.parent / "shared" / "data"))
IGNORE = -100

# A ChatML template as a model's tokenizer_config.json holds it, and the same with TRL-style generation marks.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_MARKED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


SINGLE = [user("What is 2 + 3?"), assistant("2 + 3 = 5.")]
WITH_SYSTEM = [system("Answer in one word."), user("The capital of France?"), assistant("Paris.")]
MULTI = [
    system("Be brief."),
    user("Hi there"),
    assistant("Hello! How can I help?\nAsk away."),
    user("Name a fruit {with braces}."),
    assistant("Apple, café ☕."),
]
CONVERSATIONS = [SINGLE, WITH_SYSTEM, MULTI]


def chatml_text(turns) -> str:
    """The conversation as ChatML, written out by hand."""
    return "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns)


def expected_runs(turns, trained_from: int = 0) -> list[str]:
    """What must be trained: each assistant turn from ``trained_from`` on, its content then ChatML's end of turn."""
    return [t["content"] + "<|im_end|>" for t in turns[trained_from:] if t["role"] == "assistant"]


def chat_tokenizer(kind: str = "byte", template: str | None = CHATML):
    """A fast tokenizer with ChatML's two special tokens: the byte-level one (no merges), or GPT-2's real BPE."""
    if kind == "byte":
        tok = byte_tokenizer()
    else:
        path = SHARED / "tokenizers" / "gpt2"
        if not path.exists():
            pytest.skip(f"shared data not found: {path} (set ADAKD_SHARED_DATA)")
        tok = tokenizer_for(str(path))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained_runs(tok, ids, labels) -> list[str]:
    """The supervised positions, decoded run by run (a run: consecutive positions with a label)."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == token  # labels are the ids themselves, unshifted
            current.append(token)
        elif current:
            runs.append(decode(tok, current))
            current = []
    if current:
        runs.append(decode(tok, current))
    return runs


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return datasets


# ---------------------------------------------------------------------------------------------- chat rendering


@pytest.mark.parametrize("kind", ["byte", "gpt2"])
@pytest.mark.parametrize("turns", CONVERSATIONS, ids=["single", "system", "multi"])
def test_messages_train_exactly_the_assistant_turns_and_their_end_of_turn(kind, turns):
    tok = chat_tokenizer(kind)
    ids, labels = chat_example(turns, tok, CHATML)
    assert decode(tok, ids) == chatml_text(turns)  # the ids are the whole conversation, rendered as ChatML
    assert ids == tok(chatml_text(turns), add_special_tokens=False)["input_ids"]
    assert trained_runs(tok, ids, labels) == expected_runs(turns)
    # Everything else (system, user turns, the assistant headers, newlines between turns) has no label.
    untrained = sum(label == IGNORE for label in labels)
    assert untrained == len(ids) - sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in expected_runs(turns))


def test_a_conversation_with_two_assistant_turns_trains_both_and_masks_the_users():
    tok = chat_tokenizer()
    ids, labels = chat_example(MULTI, tok, CHATML)
    runs = trained_runs(tok, ids, labels)
    assert runs == ["Hello! How can I help?\nAsk away.<|im_end|>", "Apple, café ☕.<|im_end|>"]
    # The second user turn lies between the two runs, untrained.
    text_between = decode(tok, [i for i, label in zip(ids, labels, strict=True) if label == IGNORE])
    assert "Name a fruit {with braces}." in text_between and "Be brief." in text_between


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=["single", "system", "multi"])
@pytest.mark.parametrize("train_from", [0, 3])
def test_generation_marks_and_prefix_rendering_agree(turns, train_from):
    tok = chat_tokenizer()
    train_from = min(train_from, len(turns) - 1)
    assert chat_example(turns, tok, CHATML_MARKED, train_from=train_from) == chat_example(
        turns, tok, CHATML, train_from=train_from
    )
    ids, labels = chat_example(turns, tok, CHATML_MARKED, train_from=train_from)
    assert trained_runs(tok, ids, labels) == expected_runs(turns, train_from)


def test_the_built_in_qwen2_template_matches_the_qwen2_instruction_prompt():
    tok = chat_tokenizer(template=None)
    ids, labels = chat_example([user("Sum 2 and 3."), assistant("5")], tok, QWEN2_CHAT_TEMPLATE)
    assert decode(tok, ids) == format_prompt("Sum 2 and 3.", template="qwen2") + "5<|im_end|>\n"
    assert trained_runs(tok, ids, labels) == ["5<|im_end|>"]
    ids, _ = chat_example(WITH_SYSTEM, tok, QWEN2_CHAT_TEMPLATE)  # a system turn replaces the default one
    assert decode(tok, ids) == chatml_text(WITH_SYSTEM)


def test_a_template_that_is_not_prefix_stable_is_refused_with_the_record():
    tok = chat_tokenizer()
    # Marks the last turn: every prefix renders its own last turn differently from the whole conversation.
    last_marked = CHATML.replace("'<|im_end|>\\n' }}", "'<|im_end|>' + ('!' if loop.last else '') + '\\n' }}")
    with pytest.raises(InputError, match=r"^chat.jsonl row 4: the chat template renders the first 2 turn\(s\) diff"):
        chat_example(MULTI, tok, last_marked, where="chat.jsonl row 4")


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([user("no answer")], "no assistant turn to train on"),
        ([], "expected a non-empty list of turns, got an empty list"),
        ("hello", "expected a non-empty list of turns, got str"),
        ([user("q"), {"role": "assistant"}], "turn 1: missing 'content' \\(a str\\), got nothing"),
        ([user("q"), "answer"], "turn 1 must be a mapping"),
    ],
)
def test_bad_conversations_name_the_record(turns, message):
    with pytest.raises(InputError, match=f"^d.jsonl row 7: {message}"):
        chat_example(turns, chat_tokenizer(), CHATML, where="d.jsonl row 7")


# ---------------------------------------------------------------------------------------------- formats


def test_formats_are_detected_from_the_first_record():
    assert detect_format({"messages": SINGLE, "id": 3}, "x") == "messages"
    assert detect_format({"prompt": "p", "completion": "c"}, "x") == "prompt_completion"
    assert detect_format({"prompt": [user("p")], "completion": [assistant("c")]}, "x") == "prompt_completion"
    assert detect_format({"prompt": "p", "output": ["a", "b"]}, "x") == "minillm"
    assert detect_format({"instruction": "i", "context": None, "response": "r"}, "x") == "instructions"
    with pytest.raises(InputError, match=r"^q.parquet row 0: fits no data format: .*its columns: 'answer', 'q'$"):
        detect_format({"q": "?", "answer": "!", "empty": None}, "q.parquet row 0")


def test_conversational_prompt_completion_trains_only_the_completion():
    tok = chat_tokenizer()
    prompt = [system("Be brief."), user("Hi"), assistant("Hello."), user("Name a fruit.")]
    rows = datasets.Dataset.from_list([{"prompt": prompt, "completion": [assistant("Apple.")]}])
    made = tokenize_rows(rows, tok, max_length=512, max_prompt_length=256)
    assert made.format == "prompt_completion" and made.chat_template == CHATML
    ids, labels = made.examples[0]["input_ids"], made.examples[0]["labels"]
    assert decode(tok, ids) == chatml_text([*prompt, assistant("Apple.")])
    assert trained_runs(tok, ids, labels) == ["Apple.<|im_end|>"]  # the prompt's assistant turn is context


def test_standard_prompt_completion_is_tokenised_as_a_prompt_and_a_response(tmp_path):
    tok = tokenizer_for("byte")
    pairs = [("Translate: chat ->", " cat"), ("2 + 2 =", " 4")]
    rows = datasets.Dataset.from_list([{"prompt": p, "completion": c, "source": "x"} for p, c in pairs])
    made = tokenize_rows(rows, tok, max_length=512, max_prompt_length=256)
    expected, counts = build_examples([Record(p, c, (c,)) for p, c in pairs], tok)
    assert made.format == "prompt_completion" and made.chat_template is None
    assert list(made.examples) == expected and made.counts == counts
    assert expected[0]["labels"][-1] == tok.eos_token_id


def test_minillm_and_instruction_rows_through_datasets_equal_the_jsonl_readers(tmp_path, hf_cache):
    tok = tokenizer_for("byte")
    dolly = write_jsonl(
        tmp_path / "dolly.jsonl",
        [
            {"instruction": "Name a fruit.", "context": "", "response": "Apple."},
            {"instruction": "Summarize.", "context": "Long text.", "response": "Short."},
        ],
    )
    minillm = write_jsonl(
        tmp_path / "minillm.jsonl", [{"prompt": "P: ", "output": ["a", "b"]}, {"prompt": "Q", "output": "c"}]
    )
    for template in (None, "qwen2"):
        made = tokenize_rows(load_rows(str(dolly)), tok, template=template)
        legacy, counts = build_examples(read_instruction_jsonl(dolly, template=template or "minillm"), tok)
        assert made.format == "instructions" and list(made.examples) == legacy and made.counts == counts
    made = tokenize_rows(load_rows(str(minillm)), tok)
    assert made.format == "minillm" and list(made.examples) == build_examples(read_minillm_jsonl(minillm), tok)[0]


def test_a_later_record_that_misses_its_fields_names_the_file_and_index(tmp_path, hf_cache):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": SINGLE}, {"messages": MULTI}, {"messages": [user("q"), {"role": "assistant"}]}],
    )
    rows = load_rows(str(path))
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))} \(train\) row 2: 'messages': turn 1: missing 'con"):
        tokenize_rows(rows, chat_tokenizer(), where=f"{path} (train)")
    with pytest.raises(InputError, match=r"^d \(train\) row 0: missing 'prompt' \(data.format prompt_completion\)"):
        tokenize_rows(rows, chat_tokenizer(), data_format="prompt_completion", where="d (train)")


def test_template_errors_name_data_template(tmp_path):
    rows = datasets.Dataset.from_list([{"messages": SINGLE}])
    no_template = chat_tokenizer(template=None)
    message = (
        "data.format messages needs a chat template: the tokenizer 'models/tiny' has none; set data.template to a "
        "template name (qwen2) or a Jinja file"
    )
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        tokenize_rows(rows, no_template, tokenizer_name="models/tiny")
    with pytest.raises(InputError, match=r"^data.template: 'minillm' formats instruction records, not data.format m"):
        tokenize_rows(rows, no_template, template="minillm")
    with pytest.raises(InputError, match=r"^data.template: .*gone.jinja: no such file$"):
        tokenize_rows(rows, no_template, template=str(tmp_path / "gone.jinja"))
    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(CHATML)
    made = tokenize_rows(rows, no_template, template=str(jinja))  # a Jinja file serves a tokenizer without one
    assert made.chat_template == CHATML
    assert trained_runs(no_template, made.examples[0]["input_ids"], made.examples[0]["labels"]) == expected_runs(SINGLE)
    instructions = datasets.Dataset.from_list([{"instruction": "i", "response": "r"}])
    with pytest.raises(InputError, match=r"^data.template: .*chatml.jinja is a chat template, which formats conv"):
        tokenize_rows(instructions, no_template, template=str(jinja))


# ---------------------------------------------------------------------------------------------- length policy


def test_conversations_follow_the_length_policy():
    tok = chat_tokenizer()
    full_ids, full_labels = chat_example(MULTI, tok, CHATML)
    prompt = next(i for i, label in enumerate(full_labels) if label != IGNORE)  # tokens before the first answer
    # The cut falls inside the second assistant turn: its first tokens stay trained, its end and eos are lost.
    second_answer = chatml_text(MULTI).index("Apple")
    second = len(tok(chatml_text(MULTI)[:second_answer], add_special_tokens=False)["input_ids"]) + 3
    rows = datasets.Dataset.from_list([{"messages": MULTI}])

    made = tokenize_rows(rows, tok, max_length=second, max_prompt_length=prompt)
    assert made.counts == {"kept": 1, "skipped_long_prompt": 0, "truncated": 1, "skipped_empty_response": 0}
    assert made.examples[0] == {"input_ids": full_ids[:second], "labels": full_labels[:second]}
    assert trained_runs(tok, full_ids[:second], full_labels[:second]) == [expected_runs(MULTI)[0], "App"]

    made = tokenize_rows(rows, tok, max_length=len(full_ids), max_prompt_length=prompt)
    assert made.counts["truncated"] == 0 and made.examples[0]["input_ids"] == full_ids  # fits exactly

    made = tokenize_rows(rows, tok, max_length=second, max_prompt_length=prompt - 1)
    assert made.counts == {"kept": 0, "skipped_long_prompt": 1, "truncated": 0, "skipped_empty_response": 0}
    assert len(made.examples) == 0
    made = tokenize_rows(rows, tok, max_length=prompt, max_prompt_length=prompt)  # the cut leaves no answer
    assert made.counts == {"kept": 0, "skipped_long_prompt": 0, "truncated": 0, "skipped_empty_response": 1}


# ---------------------------------------------------------------------------------------------- loading


def test_local_files_are_loaded_by_their_extension_and_folders_as_datasets(tmp_path, hf_cache):
    rows = [{"messages": turns} for turns in CONVERSATIONS]
    table = datasets.Dataset.from_list(rows)
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))  # one JSON array
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "d.arrow").write_bytes(next((tmp_path / "saved").glob("*.arrow")).read_bytes())
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "train.jsonl", rows)
    specs = ["d.jsonl", "d.json", "d.parquet", "d.arrow", "saved", "folder", "json:" + str(tmp_path / "d.jsonl")]
    tok = chat_tokenizer()
    expected = [
        dict(zip(("input_ids", "labels"), chat_example(turns, tok, CHATML), strict=True)) for turns in CONVERSATIONS
    ]
    for spec in specs:
        path = spec if spec.startswith("json:") else str(tmp_path / spec)
        loaded = load_rows(path)
        assert [r["messages"] for r in loaded] == CONVERSATIONS, spec
        assert list(tokenize_rows(loaded, tok).examples) == expected, spec
    assert [r["messages"] for r in load_rows(str(tmp_path / "d.parquet"), limit=2)] == CONVERSATIONS[:2]
    for i, turns in enumerate(CONVERSATIONS):  # a glob reads several files as one split
        write_jsonl(tmp_path / f"part-{i}.jsonl", [{"messages": turns}])
    assert [r["messages"] for r in load_rows(str(tmp_path / "part-*.jsonl"))] == CONVERSATIONS
    (tmp_path / "pc.csv").write_text('prompt,completion\n"Say ""hi"":", hi\n2 + 2 =, 4\n')
    assert list(load_rows(str(tmp_path / "pc.csv"))) == [
        {"prompt": 'Say "hi":', "completion": " hi"},
        {"prompt": "2 + 2 =", "completion": " 4"},
    ]
    assert [r["messages"] for r in load_rows(str(tmp_path / "d.jsonl"), split="train[1:]")] == CONVERSATIONS[1:]
    with pytest.raises(InputError, match=rf"^data.path: {re.escape(str(tmp_path))}/gone.parquet: no such file$"):
        load_rows(str(tmp_path / "gone.parquet"), label="data.path")
    with pytest.raises(InputError, match=r"saved \(validation\): cannot load \(Unknown split 'validation'; the fo"):
        load_rows(str(tmp_path / "saved"), split="validation")
    datasets.DatasetDict({"train": table, "validation": table.select([2])}).save_to_disk(str(tmp_path / "splits"))
    assert [r["messages"] for r in load_rows(str(tmp_path / "splits"), split="validation")] == [MULTI]


def _config(tmp_path: Path, *overrides: str, name: str = "run"):
    base = [f"training.output_dir={tmp_path / name}", "training.logging_steps=1", "training.disable_tqdm=true"]
    return load_config(TINY, [*base, "data.source=null", *overrides])


def test_hub_arguments_reach_load_dataset(tmp_path, hf_cache, monkeypatch):
    # No hub here: the wrapper records the hub call and answers it from a local dataset folder.
    folder = tmp_path / "capybara"
    folder.mkdir()
    write_jsonl(folder / "validation.jsonl", [{"messages": SINGLE, "source": "x"}, {"messages": MULTI, "source": "y"}])
    real, calls = datasets.load_dataset, []

    def recording_load_dataset(name, config=None, **kwargs):
        calls.append((name, config, kwargs))
        return real(str(folder), split=kwargs["split"], streaming=kwargs["streaming"])

    monkeypatch.setattr(datasets, "load_dataset", recording_load_dataset)
    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(CHATML)
    config = _config(
        tmp_path,
        "data.name=trl-lib/Capybara",
        "data.config=default",
        "data.split=validation",
        "data.revision=0123abc",
        "data.limit=1",
        f"data.template={jinja}",
    )
    assert config.data.source == "hf"
    tok = chat_tokenizer(template=None)
    examples, held_out = training_examples(config.data, training_arguments(config.training), tok)
    assert calls == [
        ("trl-lib/Capybara", "default", {"split": "validation", "revision": "0123abc", "streaming": False})
    ]
    assert len(examples) == 1 and held_out == []
    assert trained_runs(tok, examples[0]["input_ids"], examples[0]["labels"]) == expected_runs(SINGLE)
    assert tok.chat_template == CHATML  # the template trained with goes into the saved tokenizer


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (["data.path=run.data"], "data.source", "cannot tell how to read data.path 'run.data': give data.source"),
        (["data.source=hf", "data.name=a/b", "data.path=x.jsonl"], "data.name", "source 'hf' needs one of data.name"),
        (["data.source=minillm_jsonl", "data.path=x.jsonl", "data.name=a/b"], "data.name", "applies to datasets"),
        (["data.path=x.jsonl", "data.revision=main"], "data.revision", "applies to a dataset named by data.name"),
        (["data.name=a/b", "data.format=chat"], "data.format", "unknown format 'chat'; valid: messages, prompt_comp"),
        (["data.source=synthetic", "data.format=messages"], "data.format", "source 'synthetic' reads its own format"),
        (["data.name=a/b", "data.streaming=true", "training.max_steps=-1"], "training.max_steps", "data.streaming ne"),
        (["data.source=shards", "data.path=x", "data.streaming=true"], "data.streaming", "applies to datasets"),
        (["data.name=a/b", "data.template=templates/chat.jinja"], "data.template", "templates/chat.jinja: no such"),
        (["data.template=chatml"], "data.template", "unknown template 'chatml'; valid: minillm, qwen2"),
    ],
)
def test_data_keys_are_checked_by_key(tmp_path, overrides, key, message):
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(TINY))}: {re.escape(key)}: {message}"):
        _config(tmp_path, *overrides)


def test_streaming_refuses_distillm(tmp_path):
    distillm = ["onpolicy.mode=distillm", "onpolicy.eval_examples=1", "loss.base=srkl", "training.max_steps=2"]
    with pytest.raises(ConfigError, match=r"data.streaming: not with onpolicy.mode distillm"):
        _config(tmp_path, "data.name=a/b", "data.streaming=true", *distillm)


def test_the_source_is_inferred(tmp_path):
    assert _config(tmp_path).data.source == "synthetic"
    for spec in ("train.parquet", "data/part-*.jsonl", "json:train.txt"):
        assert _config(tmp_path, f"data.path={spec}").data.source == "hf"
    assert _config(tmp_path, "data.path=x.jsonl", "data.source=minillm_jsonl").data.source == "minillm_jsonl"


# ---------------------------------------------------------------------------------------------- caching, processes


_TOKENISE = """
import json, sys
from adakd.data import load_rows, tokenize_rows
from adakd.data.examples import byte_tokenizer

tok = byte_tokenizer()
tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
made = tokenize_rows(load_rows(sys.argv[1]), tok, template=sys.argv[2])
print(json.dumps({"fingerprint": made.examples._fingerprint, "examples": list(made.examples)}))
"""


@pytest.mark.slow
def test_the_tokenised_dataset_is_cached_for_the_next_process(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns} for turns in CONVERSATIONS * 3])
    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(CHATML)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-c", _TOKENISE, str(data), str(jinja)]

    def tokenise() -> tuple[dict, dict[Path, float]]:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("cache-*.arrow")}
        return json.loads(proc.stdout.strip().splitlines()[-1]), files

    first, files = tokenise()
    second, files_after = tokenise()
    assert files and files_after == files  # the second process wrote nothing: it read the first one's map
    assert second == first


_WORKER = """
import json, os, sys
import adakd.data.hf as hf
from adakd.train import load_config
from adakd.train.examples import training_examples
from adakd.train.inputs import training_arguments

real = hf._encode_row


def counted(*args, **kwargs):  # counts the records this process tokenises itself
    with open(os.path.join(sys.argv[1], "calls-" + os.environ["RANK"]), "a") as f:
        f.write("x")
    return real(*args, **kwargs)


hf._encode_row = counted
config = load_config(sys.argv[2], sys.argv[3:])
args = training_arguments(config.training)
examples, _ = training_examples(config.data, args, __import__("adakd.data", fromlist=["x"]).tokenizer_for("byte"))
print("RESULT", os.environ["RANK"], json.dumps([examples[i] for i in range(len(examples))]), flush=True)
"""


@pytest.mark.slow
def test_two_processes_tokenise_once(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns} for turns in CONVERSATIONS * 4])
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--nproc_per_node=2", f"--master_port={port}", str(worker), str(tmp_path), str(TINY),
        f"training.output_dir={tmp_path / 'out'}", "training.ddp_backend=gloo", "data.source=null",
        f"data.path={data}", "data.template=qwen2",
    ]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = dict(line.split(" ", 2)[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    assert set(results) == {"0", "1"} and results["0"] == results["1"]
    assert len(json.loads(results["0"])) == 12
    assert (tmp_path / "calls-0").read_text() == "x" * 12  # the main process tokenised every record
    assert not (tmp_path / "calls-1").exists()  # the other one read the cache


# ---------------------------------------------------------------------------------------------- training


def _chat_tokenizer_folder(tmp_path: Path, template: str | None = CHATML) -> Path:
    folder = tmp_path / "chat-tokenizer"
    chat_tokenizer(template=template).save_pretrained(folder)
    return folder


def test_teacher_and_student_see_the_same_ids(tmp_path, hf_cache):
    tok_dir = _chat_tokenizer_folder(tmp_path)
    conversations = [*CONVERSATIONS, [user("Count to three."), assistant("one two three")]]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns, "id": i} for i, turns in enumerate(conversations)])
    config = _config(
        tmp_path,
        f"data.path={data}",
        f"student.tokenizer={tok_dir}",
        f"teacher.tokenizer={tok_dir}",
        "training.max_steps=1",
        "training.per_device_train_batch_size=4",
        "training.save_strategy=no",
    )
    trainer = build_trainer(config)
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    for role, model in (("student", trainer.model), ("teacher", trainer.teacher)):
        model.register_forward_pre_hook(
            lambda _m, _a, kwargs, role=role: seen[role].append(kwargs["input_ids"].clone()), with_kwargs=True
        )
    trainer.train()
    assert len(seen["student"]) == len(seen["teacher"]) == 1
    assert torch.equal(seen["student"][0], seen["teacher"][0])
    tok = tokenizer_for(str(tok_dir))
    rows = sorted(decode(tok, [i for i in row.tolist() if i != tok.pad_token_id]) for row in seen["teacher"][0])
    assert rows == sorted(chatml_text(turns) for turns in conversations)


def test_a_streamed_dataset_trains_for_max_steps(tmp_path, hf_cache):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns} for turns in CONVERSATIONS])
    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(CHATML)
    config = _config(
        tmp_path,
        f"data.path={data}",
        "data.streaming=true",
        f"data.template={jinja}",
        "training.max_steps=3",
        "training.per_device_train_batch_size=2",
    )
    examples, held_out = training_examples(
        config.data, training_arguments(config.training), chat_tokenizer(template=None)
    )
    assert isinstance(examples, ExampleStream) and held_out == []
    assert len(examples) == 3 * 2  # what one process trains on: max_steps x batch x accumulation
    assert ExampleDataset(examples) is examples.dataset  # the Trainer gets the stream itself
    first = next(iter(examples.dataset))
    assert trained_runs(chat_tokenizer(), first["input_ids"], first["labels"]) == expected_runs(CONVERSATIONS[0])
    trainer = build_trainer(config)
    assert isinstance(trainer.train_dataset, datasets.IterableDataset)
    # Three steps of two examples from a stream of three: the Trainer starts the stream over.
    assert run(config)["global_step"] == 3
    saved = tokenizer_for(str(tmp_path / "run" / "final"))
    assert saved.chat_template == CHATML  # the template trained with is saved with the model


def test_a_tokenizer_without_a_chat_template_stops_the_cli_with_one_line(tmp_path, capsys, hf_cache):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": SINGLE}])
    code = main(
        ["train", str(TINY), f"training.output_dir={tmp_path / 'out'}", "data.source=null", f"data.path={data}"]
    )
    line = one_line_error(code, capsys.readouterr().err)
    assert line == (
        "adakd: error: data.format messages needs a chat template: the tokenizer 'byte' has none; set data.template "
        "to a template name (qwen2) or a Jinja file"
    )
    bad = write_jsonl(tmp_path / "qa.jsonl", [{"question": "?", "answer": "!"}])
    code = main(
        ["train", str(TINY), f"training.output_dir={tmp_path / 'out2'}", "data.source=null", f"data.path={bad}"]
    )
    line = one_line_error(code, capsys.readouterr().err)
    assert line.startswith(f"adakd: error: {bad} (train) row 0: fits no data format: needs 'messages' (messages), ")
    assert line.endswith("its columns: 'answer', 'question'")


# ---------------------------------------------------------------------------------------------- docs


def _doc_block(name: str) -> str:
    text = (ROOT / "docs" / "data.md").read_text()
    match = re.search(rf"<!-- docs-test: {name} -->\n```\w+\n(.*?)```", text, re.S)
    assert match, name
    return match.group(1)


def test_the_docs_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    exec(compile(_doc_block("write-data"), "docs/data.md", "exec"), {})
    (tmp_path / "chat.yaml").write_text(_doc_block("config"))
    assert main(["train", "chat.yaml", "training.disable_tqdm=true"]) == 0
    assert "data: format messages (detected from the first record)" in capsys.readouterr().out
    assert (tmp_path / "outputs" / "chat" / "final" / "config.json").is_file()
    exec(compile(_doc_block("python"), "docs/data.md", "exec"), {})
    out = capsys.readouterr().out
    assert "messages {'kept': 3," in out and "trained tokens" in out
    assert textwrap.dedent(_doc_block("config")).startswith("# adakd train chat.yaml")
