"""Per-token inspection of AdaKD: which response tokens are hard, which LATF keeps, and what τ IDTS gives them.

:func:`analyse` runs a teacher and a student over one prompt + response (the response followed by eos, as in
training) and returns a :class:`TokenInfo` per response token: its Hellinger difficulty (Eq. 3), whether it
is among the k = max(1, floor(N·r)) hardest (LATF at a fixed ratio), its IDTS temperature over the kept tokens'
lower median (Eqs. 9-10), and both models' probability of the actual token. :func:`render_html` turns the result
into a self-contained page (inline CSS, no script), :func:`render_text` into a terminal table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..adaptive import difficulty_scores, select_tokens
from ..loss import align_vocab

__all__ = [
    "PALETTE",
    "TokenInfo",
    "analyse",
    "colour",
    "render_html",
    "render_text",
    "scale_range",
    "summarize_tokens",
    "token_pieces",
]


@dataclass(frozen=True)
class TokenInfo:
    """One response token (the appended eos included, with ``special=True``).

    Attributes:
        position: index in the response, 0-based.
        token_id: the token's id.
        text: its decoded piece; the pieces concatenate to the decoded response. A token that ends inside a
            multi-byte character has the piece ``""`` and the token completing the character carries it.
        score: Hellinger difficulty in [0, 1] (higher = harder).
        rank: 1 for the hardest token, N for the easiest (ties in position order).
        kept: among the k hardest at the given ratio.
        tau: the IDTS temperature of a kept token, ``None`` for a dropped one.
        weight: the factor on a kept token's loss: τ² (``tau_weight="squared"``, Eq. 2) or 1 (``"none"``); ``None``
            for a dropped one.
        p_teacher: the teacher's probability of this token (over the student's vocabulary, as the loss sees it).
        p_student: the student's probability of this token.
        special: the eos appended after the response.
    """

    position: int
    token_id: int
    text: str
    score: float
    rank: int
    kept: bool
    tau: float | None
    p_teacher: float
    p_student: float
    special: bool = False
    weight: float | None = None


# ---------------------------------------------------------------------------------------------- computation


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The decoded text of each token, such that ``"".join(pieces) == tokenizer.decode(ids)``.

    ``decode([id])`` alone is wrong for byte-level vocabularies (a byte of "é" decodes to "\\ufffd") and for
    SentencePiece (which drops a word's leading space), so each piece is the growth of the decoded prefix; a prefix
    that ends in an incomplete character gives the piece ``""`` and the next token takes the whole character.
    """
    pieces: list[str] = []
    committed = ""
    ids = [int(i) for i in ids]
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if i < len(ids) - 1 and text.endswith("\ufffd"):
            pieces.append("")
            continue
        if text.startswith(committed):
            pieces.append(text[len(committed) :])
            committed = text
        else:
            # A tokenizer whose prefixes re-decode differently: fall back to the token alone.
            piece = tokenizer.decode([ids[i]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            pieces.append(piece)
            committed += piece
    return pieces


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    """``[T, V]`` float32 logits on the CPU, computed in eval mode (no dropout); the model's mode is restored."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=_device(model))
    training = getattr(model, "training", False)
    model.eval()
    try:
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        model.train(training)
    return out.logits[0].float().cpu()


def _context_ids(tokenizer: Any, prompt: str | None) -> list[int]:
    if prompt:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    # Without a prompt the first response token still needs a position predicting it: start the text like a
    # pretraining document, after bos (or the eos that separates documents when there is no bos).
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a bos nor an eos token to start a response without a prompt")
    return [int(start)]


@torch.no_grad()
def analyse(
    teacher: Any,
    student: Any,
    tokenizer: Any,
    prompt: str | None,
    response: str,
    ratio: float = 0.75,
    c: float = 0.5,
    tau_base: float = 1.0,
    tau_weight: str = "squared",
) -> list[TokenInfo]:
    """Score every response token of ``prompt + response + eos`` as AdaKD's loss would, at a fixed ratio.

    The prompt and the response are tokenized separately without special tokens, and eos is appended (as
    :func:`adakd.data.build_examples` does). Position i's logits predict token i + 1; the teacher's extra vocabulary
    rows are cropped (:func:`adakd.align_vocab`).

    Args:
        teacher, student: causal LMs (``model(input_ids=...).logits``), each on its own device; they run in eval
            mode (no dropout) and are left in the mode they were in.
        tokenizer: shared by both; must have an eos.
        prompt: the formatted prompt, not scored; ``None`` or ``""``: none (the text then starts after bos).
        response: the text to score.
        ratio: r ∈ (0, 1]; k = max(1, floor(N·r)) tokens are kept.
        c: IDTS strength.
        tau_base: τ of a kept token at the kept tokens' median difficulty.
        tau_weight: ``squared`` (each kept token's loss times τ²) or ``none``: the ``weight`` shown per token.

    Returns:
        One :class:`TokenInfo` per response token, the eos last, in order.

    Raises:
        ValueError: a ratio outside (0, 1], a tokenizer without eos, or vocabularies that cannot be aligned.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if tau_weight not in ("squared", "none"):
        raise ValueError(f"tau_weight must be squared or none, got {tau_weight!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; load it with adakd.data.tokenizer_for")
    context = _context_ids(tokenizer, prompt)
    response_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], int(eos)]
    ids = context + response_ids
    start, end = len(context) - 1, len(ids) - 1  # the positions whose logits predict the response tokens
    s_logits, t_logits = align_vocab(
        _logits(student, ids)[start:end], _logits(teacher, ids)[start:end], vocab_size=len(tokenizer)
    )
    labels = torch.tensor(response_ids, dtype=torch.long)
    scores = difficulty_scores("hellinger", s_logits, t_logits).float()
    p_student = torch.log_softmax(s_logits, -1).gather(-1, labels[:, None]).squeeze(-1).exp()
    p_teacher = torch.log_softmax(t_logits, -1).gather(-1, labels[:, None]).squeeze(-1).exp()

    n = len(response_ids)
    selection = select_tokens(scores, ratio, c=c, tau_base=tau_base)  # the loss's own rule
    order = torch.argsort(scores, descending=True, stable=True)  # the same order select_tokens keeps by
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(1, n + 1)
    kept = selection.kept
    taus = torch.full((n,), math.nan)
    taus[selection.index] = selection.tau.float()

    pieces = token_pieces(tokenizer, response_ids)
    return [
        TokenInfo(
            position=i,
            token_id=response_ids[i],
            text=pieces[i],
            score=float(scores[i]),
            rank=int(rank[i]),
            kept=bool(kept[i]),
            tau=float(taus[i]) if kept[i] else None,
            p_teacher=float(p_teacher[i]),
            p_student=float(p_student[i]),
            special=i == n - 1,
            weight=(float(taus[i]) ** 2 if tau_weight == "squared" else 1.0) if kept[i] else None,
        )
        for i in range(n)
    ]


def summarize_tokens(infos: Sequence[TokenInfo]) -> dict[str, float | int]:
    """Totals over :func:`analyse` output: ``n``, ``k`` (kept), ``median`` m (the lower median of the kept scores,
    IDTS's), ``mean_score``, ``tau_min``, ``tau_max``, ``kept_min_score`` (the selection threshold)."""
    kept = [t for t in infos if t.kept]
    scores = sorted(t.score for t in kept)
    taus = [t.tau for t in kept if t.tau is not None]
    return {
        "n": len(infos),
        "k": len(kept),
        "median": scores[(len(scores) - 1) // 2] if scores else math.nan,  # torch.median's lower median
        "mean_score": sum(t.score for t in infos) / len(infos) if infos else math.nan,
        "tau_min": min(taus) if taus else math.nan,
        "tau_max": max(taus) if taus else math.nan,
        "kept_min_score": scores[0] if scores else math.nan,
    }


# ---------------------------------------------------------------------------------------------- colours

# ColorBrewer YlOrRd (9 classes): a sequential scale that stays ordered in greyscale and for common colour-vision
# deficiencies, pale for easy tokens and dark red for hard ones.
PALETTE = ("#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026")


def _nice_step(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 (× a power of ten) that is ≥ ``x`` > 0."""
    exp = math.floor(math.log10(x))
    return next(m * 10.0**exp for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * 10.0**exp >= x * (1 - 1e-9))


def scale_range(scores: Sequence[float]) -> tuple[float, float]:
    """The colour scale's ends: the scores' range widened to round numbers, within [0, 1].

    LATF's choice is relative (the k hardest of this response), so the scale spans this response's scores rather
    than the whole of [0, 1], where a page of similar scores would be a single colour; the legend gives the ends.
    """
    finite = [float(s) for s in scores if math.isfinite(s)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    step = _nice_step(max(high - low, 1e-3) / 4)
    low = max(0.0, math.floor(low / step + 1e-9) * step)
    high = min(1.0, math.ceil(high / step - 1e-9) * step)
    if high - low < step:  # all scores equal (or at a bound)
        low, high = (max(0.0, high - step), high) if high >= 1.0 else (low, low + step)
    return low, high


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def colour(score: float, low: float = 0.0, high: float = 1.0) -> str:
    """The palette colour of ``score`` on the scale [``low``, ``high``] (clamped), interpolated, as ``#rrggbb``."""
    x = 0.0 if not math.isfinite(score) or high <= low else min(max((score - low) / (high - low), 0.0), 1.0)
    pos = x * (len(PALETTE) - 1)
    lo = min(int(pos), len(PALETTE) - 2)
    frac = pos - lo
    a, b = _rgb(PALETTE[lo]), _rgb(PALETTE[lo + 1])
    return "#" + "".join(f"{round(u + (v - u) * frac):02x}" for u, v in zip(a, b, strict=True))


def _ink(background: str) -> str:
    r, g, b = (v / 255 for v in _rgb(background))
    return "#fff" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5 else "#1a1a1a"


# ---------------------------------------------------------------------------------------------- HTML


def _visible(piece: str, special: bool = False) -> str:
    """A one-line rendering of a token for tables and tooltips: whitespace shown as ␣ ↵ ⇥."""
    if piece == "":
        return "(part of a character)"
    if special:
        return piece
    return piece.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "\u240d")


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _tooltip(t: TokenInfo, n: int) -> str:
    state = "dropped (no loss)"
    if t.kept and t.tau is not None:
        weight = "" if t.weight is None else f" \u00b7 loss weight {t.weight:.4f}"
        state = f"kept \u00b7 \u03c4 = {t.tau:.4f}{weight}"
    eos = ", eos" if t.special else ""
    return (
        f"token {t.position}: \u201c{_visible(t.text, t.special)}\u201d (id {t.token_id}{eos})\n"
        f"difficulty {t.score:.4f} \u00b7 rank {t.rank} of {n}\n"
        f"{state}\n"
        f"p_teacher {t.p_teacher:.4f} \u00b7 p_student {t.p_student:.4f}"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "\u2013" if value is None else str(value)


def render_html(
    infos: Sequence[TokenInfo],
    title: str,
    settings: Mapping[str, Any],
    *,
    prompt: str | None = None,
    scale: tuple[float | None, float | None] = (None, None),
    top: int = 20,
) -> str:
    """A self-contained HTML page (inline CSS, no script, no external resource) of :func:`analyse` output.

    The response is shown token by token, each a ``<span class="tok ...">`` holding exactly its piece (escaped),
    coloured by difficulty on a sequential scale with a legend; kept tokens are bold and outlined, dropped ones
    dimmed; each span's ``title`` gives its difficulty, rank, τ and both probabilities. Below: the ``top`` hardest
    tokens in a table.

    Args:
        infos: :func:`analyse` output.
        title: the page's heading.
        settings: shown in the header in order (models, ratio, c, ...); k of N, m and τ's range are added.
        prompt: shown folded above the response when given.
        scale: the colour scale's ends ``(low, high)``; a ``None`` end comes from :func:`scale_range`.
        top: rows of the hardest-tokens table.
    """
    n = len(infos)
    auto = scale_range([t.score for t in infos])
    ends = (auto[0] if scale[0] is None else float(scale[0]), auto[1] if scale[1] is None else float(scale[1]))
    if not ends[0] < ends[1]:
        raise ValueError(f"the colour scale needs low < high, got {ends[0]} and {ends[1]}")
    stats = summarize_tokens(infos)
    rows = [(str(k), _fmt(v)) for k, v in settings.items()]
    rows += [
        ("kept", f"{stats['k']} of {stats['n']} tokens"),
        ("median m (kept)", _num(stats["median"])),
        ("threshold (k-th score)", _num(stats["kept_min_score"])),
        ("\u03c4 range (kept)", f"{_num(stats['tau_min'])} \u2013 {_num(stats['tau_max'])}"),
        ("mean difficulty", _num(stats["mean_score"])),
    ]
    low, high = ends
    kept_bg, drop_bg = colour(0.8, 0.0, 1.0), colour(0.15, 0.0, 1.0)
    legend = {
        "stops": ",".join(f"{c} {100 * i / (len(PALETTE) - 1):.1f}%" for i, c in enumerate(PALETTE)),
        "ticks": [f"{low + (high - low) * i / 4:.4g}" for i in range(5)],
        "unit_scale": (low, high) == (0.0, 1.0),
        "kept_bg": kept_bg, "kept_ink": _ink(kept_bg), "drop_bg": drop_bg,
    }  # fmt: skip
    return _template().render(
        title=title, settings=rows, legend=legend, prompt=prompt,
        tokens=[_token_view(t, n, ends) for t in infos],
        top_rows=[_row_view(t, ends) for t in sorted(infos, key=lambda t: t.rank)[:top]],
    )  # fmt: skip


def _template():
    """The page template (``templates/tokens.html.j2``), HTML-escaped by default; ``text`` keeps a raw CR as a
    character reference (the HTML parser would turn it into LF) and ``attr`` does the same for LF in attributes."""
    import jinja2
    from markupsafe import Markup, escape

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("adakd.report", "templates"), autoescape=True, keep_trailing_newline=True
    )
    env.filters["text"] = lambda piece: Markup(str(escape(piece)).replace("\r", "&#13;"))
    env.filters["attr"] = lambda text: Markup(str(escape(text)).replace("\n", "&#10;").replace("\r", "&#13;"))
    return env.get_template("tokens.html.j2")


def _token_view(t: TokenInfo, n: int, scale: tuple[float, float]) -> dict[str, Any]:
    bg = colour(t.score, *scale)
    classes = ["tok", "kept" if t.kept else "drop"]
    if t.special:
        classes.append("special")
    if t.text == "":
        classes.append("empty")
    elif "\n" in t.text and not t.text.strip():
        classes.append("nl")
    state = "dropped (no loss)"
    if t.kept and t.tau is not None:
        weight = "" if t.weight is None else f" \u00b7 loss weight {t.weight:.4f}"
        state = f"kept \u00b7 \u03c4 = {t.tau:.4f}{weight}"
    tooltip = (
        f"token {t.position}: \u201c{_visible(t.text, t.special)}\u201d "
        f"(id {t.token_id}{', eos' if t.special else ''})\n"
        f"difficulty {t.score:.4f} \u00b7 rank {t.rank} of {n}\n{state}\n"
        f"p_teacher {t.p_teacher:.4f} \u00b7 p_student {t.p_student:.4f}"
    )
    return {
        "classes": " ".join(classes), "bg": bg, "ink": _ink(bg), "position": t.position,
        "score": f"{t.score:.6f}", "tooltip": tooltip, "text": t.text,
    }  # fmt: skip


def _row_view(t: TokenInfo, scale: tuple[float, float]) -> dict[str, Any]:
    return {
        "rank": t.rank, "position": t.position, "token": _visible(t.text, t.special), "token_id": t.token_id,
        "width": round(100 * min(max(t.score, 0.0), 1.0)),  # on [0, 1], unlike the colour
        "bg": colour(t.score, *scale), "score": f"{t.score:.4f}", "kept": "yes" if t.kept else "no",
        "tau": _num(t.tau), "p_teacher": f"{t.p_teacher:.4f}", "p_student": f"{t.p_student:.4f}",
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- text


def _cell(piece: str, special: bool, width: int) -> str:
    shown = piece if special else repr(piece)
    return shown if len(shown) <= width else shown[: width - 1] + "\u2026"


def render_text(infos: Sequence[TokenInfo], settings: Mapping[str, Any] | None = None) -> str:
    """A terminal table, one row per token (position, token, id, difficulty, rank, kept, τ, loss weight, p_teacher,
    p_student),
    then a summary line. Token text is shown as a Python literal (``'\\n'``), cut to 18 characters."""
    header = (
        f"{'pos':>5}  {'token':<18}  {'id':>7}  {'difficulty':>10}  {'rank':>5}  {'kept':>4}  {'tau':>7}  "
        f"{'weight':>7}  {'p_teacher':>9}  {'p_student':>9}"
    )
    lines = [header, "-" * len(header)]
    for t in infos:
        lines.append(
            f"{t.position:>5}  {_cell(t.text, t.special, 18):<18}  {t.token_id:>7}  {t.score:>10.4f}  {t.rank:>5}  "
            f"{'yes' if t.kept else 'no':>4}  {_num(t.tau):>7}  {_num(t.weight):>7}  {t.p_teacher:>9.4f}  "
            f"{t.p_student:>9.4f}"
        )
    stats = summarize_tokens(infos)
    head = ", ".join(f"{k} {_fmt(v)}" for k, v in (settings or {}).items())
    lines.append(
        (f"{head}: " if head else "") + f"kept {stats['k']} of {stats['n']} tokens; median m {_num(stats['median'])}, "
        f"threshold {_num(stats['kept_min_score'])}, tau {_num(stats['tau_min'])}-{_num(stats['tau_max'])}, "
        f"mean difficulty {_num(stats['mean_score'])}"
    )
    return "\n".join(lines) + "\n"
