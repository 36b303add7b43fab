"""Plots of a training run's ``metrics.jsonl``: the LATF ratio, the losses, the IDTS temperatures, and τ against
per-token difficulty.

``adakd train`` appends one JSON object per logging step to ``RUN_DIR/metrics.jsonl``: ``step`` and ``loss``, and
when distilling ``kd_loss``, ``ce_loss`` (kd_ratio < 1) and ``adakd/ratio``, ``adakd/kept_tokens``,
``adakd/valid_tokens``, ``adakd/tau_mean``, ``adakd/tau_min``, ``adakd/tau_max``. The run's last line holds
``train_runtime``, ``train_loss``, ... and no ``loss``. Unknown keys are ignored.

Every chart is drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas (the look of
:func:`adakd.eval.tables.bar_chart`), so nothing here needs a display or switches the backend of a caller that
uses pyplot. Each ``plot_*`` function writes one PNG and returns its path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS_FILE",
    "plot_losses",
    "plot_ratio",
    "plot_tau_vs_difficulty",
    "plot_temperatures",
    "read_metrics",
    "read_rows",
]

METRICS_FILE = "metrics.jsonl"

# Dashed and dotted, so that KD and CE stay apart even in a grey-scale print; colour belongs to the run.
_COMPONENTS = (("kd_loss", "KD loss", "--"), ("ce_loss", "CE loss", ":"))
# Losses that span more than this factor (CE ~5 against KD ~0.01) go on a log axis, where both stay readable.
_LOG_SPAN = 20.0


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but `"loss": true` is a broken line, not 1.0.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _metrics_path(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    # A metrics file given directly is as good as the folder that holds it.
    return path if path.is_file() else path / METRICS_FILE


def read_rows(run_dir: str | os.PathLike) -> list[dict]:
    """Every JSON object of ``RUN_DIR/metrics.jsonl`` in file order (training rows and the run-end row).

    ``run_dir`` may also be the metrics file itself. Blank lines are skipped.

    Raises:
        ValueError: the file is missing or empty (the message names it), or a line is not a JSON object with a
            numeric ``step`` (and a numeric ``loss`` where it has one); the message names ``path:line``.
    """
    path = _metrics_path(run_dir)
    if not path.is_file():
        where = "no such file" if not path.exists() else "not a file"
        raise ValueError(f"{path}: {where} (is {path.parent} a run directory written by `adakd train`?)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e.reason})") from e
    except OSError as e:
        raise OSError(f"{path}: cannot read ({e.strerror or e})") from e
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if not _is_number(row.get("step")):
            raise ValueError(f"{where}: missing or non-numeric 'step'")
        if "loss" in row and not _is_number(row["loss"]):
            raise ValueError(f"{where}: 'loss' must be a number, got {row['loss']!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty file (no metrics logged)")
    return rows


def training_rows(rows: Sequence[Mapping]) -> list[dict]:
    """The rows with a ``loss``, sorted by step; where a step appears twice, the later line wins.

    A resumed run re-logs the steps after its checkpoint, and a run restarted into the same ``output_dir``
    appends to the old file: in both cases the later line is the one that belongs to the run as it now stands.
    """
    by_step: dict[float, dict] = {}
    for row in rows:
        if "loss" in row:
            by_step[row["step"]] = dict(row)
    return [by_step[step] for step in sorted(by_step)]


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The training log of a run: the rows of ``RUN_DIR/metrics.jsonl`` that have a ``loss``, sorted by step.

    ``run_dir`` may also be the metrics file itself. See :func:`training_rows` for repeated steps.

    Raises:
        ValueError: the file is missing or empty, or holds no training row (the message names it); a corrupt line
            (the message names ``path:line``).
    """
    rows = training_rows(read_rows(run_dir))
    if not rows:
        raise ValueError(f"{_metrics_path(run_dir)}: no training rows (lines with 'loss') were logged")
    return rows


def series(rows: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the rows that have a numeric ``key``."""
    pairs = [(float(r["step"]), float(r[key])) for r in rows if _is_number(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# --- figure plumbing ---------------------------------------------------------------------------------------------


def _figure(width: float = 7.5, height: float = 4.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _marker(n_points: int) -> str | None:
    # A sparse log (logging_steps close to max_steps) would otherwise be a few unmarked kinks.
    return "o" if n_points <= 30 else None


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


def _save(fig, path: str | os.PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(os.fspath(out), format="png")
    return out


def _colors(n: int) -> list:
    from matplotlib import rcParams

    cycle = rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    return [cycle[i % len(cycle)] for i in range(n)]


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
        runs: label → training rows (:func:`read_metrics`).
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
            ax.plot(
                steps,
                ratio,
                color=color,
                marker=_marker(len(steps)),
                markersize=3,
                label=_name(label, "kept ratio r", runs),
            )
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
        runs: label → training rows (:func:`read_metrics`).
        path: the PNG to write (its folder is created).
    """
    _check_runs(runs)
    fig, ax = _figure()
    drawn, values = 0, []
    for (label, rows), color in zip(runs.items(), _colors(len(runs)), strict=True):
        steps, loss = series(rows, "loss")
        ax.plot(steps, loss, color=color, marker=_marker(len(steps)), markersize=3, label=_name(label, "loss", runs))
        drawn += 1
        values += loss
        for key, what, style in _COMPONENTS:
            k_steps, k_values = series(rows, key)
            if not k_steps:
                continue
            same = k_steps == steps and _close(k_values, loss)
            if not same:
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
        runs: label → training rows (:func:`read_metrics`).
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
        band = [r for r in rows if all(_is_number(r.get(f"adakd/tau_{k}")) for k in ("min", "max"))]
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
        ax.plot(steps, mean, color=color, marker=_marker(len(steps)), markersize=3, label=_name(label, "mean τ", runs))
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
    import numpy as np

    if hasattr(values, "detach"):  # a torch tensor, possibly on a GPU or in bfloat16 (which numpy lacks)
        values = values.detach().float().cpu().numpy() if values.is_floating_point() else values.detach().cpu()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {tuple(array.shape)}")
    return array


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
        t_kept, t_dropped = t[k], t[~k]
    elif len(t) == n_kept:
        t_kept, t_dropped = t, None
    else:
        raise ValueError(f"taus: {len(t)} values; expected {n} (one per token) or {n_kept} (one per kept token)")
    s_kept, s_dropped = s[k], s[~k]

    import torch

    from ..adaptive import idts_from_median

    m = median if median is not None else (float(torch.as_tensor(s_kept).median()) if n_kept else None)
    curve = None if m is None or c is None else (float(c), float(tau_base))

    def idts(x):
        return idts_from_median(torch.as_tensor(x, dtype=torch.float64), m, c=curve[0], tau_base=curve[1]).numpy()

    if t_dropped is None and curve is not None:
        t_dropped = idts(s_dropped)

    fig, ax = _figure(7.5, 5.0)
    entries = 0
    if n_kept:
        ax.scatter(s_kept, t_kept, s=14, color="C0", alpha=0.75, linewidths=0, label=f"kept ({n_kept}): τ from IDTS")
        entries += 1
    if len(s_dropped):
        if t_dropped is not None:
            ax.scatter(
                s_dropped, t_dropped, s=16, facecolors="none", edgecolors="0.55", linewidths=0.8,
                label=f"dropped by LATF ({len(s_dropped)}): would-be τ, not used",
            )  # fmt: skip
        else:
            # No τ to place them at: a rug along the bottom edge, x still their difficulty.
            ax.plot(
                s_dropped, np.full(len(s_dropped), 0.02), linestyle="none", marker="|", markersize=12,
                color="0.55", transform=ax.get_xaxis_transform(),
                label=f"dropped by LATF ({len(s_dropped)}): no τ (ticks at the bottom)",
            )  # fmt: skip
        entries += 1
    if curve is not None:
        lo, hi = float(np.min(s)), float(np.max(s))
        # Start just above 0: the curve is flat there (tanh saturates) and log(0) is undefined.
        xs = np.linspace(max(lo, 1e-6 * max(hi, 1e-12)), hi, 400) if hi > lo else np.array([lo])
        c_, base = curve
        base_text = "" if math.isclose(base, 1.0, abs_tol=1e-4) else f"{base:.3g}·"
        ax.plot(
            xs, idts(xs), color="C3", linewidth=1.5,
            label=f"IDTS: τ = {base_text}exp(−c·tanh(log(s/m))), c = {c_:.3g}, m = {m:.3g}",
        )  # fmt: skip
        entries += 1
    if m is not None:
        ax.axvline(m, color="C3", linestyle=":", linewidth=1, label="median m of kept scores")
        entries += 1
    ax.axhline(tau_base if curve is None else curve[1], color="0.5", linestyle="--", linewidth=0.8)
    ax.set_xlabel(f"difficulty s ({indicator}; higher = harder)")
    ax.set_ylabel("temperature τ")
    r = ratio if ratio is not None else n_kept / n
    ax.set_title(f"IDTS temperature vs token difficulty (kept {n_kept} of {n} tokens, r = {r:.2f})")
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    ax.margins(y=0.08)
    _legend(fig, ax, min(entries, 2))
    return _save(fig, path)
