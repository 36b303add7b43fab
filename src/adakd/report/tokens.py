"""The inspector's outputs: :mod:`adakd.analysis` results (one :class:`~adakd.analysis.TokenInfo` per response
token) as a self-contained HTML page (:func:`render_html`: inline CSS, no script, the page's layout in
``templates/tokens.html.j2``) or a terminal table (:func:`render_text`), on a sequential colour scale
(:func:`colour`, :func:`scale_range`). Pure formatting: nothing here loads or runs a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..analysis import TokenInfo, summarize_tokens
from ..errors import InputError

__all__ = ["PALETTE", "colour", "render_html", "render_text", "scale_range"]


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
    """A self-contained HTML page (inline CSS, no script, no external resource) of :func:`adakd.analysis.analyse`
    output.

    The response is shown token by token, each a ``<span class="tok ...">`` holding exactly its piece (escaped),
    coloured by difficulty on a sequential scale with a legend; kept tokens are bold and outlined, dropped ones
    dimmed; each span's ``title`` gives its difficulty, rank, τ and both probabilities. Below: the ``top`` hardest
    tokens in a table.

    Args:
        infos: :func:`adakd.analysis.analyse` output, in token order.
        title: the page's heading.
        settings: shown in the header in order (models, ratio, c, ...); k of N, m and τ's range are added.
        prompt: shown folded above the response when given.
        scale: the colour scale's ends ``(low, high)``; a ``None`` end comes from :func:`scale_range`.
        top: rows of the hardest-tokens table.

    Raises:
        InputError: a colour scale whose low end is not below its high end.
    """
    n = len(infos)
    auto = scale_range([t.score for t in infos])
    ends = (auto[0] if scale[0] is None else float(scale[0]), auto[1] if scale[1] is None else float(scale[1]))
    if not ends[0] < ends[1]:
        raise InputError(f"the colour scale needs low < high, got {ends[0]} and {ends[1]}")
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
        title=title,
        settings=rows,
        legend=legend,
        prompt=prompt,
        tokens=[_token_view(t, n, ends) for t in infos],
        top_rows=[_row_view(t, ends) for t in sorted(infos, key=lambda t: t.rank)[:top]],
    )


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
    return {
        "classes": " ".join(classes),
        "bg": bg,
        "ink": _ink(bg),
        "position": t.position,
        "score": f"{t.score:.6f}",
        "tooltip": _tooltip(t, n),
        "text": t.text,
    }


def _row_view(t: TokenInfo, scale: tuple[float, float]) -> dict[str, Any]:
    return {
        "rank": t.rank,
        "position": t.position,
        "token": _visible(t.text, t.special),
        "token_id": t.token_id,
        "width": round(100 * min(max(t.score, 0.0), 1.0)),  # on [0, 1], unlike the colour
        "bg": colour(t.score, *scale),
        "score": f"{t.score:.4f}",
        "kept": "yes" if t.kept else "no",
        "tau": _num(t.tau),
        "p_teacher": f"{t.p_teacher:.4f}",
        "p_student": f"{t.p_student:.4f}",
    }


# ---------------------------------------------------------------------------------------------- text


def _cell(piece: str, special: bool, width: int) -> str:
    shown = piece if special else repr(piece)
    return shown if len(shown) <= width else shown[: width - 1] + "\u2026"


def render_text(infos: Sequence[TokenInfo], settings: Mapping[str, Any] | None = None) -> str:
    """A terminal table, one row per token (position, token, id, difficulty, rank, kept, τ, loss weight, p_teacher,
    p_student), then a summary line that starts with ``settings`` (``key value`` pairs, in order).

    Token text is shown as a Python literal (``'\\n'``), cut to 18 characters.
    """
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
