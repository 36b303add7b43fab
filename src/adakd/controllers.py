"""The ratio controllers: :class:`LATF` (Eqs. 4-7) and :class:`RatioSchedule` (the Table 4 ablations).

Plain Python state machines stepped once per optimizer step, with ``state_dict`` / ``load_state_dict`` so that a
resumed run continues exactly (``docs/method.md``, "LATF").

This module imports only torch (and not even that: plain Python).
"""

from __future__ import annotations

import math
from typing import Any

from .errors import OptionError

__all__ = ["LATF", "RatioSchedule", "check_ratio"]


def check_ratio(name: str, value: float, low_open: bool = True) -> float:
    """``value`` as a float when it lies in (0, 1] (``low_open``) or [0, 1]; else :class:`OptionError`."""
    value = float(value)
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise OptionError(name, f"must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return value


class LATF:
    """Loss-driven adaptive token focusing: the kept ratio r follows an EMA of the distillation loss.

    One :meth:`update` per optimizer step, with that step's loss averaged over gradient-accumulation micro-steps
    and data-parallel ranks (so every rank computes the same r). The rule (docs/method.md, "LATF"):

    - EMA: L̄ = L at the first step, else β·L̄ + (1 − β)·L.
    - r = ``max_ratio`` for the first ``warmup_steps`` steps; at the first step after warm-up L_ref = L̄.
    - Then: L̄ < L_ref·(1 − ε) → r ← max(r_min, r·(1 − δ)), L_ref ← L̄; L̄ > L_ref·(1 + ε) → r ←
      min(r_max, r·(1 + δ)), L_ref ← L̄; otherwise nothing changes. The new r applies from the next step.

    Args:
        ema_decay: β ∈ [0, 1).
        tolerance: ε ≥ 0.
        step_size: δ ∈ [0, 1).
        min_ratio: r_min ∈ (0, 1].
        max_ratio: r_max ∈ [r_min, 1]; also the starting ratio r_0 (the paper's r_0 = r_max = 1).
        warmup_steps: optimizer steps at r = r_max before the controller starts.
    """

    def __init__(
        self,
        *,
        ema_decay: float = 0.99,
        tolerance: float = 0.05,
        step_size: float = 0.05,
        min_ratio: float = 0.1,
        max_ratio: float = 1.0,
        warmup_steps: int = 0,
    ) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise OptionError("ema_decay", f"must be in [0, 1), got {ema_decay}")
        if not (math.isfinite(tolerance) and tolerance >= 0.0):
            raise OptionError("tolerance", f"must be >= 0, got {tolerance}")
        if not 0.0 <= step_size < 1.0:
            raise OptionError("step_size", f"must be in [0, 1), got {step_size}")
        self.min_ratio = check_ratio("min_ratio", min_ratio)
        self.max_ratio = check_ratio("max_ratio", max_ratio)
        if self.min_ratio > self.max_ratio:
            raise OptionError("max_ratio", f"({max_ratio}) must be >= min_ratio ({min_ratio})")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise OptionError("warmup_steps", f"must be a non-negative int, got {warmup_steps!r}")
        self.ema_decay = float(ema_decay)
        self.tolerance = float(tolerance)
        self.step_size = float(step_size)
        self.warmup_steps = warmup_steps
        self.ratio: float = self.max_ratio
        self.ema: float | None = None
        self.ref: float | None = None
        self.num_steps = 0

    def update(self, loss: float) -> float:
        """Advance one optimizer step with that step's distillation loss; returns the ratio for the next step.

        Raises:
            ValueError: a non-finite loss (it would poison the EMA for the rest of the run).
        """
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"LATF.update got a non-finite loss ({loss}) at step {self.num_steps + 1}")
        self.num_steps += 1
        self.ema = loss if self.ema is None else self.ema_decay * self.ema + (1.0 - self.ema_decay) * loss
        if self.num_steps <= self.warmup_steps:
            return self.ratio
        if self.ref is None:
            self.ref = self.ema
        elif self.ema < self.ref * (1.0 - self.tolerance):
            self.ratio = max(self.min_ratio, self.ratio * (1.0 - self.step_size))
            self.ref = self.ema
        elif self.ema > self.ref * (1.0 + self.tolerance):
            self.ratio = min(self.max_ratio, self.ratio * (1.0 + self.step_size))
            self.ref = self.ema
        return self.ratio

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (plain Python values): ratio, EMA, reference loss, step count."""
        return {"ratio": self.ratio, "ema": self.ema, "ref": self.ref, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the configuration comes from the constructor."""
        missing = {"ratio", "ema", "ref", "num_steps"} - set(state)
        if missing:
            raise ValueError(f"LATF state is missing {', '.join(sorted(missing))}")
        self.ratio = float(state["ratio"])
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.ref = None if state["ref"] is None else float(state["ref"])
        self.num_steps = int(state["num_steps"])

    def __repr__(self) -> str:
        return (
            f"LATF(ratio={self.ratio:.4g}, ema_decay={self.ema_decay}, tolerance={self.tolerance}, "
            f"step_size={self.step_size}, min_ratio={self.min_ratio}, max_ratio={self.max_ratio}, "
            f"warmup_steps={self.warmup_steps}, num_steps={self.num_steps})"
        )


class RatioSchedule:
    """A loss-independent kept ratio (the Table 4 ablations), with the same interface as :class:`LATF`.

    - ``fixed``: r = ``ratio`` throughout.
    - ``linear``: r(t) = 1 + (ratio − 1)·min(t/T, 1).
    - ``cosine``: r(t) = ratio + (1 − ratio)·½(1 + cos(π·min(t/T, 1))).

    t counts completed optimizer steps and T is ``total_steps``.
    """

    KINDS = ("fixed", "linear", "cosine")

    def __init__(self, kind: str, *, ratio: float, total_steps: int | None = None) -> None:
        if kind not in self.KINDS:
            message = f"unknown ratio schedule {kind!r}; valid: {', '.join(self.KINDS)}"
            raise OptionError("selection", message, message)
        self.kind = kind
        self.end_ratio = check_ratio("ratio", ratio)
        if kind != "fixed" and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1):
            raise OptionError(
                "total_steps",
                f"needs a positive int for selection={kind!r}, got {total_steps!r}",
                f"selection={kind!r} needs total_steps, a positive int, got {total_steps!r}",
            )
        self.total_steps = total_steps
        self.num_steps = 0

    @property
    def ratio(self) -> float:
        if self.kind == "fixed":
            return self.end_ratio
        frac = min(self.num_steps / self.total_steps, 1.0)  # type: ignore[operator]
        if self.kind == "linear":
            return 1.0 + (self.end_ratio - 1.0) * frac
        return self.end_ratio + (1.0 - self.end_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def update(self, loss: float | None = None) -> float:
        """Advance one optimizer step (the loss is ignored); returns the ratio for the next step."""
        self.num_steps += 1
        return self.ratio

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "num_steps" not in state:
            raise ValueError("ratio schedule state is missing num_steps")
        self.num_steps = int(state["num_steps"])

    def __repr__(self) -> str:
        return f"RatioSchedule({self.kind!r}, ratio={self.end_ratio}, total_steps={self.total_steps})"
