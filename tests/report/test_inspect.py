"""``adakd inspect``: per-token difficulty, kept set and τ against a direct computation; the HTML and text reports;
the CLI end to end; a headless-Chromium screenshot of the page when Chromium is installed.

Two tiny random Qwen2 models share the byte tokenizer; the teacher has 272 vocabulary rows to the student's 260, so
the crop of the teacher's padding rows is exercised.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from adakd import difficulty_scores, idts_temperatures
from adakd.adaptive import keep_count
from adakd.analysis import TokenInfo, analyse, summarize_tokens, token_pieces
from adakd.cli import inspect as inspect_cli
from adakd.data import tokenizer_for
from adakd.report.tokens import colour, render_html, render_text, scale_range

transformers = pytest.importorskip("transformers")

EOS_TEXT = "<|endoftext|>"
PROMPT = "### Instruction:\nEscape this.\n\n### Response:\n"
# Markup, an ampersand, newlines, a tab, and multi-byte characters (2 and 3 bytes: pieces must not split them).
RESPONSE = 'Use <b>bold</b> & "quotes";\nnaïve café, 日本.\n\n\tend'


def _tiny(vocab: int, seed: int):
    config = transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        # Larger than the default 0.02, so the two models' distributions differ visibly token by token.
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    return tokenizer_for("byte")


@pytest.fixture(scope="module")
def models():
    return _tiny(272, 0), _tiny(260, 1)


@pytest.fixture(scope="module")
def saved(models, tok, tmp_path_factory):
    """The two models on disk; the student directory also holds the tokenizer (as `adakd train` leaves it)."""
    root = tmp_path_factory.mktemp("inspect_models")
    teacher, student = models
    teacher.save_pretrained(root / "teacher")
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    return root / "teacher", root / "student"


def _direct(teacher, student, tok, prompt: str, response: str):
    """The reference: the training example's ids, shifted logits, cropped teacher, Eq. 3 scores."""
    context = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else [tok.bos_token_id]
    target = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([context + target])
    with torch.no_grad():
        s = student(input_ids=ids).logits[0, len(context) - 1 : -1].float()
        t = teacher(input_ids=ids).logits[0, len(context) - 1 : -1].float()
    t = t[:, : s.shape[-1]]
    labels = torch.tensor(target)
    scores = difficulty_scores("hellinger", s, t)
    p_s = torch.softmax(s, -1)[torch.arange(len(target)), labels]
    p_t = torch.softmax(t, -1)[torch.arange(len(target)), labels]
    return target, scores, p_t, p_s


# ---------------------------------------------------------------------------------------------- analyse


@pytest.mark.parametrize("ratio", [0.75, 0.3, 1.0, 0.01])
def test_analyse_matches_a_direct_computation(models, tok, ratio):
    teacher, student = models
    infos = analyse(teacher, student, tok, PROMPT, RESPONSE, ratio=ratio, c=0.5, tau_base=1.3)
    target, scores, p_t, p_s = _direct(teacher, student, tok, PROMPT, RESPONSE)
    n = len(target)
    assert len(infos) == n and all(isinstance(t, TokenInfo) for t in infos)
    assert [t.position for t in infos] == list(range(n))
    assert [t.token_id for t in infos] == target
    got = torch.tensor([t.score for t in infos])
    torch.testing.assert_close(got, scores, rtol=1e-5, atol=1e-6)
    assert float(scores.max() - scores.min()) > 1e-3  # the models differ: the kept set is not arbitrary
    torch.testing.assert_close(torch.tensor([t.p_teacher for t in infos]), p_t, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.tensor([t.p_student for t in infos]), p_s, rtol=1e-4, atol=1e-7)

    k = keep_count(n, ratio)
    kept = [t for t in infos if t.kept]
    dropped = [t for t in infos if not t.kept]
    assert len(kept) == k
    if dropped:
        assert min(t.score for t in kept) >= max(t.score for t in dropped)
    assert all(t.tau is None for t in dropped) and all(t.tau is not None for t in kept)
    expected_tau = idts_temperatures(torch.tensor([t.score for t in kept]), c=0.5, tau_base=1.3)
    torch.testing.assert_close(torch.tensor([t.tau for t in kept]), expected_tau)

    # Ranks: a permutation of 1..N in descending score order, and kept = rank <= k.
    assert sorted(t.rank for t in infos) == list(range(1, n + 1))
    by_rank = sorted(infos, key=lambda t: t.rank)
    assert all(a.score >= b.score for a, b in zip(by_rank, by_rank[1:], strict=False))
    assert all(t.kept == (t.rank <= k) for t in infos)

    assert "".join(t.text for t in infos) == RESPONSE + EOS_TEXT
    assert [t.special for t in infos] == [False] * (n - 1) + [True]

    stats = summarize_tokens(infos)
    assert (stats["n"], stats["k"]) == (n, k)
    assert stats["median"] == pytest.approx(float(torch.tensor([t.score for t in kept]).median()))


def test_analyse_without_prompt_starts_after_bos(models, tok):
    teacher, student = models
    infos = analyse(teacher, student, tok, None, "abc")
    target, scores, _, _ = _direct(teacher, student, tok, "", "abc")
    assert [t.token_id for t in infos] == target == [97, 98, 99, tok.eos_token_id]
    torch.testing.assert_close(torch.tensor([t.score for t in infos]), scores, rtol=1e-5, atol=1e-6)
    assert [t.kept for t in infos].count(True) == keep_count(4, 0.75) == 3


def test_analyse_empty_response_scores_the_eos(models, tok):
    infos = analyse(*models, tok, PROMPT, "")
    assert len(infos) == 1 and infos[0].special and infos[0].kept and infos[0].tau == pytest.approx(1.0)


def test_analyse_restores_the_training_mode(models, tok):
    teacher, student = models
    student.train()
    try:
        analyse(teacher, student, tok, PROMPT, "hi")
        assert student.training and not teacher.training
    finally:
        student.eval()


def test_analyse_rejects_bad_input(models, tok):
    teacher, student = models
    with pytest.raises(ValueError, match="ratio"):
        analyse(teacher, student, tok, PROMPT, "hi", ratio=0.0)
    # A student larger than the teacher cannot be aligned by cropping.
    with pytest.raises(ValueError, match="larger than the teacher"):
        analyse(student, teacher, tok, PROMPT, "hi")


def test_token_pieces_keep_multibyte_characters_whole(tok):
    text = "aé日🙂\n<&>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids) == len(text.encode("utf-8"))
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    # Each character lands whole on its last byte; the bytes before it have empty pieces.
    assert pieces[:3] == ["a", "", "é"] and pieces[3:6] == ["", "", "日"] and pieces[6:10] == ["", "", "", "🙂"]


# ---------------------------------------------------------------------------------------------- colours


def test_scale_range_is_round_and_within_unit_interval():
    assert scale_range([0.21, 0.24]) == pytest.approx((0.21, 0.24))
    assert scale_range([0.03, 0.86]) == pytest.approx((0.0, 1.0))
    low, high = scale_range([0.5, 0.5])
    assert low <= 0.5 < high or low < 0.5 <= high
    assert scale_range([1.0, 1.0])[1] == 1.0 and scale_range([1.0])[0] < 1.0
    assert scale_range([]) == (0.0, 1.0)


def test_colour_scale_is_sequential():
    # Lightness falls monotonically from easy to hard (a sequential scale).
    def lightness(hex_colour: str) -> float:
        r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    values = [lightness(colour(x / 20)) for x in range(21)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert colour(-1.0) == colour(0.0) and colour(2.0) == colour(1.0) and colour(math.nan) == colour(0.0)
    assert colour(0.3, 0.3, 0.5) == colour(0.0) and colour(0.5, 0.3, 0.5) == colour(1.0)


# ---------------------------------------------------------------------------------------------- HTML


class _Page(HTMLParser):
    """Collects the token spans (class ``tok``) with their text and attributes, table rows, and any scripts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.spans: list[dict] = []
        self.in_span = False
        self.rows = 0
        self.tags: list[str] = []
        self.stack: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag not in ("meta", "br", "img", "link", "input"):
            self.stack.append(tag)
        for key in ("src", "href"):
            if key in attrs:
                self.external.append(attrs[key])
        if tag == "tr":
            self.rows += 1
        if tag == "span" and "tok" in attrs.get("class", "").split():
            assert not self.in_span, "token spans must not nest"
            self.in_span = True
            self.spans.append({**attrs, "text": ""})

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "span" and self.in_span:
            self.in_span = False

    def handle_data(self, data):
        if self.in_span:
            self.spans[-1]["text"] += data


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], f"unclosed tags: {parser.stack}"
    return parser


def test_render_html_is_self_contained_and_faithful(models, tok):
    infos = analyse(*models, tok, PROMPT, RESPONSE, ratio=0.5)
    settings = {"teacher": "t<1>", "student": "s&2", "ratio r": 0.5, "c": 0.5}
    page = render_html(infos, "inspect <test>", settings, prompt=PROMPT)
    parsed = _parse(page)

    # One span per token, in order, whose texts reproduce the response (and the eos) exactly.
    assert len(parsed.spans) == len(infos)
    assert [int(s["data-i"]) for s in parsed.spans] == list(range(len(infos)))
    assert "".join(s["text"] for s in parsed.spans) == RESPONSE + EOS_TEXT
    # The markup of the response is escaped, never live; the settings and title are escaped too.
    assert "b" not in parsed.tags and "<b>" not in page
    assert '">&lt;</span>' in page and '">&amp;</span>' in page and '">&gt;</span>' in page
    assert "inspect &lt;test&gt;" in page and "t&lt;1&gt;" in page and "s&amp;2" in page
    assert "naïve café, 日本" in "".join(s["text"] for s in parsed.spans)
    assert '<meta charset="utf-8">' in page

    # Kept / dropped classes, colours and tooltips.
    k = sum(t.kept for t in infos)
    assert sum("kept" in s["class"].split() for s in parsed.spans) == k
    assert sum("drop" in s["class"].split() for s in parsed.spans) == len(infos) - k
    for span, info in zip(parsed.spans, infos, strict=True):
        assert f"difficulty {info.score:.4f}" in span["title"]
        assert f"p_teacher {info.p_teacher:.4f}" in span["title"] and f"p_student {info.p_student:.4f}" in span["title"]
        assert f"τ = {info.tau:.4f}" in span["title"] if info.kept else "dropped" in span["title"]
        assert "background:#" in span["style"]
    assert len({s["style"] for s in parsed.spans}) > 3  # difficulties map to several colours
    assert any("nl" in s["class"].split() for s in parsed.spans)  # newline tokens are marked

    # The header, the legend, the prompt, the top-20 table; no script and nothing fetched.
    stats = summarize_tokens(infos)
    assert f"{stats['k']} of {stats['n']} tokens" in page
    assert f"{stats['median']:.4f}" in page
    assert "linear-gradient" in page and "easy" in page and "hard" in page
    assert "<details>" in page and "### Instruction:" in page
    assert parsed.rows == 1 + min(20, len(infos))
    assert "script" not in parsed.tags and parsed.external == []
    assert "http" not in page and "url(" not in page


def test_render_html_carriage_return_survives(models, tok):
    infos = analyse(*models, tok, None, "a\r\nb")
    page = render_html(infos, "cr", {})
    assert "".join(s["text"] for s in _parse(page).spans) == "a\r\nb" + EOS_TEXT


def test_render_html_scale_override_and_errors(models, tok):
    infos = analyse(*models, tok, None, "abc")
    page = render_html(infos, "t", {}, scale=(0.0, 1.0))
    assert "<span>0</span>" in page and "<span>1</span>" in page
    with pytest.raises(ValueError, match="low < high"):
        render_html(infos, "t", {}, scale=(0.5, 0.5))


# ---------------------------------------------------------------------------------------------- text


def test_render_text_has_one_row_per_token_and_a_summary(models, tok):
    infos = analyse(*models, tok, PROMPT, RESPONSE)
    out = render_text(infos, {"ratio": 0.75})
    lines = out.rstrip("\n").split("\n")
    assert lines[0].split() == [
        "pos", "token", "id", "difficulty", "rank", "kept", "tau", "weight", "p_teacher", "p_student",
    ]  # fmt: skip
    assert len(lines) == 2 + len(infos) + 1
    rows = lines[2:-1]
    for row, info in zip(rows, infos, strict=True):
        assert f"{info.score:.4f}" in row and f"{info.p_student:.4f}" in row
        assert ("yes" in row.split()) == info.kept
    assert "'\\n'" in out and EOS_TEXT in rows[-1]
    stats = summarize_tokens(infos)
    assert lines[-1].startswith("ratio 0.75: ") and f"kept {stats['k']} of {stats['n']} tokens" in lines[-1]


# ---------------------------------------------------------------------------------------------- CLI


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adakd")
    inspect_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["inspect", *argv])


def test_cli_text_to_html(saved, tmp_path, capsys):
    teacher, student = saved
    out = tmp_path / "tokens.html"
    args = _args(
        "--teacher", str(teacher), "--student", str(student), "--text", RESPONSE, "--prompt", PROMPT,
        "--ratio", "0.5", "--c", "0.7", "--output", str(out), "--device", "cpu",
    )  # fmt: skip
    assert args.handler is inspect_cli.run
    assert inspect_cli.run(args) == 0
    page = out.read_text(encoding="utf-8")
    spans = _parse(page).spans
    assert "".join(s["text"] for s in spans) == RESPONSE + EOS_TEXT
    n = len(RESPONSE.encode("utf-8")) + 1
    assert f"{keep_count(n, 0.5)} of {n} tokens" in page
    assert str(teacher) in page and "0.7" in page
    assert "wrote" in capsys.readouterr().err


def test_cli_text_format_prints_the_table(saved, capsys):
    teacher, student = saved
    args = _args("--teacher", str(teacher), "--student", str(student), "--tokenizer", "byte", "--text", "hi!",
                 "--format", "text", "--device", "cpu")  # fmt: skip
    assert inspect_cli.run(args) == 0
    out = capsys.readouterr().out.rstrip("\n").split("\n")
    assert len(out) == 2 + 4 + 1 and "kept 3 of 4 tokens" in out[-1]


def test_cli_data_index(saved, tmp_path, models, tok):
    teacher, student = saved
    data = tmp_path / "valid.jsonl"
    rows = [
        {"prompt": "first prompt\n", "output": "first"},
        {"prompt": PROMPT, "output": [RESPONSE, "another reference"]},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "page.html"
    args = _args("--teacher", str(teacher), "--student", str(student), "--data", str(data), "--index", "1",
                 "--output", str(out), "--device", "cpu")  # fmt: skip
    assert inspect_cli.run(args) == 0
    spans = _parse(out.read_text(encoding="utf-8")).spans
    assert "".join(s["text"] for s in spans) == RESPONSE + EOS_TEXT
    expected = analyse(*models, tok, PROMPT, RESPONSE)
    for span, info in zip(spans, expected, strict=True):
        assert float(span["data-score"]) == pytest.approx(info.score, abs=2e-6)

    text_out = tmp_path / "table.txt"
    args = _args("--teacher", str(teacher), "--student", str(student), "--data", str(data), "--index", "0",
                 "--format", "text", "--output", str(text_out), "--device", "cpu")  # fmt: skip
    assert inspect_cli.run(args) == 0
    assert "kept 4 of 6 tokens" in text_out.read_text(encoding="utf-8")  # "first" + eos: k = floor(6 * 0.75)


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--index", "2", "--format", "text"], r"--index 2: --data .*valid\.jsonl has only 2 records"),
        (["--index", "-1", "--format", "text"], r"--index -1: .*--data .*valid\.jsonl"),
        ([], r"--data .*valid\.jsonl: .*--index"),
        (["--index", "0", "--prompt", "p"], r"--prompt"),
        (["--index", "0", "--format", "html"], r"--output"),
        (["--index", "0", "--ratio", "1.5", "--output", "x.html"], r"--ratio"),
        (["--index", "0", "--tau-base", "0", "--output", "x.html"], r"--tau-base"),
        (["--index", "0", "--scale-min", "0.6", "--scale-max", "0.4", "--output", "x.html"], r"--scale-min"),
    ],
)
def test_cli_bad_arguments(tmp_path, extra, pattern):
    data = tmp_path / "valid.jsonl"
    data.write_text('{"prompt": "p", "output": "a"}\n\n{"prompt": "q", "output": ["b"]}\n', encoding="utf-8")
    # The flags are checked before any model is loaded: these model paths do not exist.
    args = _args("--teacher", str(tmp_path / "none"), "--student", str(tmp_path / "none"), "--data", str(data), *extra)
    with pytest.raises(ValueError, match=pattern):
        inspect_cli.run(args)


def test_cli_missing_data_file_and_model(saved, tmp_path):
    teacher, student = saved
    args = _args("--teacher", str(teacher), "--student", str(student), "--data", str(tmp_path / "nope.jsonl"),
                 "--index", "0", "--format", "text")  # fmt: skip
    with pytest.raises(ValueError, match=r"--data .*nope\.jsonl: no such file"):
        inspect_cli.run(args)
    args = _args("--teacher", str(tmp_path / "missing"), "--student", str(student), "--text", "x",
                 "--format", "text", "--device", "cpu")  # fmt: skip
    with pytest.raises(ValueError, match=r"--teacher .*missing: cannot load"):
        inspect_cli.run(args)


def test_cli_text_and_data_are_exclusive(saved):
    with pytest.raises(SystemExit):
        _args("--teacher", "t", "--student", "s", "--text", "x", "--data", "d.jsonl")


# ---------------------------------------------------------------------------------------------- browser


def test_page_renders_in_headless_chromium(models, tok, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the page's rendering is not checked")
    page = tmp_path / "page.html"
    infos = analyse(*models, tok, PROMPT, RESPONSE)
    page.write_text(render_html(infos, "browser check", {"ratio r": 0.75}, prompt=PROMPT), encoding="utf-8")
    shot = tmp_path / "shot.png"
    cmd = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
        page.resolve().as_uri(),
    ]  # fmt: skip
    try:
        subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("headless chromium did not finish within 120 s")
    assert shot.is_file() and shot.stat().st_size > 0, "chromium wrote no screenshot"
    image = pytest.importorskip("matplotlib.image").imread(str(shot))
    assert image.shape[:2] == (900, 1200)
    rgb = (image[..., :3] * 255).round().astype(int).reshape(-1, 3)
    colours = {tuple(px) for px in rgb[::7].tolist()}
    assert len(colours) > 20, "the screenshot is (nearly) blank"
    # The difficulty palette is on screen: warm pixels (red well above blue) from the tokens and the legend.
    warm = (rgb[:, 0] > 200) & (rgb[:, 0] - rgb[:, 2] > 80)
    assert warm.sum() > 500


def test_the_loss_weight_follows_tau_weight(models, tok):
    squared = analyse(*models, tok, PROMPT, RESPONSE, ratio=0.5, c=1.0)
    none = analyse(*models, tok, PROMPT, RESPONSE, ratio=0.5, c=1.0, tau_weight="none")
    for a, b in zip(squared, none, strict=True):
        assert (a.weight is None) == (not a.kept) and a.tau == b.tau
        if a.kept:
            assert a.weight == pytest.approx(a.tau**2) and b.weight == 1.0
    page = render_html(squared, "w", {"loss weight": "τ² per kept token"})
    assert "loss weight" in page
    with pytest.raises(ValueError, match="tau_weight must be squared or none"):
        analyse(*models, tok, PROMPT, RESPONSE, tau_weight="cubed")


def test_cli_reads_the_runs_own_settings_from_its_final_folder(tmp_path, capsys):
    """A run's final/ folder carries its loss settings: the inspector uses the run's c, tau_base and final ratio,
    not the library's defaults; a flag still wins."""
    from adakd.train import build_trainer, load_config
    from adakd.train.trainer import save_loss_state

    config = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml",
        [f"training.output_dir={tmp_path / 'run'}", "training.max_steps=1", "loss.c=0.9", "loss.tau_base=1.5",
         "loss.selection=fixed", "loss.ratio=0.4"],
    )  # fmt: skip
    trainer = build_trainer(config)
    final = tmp_path / "run" / "final"
    trainer.save_model(str(final))
    trainer.processing_class.save_pretrained(str(final))
    save_loss_state(trainer.loss_fn, final)
    common = ("--teacher", str(final), "--student", str(final), "--text", "hello", "--format", "text")
    args = _args(*common, "--device", "cpu")
    assert inspect_cli.run(args) == 0
    assert (args.ratio, args.c, args.tau_base, args.tau_weight) == (0.4, 0.9, 1.5, "squared")
    assert capsys.readouterr().out.rstrip("\n").split("\n")[-1].startswith("ratio 0.4")
    args = _args(*common, "--c", "0.2", "--device", "cpu")
    assert inspect_cli.run(args) == 0 and args.c == 0.2 and args.ratio == 0.4
