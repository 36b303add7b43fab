"""Every chart adakd draws: a training run's curves (LATF ratio, losses, IDTS temperatures) from the rows of
:mod:`adakd.report.metrics`, τ against per-token difficulty, and ROUGE-L of ``adakd eval`` results side by side
(the numbers from :mod:`adakd.eval.tables`, which prints the same as a table).

Each chart is a bare :class:`matplotlib.figure.Figure` on the Agg canvas: no display is needed and a caller's
pyplot backend is never switched. Each ``plot_*`` function writes one PNG (its folder is created), returns its path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .figures import colors as _colors
from .figures import figure as _figure
from .figures import save as _save
from .metrics import is_number, series

__all__ = ["plot_losses", "plot_ratio", "plot_rouge", "plot_tau_vs_difficulty", "plot_temperatures"]

# Dashed and dotted, so that KD and CE stay apart even in a grey-scale print; colour belongs to the run.
_COMPONENTS = (("kd_loss", "KD loss", "--"), ("ce_loss", "CE loss", ":"))
# Losses that span more than this factor (CE ~5 against KD ~0.01) go on a log axis, where both stay readable.
_LOG_SPAN = 20.0


# --- figure plumbing ---------------------------------------------------------------------------------------------


def _curve(ax, steps: list[float], values: list[float], color, label: str) -> None:
    # Markers only on a sparse log (logging_steps close to max_steps), which would otherwise be a few unmarked kinks.
    ax.plot(steps, values, color=color, marker="o" if len(steps) <= 30 else None, markersize=3, label=label)


def _step_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)


def _legend(fig, ax, n_entries: int) -> None:
    if n_entries == 0:
        return
    # Below the plot (constrained layout makes room), so that it never covers a curve.
    fig.legend(fontsize=8, ncols=min(n_entries, 3), loc="outside lower center", frameon=False)


def _check_runs(runs: Mapping[str, Sequence[Mapping]]) -> None:
    if not runs:
        raise ValueError("no runs to plot")


def _title(base: str, runs: Mapping[str, Any]) -> str:
    return f"{base}: {next(iter(runs))}" if len(runs) == 1 else base


def _name(label: str, what: str, runs: Mapping[str, Any]) -> str:
    # One run: the title names it, and the legend only needs to say which curve is which.
    return what if len(runs) == 1 else f"{label}: {what}"


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-9) for x, y in zip(a, b, strict=True))


# --- training curves ---------------------------------------------------------------------------------------------


def plot_ratio(runs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike) -> Path:
    """The LATF kept ratio r (``adakd/ratio``) over optimizer steps, one line per run that logged it.

    Args:
        runs: label → training rows (:func:`adakd.report.metrics.read_metrics`).
        path: the PNG to write (its folder is created).

    Raises:
        ValueError: no run has ``adakd/ratio`` (SFT runs have none).
    """
    _check_runs(runs)
    fig, ax = _figure()
    drawn = 0
    for (label, rows), color in zip(runs.items(), _colors(len(runs)), strict=True):
        steps, ratio = series(rows, "adakd/ratio")
        if steps:
            _curve(ax, steps, ratio, color, _name(label, "kept ratio r", runs))
            drawn += 1
    if not drawn:
        raise ValueError(f"no run has 'adakd/ratio' to plot ({', '.join(runs)}); SFT runs have no LATF ratio")
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("kept ratio r (fraction of valid tokens)")
    _step_axis(ax)
    ax.set_title(_title("LATF kept ratio r", runs))
    _legend(fig, ax, drawn)
    return _save(fig, path)


def plot_losses(runs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike) -> Path:
    """Training loss over optimizer steps, one colour per run; KD loss (dashed) and CE loss (dotted) where logged
    and not the same curve as the loss (kd_ratio = 1 makes ``kd_loss`` equal ``loss``).

    The y axis turns logarithmic when the curves span more than a factor of 20 (CE ≈ 5 next to KD ≈ 0.01).

    Args:
        runs: label → training rows (:func:`adakd.report.metrics.read_metrics`).
        path: the PNG to write (its folder is created).
    """
    _check_runs(runs)
    fig, ax = _figure()
    drawn, values = 0, []
    for (label, rows), color in zip(runs.items(), _colors(len(runs)), strict=True):
        steps, loss = series(rows, "loss")
        _curve(ax, steps, loss, color, _name(label, "loss", runs))
        drawn += 1
        values += loss
        for key, what, style in _COMPONENTS:
            k_steps, k_values = series(rows, key)
            if not k_steps or (k_steps == steps and _close(k_values, loss)):
                continue  # not logged, or the loss itself (kd_ratio = 1): a second line would hide the first
            ax.plot(k_steps, k_values, color=color, linestyle=style, label=_name(label, what, runs))
            drawn += 1
            values += k_values
    positive = [v for v in values if math.isfinite(v) and v > 0]
    if positive and len(positive) == len([v for v in values if math.isfinite(v)]):
        if max(positive) / min(positive) > _LOG_SPAN:
            ax.set_yscale("log")
    ax.set_ylabel("loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    _step_axis(ax)
    ax.set_title(_title("Training loss", runs))
    _legend(fig, ax, drawn)
    return _save(fig, path)


def plot_temperatures(runs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike) -> Path:
    """IDTS temperatures over optimizer steps: mean τ (line) in a shaded band from τ min to τ max, per run.

    The logged min and max are each micro-batch's extremes averaged over the logging window, so the band is the
    typical spread of τ, not the most extreme token of the window. A dotted line marks τ = 1 (τ_base).

    Args:
        runs: label → training rows (:func:`adakd.report.metrics.read_metrics`).
        path: the PNG to write (its folder is created).

    Raises:
        ValueError: no run has ``adakd/tau_mean`` (SFT runs have none).
    """
    _check_runs(runs)
    fig, ax = _figure()
    drawn = 0
    for (label, rows), color in zip(runs.items(), _colors(len(runs)), strict=True):
        steps, mean = series(rows, "adakd/tau_mean")
        if not steps:
            continue
        band = [r for r in rows if all(is_number(r.get(f"adakd/tau_{k}")) for k in ("min", "max"))]
        if band:
            ax.fill_between(
                [float(r["step"]) for r in band],
                [float(r["adakd/tau_min"]) for r in band],
                [float(r["adakd/tau_max"]) for r in band],
                color=color,
                alpha=0.2 if len(runs) == 1 else 0.12,
                linewidth=0,
                label=_name(label, "τ min–max", runs),
            )
            drawn += 1
        _curve(ax, steps, mean, color, _name(label, "mean τ", runs))
        drawn += 1
    if not drawn:
        raise ValueError(f"no run has 'adakd/tau_mean' to plot ({', '.join(runs)}); SFT runs have no temperatures")
    ax.axhline(1.0, color="0.5", linestyle=":", linewidth=1, label="τ = 1")
    ax.set_ylabel("temperature τ")
    _step_axis(ax)
    ax.set_title(_title("IDTS temperatures", runs))
    _legend(fig, ax, drawn + 1)
    return _save(fig, path)


# --- τ against difficulty ----------------------------------------------------------------------------------------


def _vector(values: Any, name: str):
    """``values`` (a tensor on any device and dtype, or a sequence) as a 1-D numpy array; ``name`` for the error."""
    import numpy as np

    if hasattr(values, "detach"):  # a torch tensor, possibly on a GPU or in bfloat16 (which numpy lacks)
        values = values.detach().float().cpu().numpy() if values.is_floating_point() else values.detach().cpu()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {tuple(array.shape)}")
    return array


def _tau_points(scores: Any, taus: Any, kept: Any):
    """``(s, k, t_kept, t_dropped)``: the scores ``[N]``, the kept mask ``[N]``, the kept tokens' τ ``[K]`` and the
    dropped tokens' would-be τ ``[N − K]``, or None when ``taus`` holds the kept tokens' only."""
    import numpy as np

    s = _vector(scores, "scores").astype(float)
    t = _vector(taus, "taus").astype(float)
    k = _vector(kept, "kept")
    if k.dtype != bool:
        if not np.all(np.isin(k, (0, 1))):
            raise ValueError("kept: expected booleans (True where LATF kept the token)")
        k = k.astype(bool)
    n, n_kept = len(s), int(k.sum())
    if n == 0:
        raise ValueError("scores: no tokens to plot")
    if len(k) != n:
        raise ValueError(f"kept: {len(k)} values for {n} scores")
    if len(t) == n:
        return s, k, t[k], t[~k]
    if len(t) == n_kept:
        return s, k, t, None
    raise ValueError(f"taus: {len(t)} values; expected {n} (one per token) or {n_kept} (one per kept token)")


def _idts_curve(median: float, c: float, tau_base: float) -> Callable:
    """x ↦ τ(x) of IDTS at the run's own ``c``, ``tau_base`` and median, in float64 (numpy in, numpy out)."""
    import torch

    from ..adaptive import idts_from_median

    def curve(x):
        return idts_from_median(torch.as_tensor(x, dtype=torch.float64), median, c=c, tau_base=tau_base).numpy()

    return curve


def _draw_tokens(ax, s_kept, t_kept, s_dropped, t_dropped) -> int:
    """Kept tokens filled, dropped ones hollow at their would-be τ (or ticks along the bottom without one); returns
    the legend entries drawn."""
    import numpy as np

    entries = 0
    if len(s_kept):
        label = f"kept ({len(s_kept)}): τ from IDTS"
        ax.scatter(s_kept, t_kept, s=14, color="C0", alpha=0.75, linewidths=0, label=label)
        entries += 1
    if not len(s_dropped):
        return entries
    if t_dropped is not None:
        ax.scatter(
            s_dropped,
            t_dropped,
            s=16,
            facecolors="none",
            edgecolors="0.55",
            linewidths=0.8,
            label=f"dropped by LATF ({len(s_dropped)}): would-be τ, not used",
        )
    else:
        # No τ to place them at: a rug along the bottom edge, x still their difficulty.
        ax.plot(
            s_dropped,
            np.full(len(s_dropped), 0.02),
            linestyle="none",
            marker="|",
            markersize=12,
            color="0.55",
            transform=ax.get_xaxis_transform(),
            label=f"dropped by LATF ({len(s_dropped)}): no τ (ticks at the bottom)",
        )
    return entries + 1


def _draw_idts(ax, s, curve: Callable, median: float, c: float, tau_base: float) -> None:
    """The IDTS curve over the scores' range."""
    import numpy as np

    lo, hi = float(np.min(s)), float(np.max(s))
    # Start just above 0: the curve is flat there (tanh saturates) and log(0) is undefined.
    xs = np.linspace(max(lo, 1e-6 * max(hi, 1e-12)), hi, 400) if hi > lo else np.array([lo])
    base_text = "" if math.isclose(tau_base, 1.0, abs_tol=1e-4) else f"{tau_base:.3g}·"
    ax.plot(
        xs,
        curve(xs),
        color="C3",
        linewidth=1.5,
        label=f"IDTS: τ = {base_text}exp(−c·tanh(log(s/m))), c = {c:.3g}, m = {median:.3g}",
    )


def plot_tau_vs_difficulty(
    scores: Any,
    taus: Any,
    kept: Any,
    path: str | os.PathLike,
    ratio: float | None = None,
    *,
    median: float | None = None,
    c: float | None = None,
    tau_base: float = 1.0,
    indicator: str = "Hellinger distance",
) -> Path:
    """Scatter per-token difficulty (x) against the IDTS temperature τ (y): kept tokens filled, dropped ones hollow.

    Dropped tokens get no τ in AdaKD. They are drawn as hollow grey circles at their would-be τ (what IDTS would
    give them with the kept tokens' median) when ``taus`` holds one value per token or ``c`` is given; otherwise as
    grey ticks along the bottom edge of the plot (x still their difficulty).

    The IDTS curve τ = τ_base·exp(−c·tanh(log(s/m))) is drawn only with the run's own ``c`` (and ``tau_base``),
    computed by :func:`adakd.adaptive.idts_from_median`, never fitted back out of the temperatures. ``median`` (m)
    defaults to the kept tokens' lower median (``torch.median``, IDTS's); a dotted vertical line marks it.

    Args:
        scores: ``[N]`` per-token difficulty scores (tensor or sequence of floats).
        taus: ``[N]`` temperatures (dropped tokens' values are their would-be τ), or ``[K]`` for the kept tokens
            only, in token order.
        kept: ``[N]`` booleans, True where LATF kept the token.
        path: the PNG to write (its folder is created).
        ratio: the LATF ratio r, for the title (default: K / N).
        median: m of IDTS; default: the lower median of the kept tokens' scores.
        c: the run's IDTS strength; without it no curve is drawn.
        tau_base: the run's τ at s = m, with ``c``.
        indicator: the difficulty indicator, for the x-axis label.

    Raises:
        ValueError: mismatched lengths, no tokens, or non-boolean ``kept`` (the message names the argument).
    """
    import torch

    s, k, t_kept, t_dropped = _tau_points(scores, taus, kept)
    n, n_kept = len(s), int(k.sum())
    m = median if median is not None else (float(torch.as_tensor(s[k]).median()) if n_kept else None)
    curve = None if m is None or c is None else _idts_curve(m, float(c), float(tau_base))
    if t_dropped is None and curve is not None:
        t_dropped = curve(s[~k])

    fig, ax = _figure(7.5, 5.0)
    entries = _draw_tokens(ax, s[k], t_kept, s[~k], t_dropped)
    if curve is not None:
        _draw_idts(ax, s, curve, m, float(c), float(tau_base))
        entries += 1
    if m is not None:
        ax.axvline(m, color="C3", linestyle=":", linewidth=1, label="median m of kept scores")
        entries += 1
    ax.axhline(float(tau_base), color="0.5", linestyle="--", linewidth=0.8)
    ax.set_xlabel(f"difficulty s ({indicator}; higher = harder)")
    ax.set_ylabel("temperature τ")
    r = ratio if ratio is not None else n_kept / n
    ax.set_title(f"IDTS temperature vs token difficulty (kept {n_kept} of {n} tokens, r = {r:.2f})")
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    ax.margins(y=0.08)
    _legend(fig, ax, min(entries, 2))
    return _save(fig, path)


# --- ROUGE-L of evaluation results ------------------------------------------------------------------------------


def plot_rouge(results: list[dict], labels: list[str] | None, path: str | os.PathLike) -> Path:
    """A grouped bar chart of ROUGE-L: datasets on x, one bar per results file (``adakd compare --plot``).

    Error bars are the std over seeds; the average over datasets is the last group, set off by a dashed line. A
    dataset that a file lacks is a gap, not a bar at 0.

    Args:
        results: ``adakd eval --output`` dicts (:func:`adakd.eval.tables.load_results`).
        labels: one per file; None: :func:`adakd.eval.tables.default_labels`.
        path: the PNG to write (its folder is created).

    Raises:
        InputError: a malformed results dict, or labels that do not match the files (see
            :func:`adakd.eval.tables.rouge_groups`).
    """
    from ..eval.tables import rouge_groups

    names, bars = rouge_groups(results, labels)
    n_groups, n_bars = len(names), len(bars)
    fig, ax = _figure(max(6.0, 1.1 + n_groups * (0.45 * n_bars + 0.5)), 4.8)
    width = 0.8 / n_bars
    for j, (label, means, stds) in enumerate(bars):
        xs = [g + (j - (n_bars - 1) / 2) * width for g in range(n_groups)]
        drawn = ax.bar(xs, means, width * 0.92, yerr=stds, capsize=3, label=label, error_kw={"elinewidth": 1})
        ax.bar_label(drawn, labels=[f"{m:.1f}" if not math.isnan(m) else "" for m in means], fontsize=7, padding=2)
    ax.set_xticks(range(n_groups), names, fontsize=10)
    if max(len(name) for name in names) > 14:
        # Long dataset names would run into their neighbours when set level.
        ax.tick_params(axis="x", labelrotation=20)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    ax.axvline(n_groups - 1.5, color="0.6", linestyle="--", linewidth=0.8)
    ax.set_ylabel("ROUGE-L")
    ax.set_title("ROUGE-L by dataset (mean ± std over seeds)")
    ax.margins(y=0.12)  # headroom for the value labels; bars keep the bottom at 0
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    _legend(fig, ax, n_bars)
    return _save(fig, path)
