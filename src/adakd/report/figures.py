"""The plumbing every adakd chart shares: a bare :class:`matplotlib.figure.Figure` on the Agg canvas (no display
needed, and a caller's pyplot backend is never switched), saved as a PNG whose folder is created."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["colors", "figure", "save"]


def figure(width: float = 7.5, height: float = 4.6, layout: str = "constrained"):
    """A new ``(figure, axes)`` pair, ``width`` × ``height`` inches at 120 dpi. ``layout="tight"`` suits a legend
    placed beside the axes with ``bbox_to_anchor``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout=layout)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG to ``path`` (its folder created) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(os.fspath(out), format="png")
    return out


def colors(n: int) -> list:
    """The first ``n`` colours of matplotlib's colour cycle (repeated if ``n`` exceeds it)."""
    from matplotlib import rcParams

    cycle = rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    return [cycle[i % len(cycle)] for i in range(n)]
