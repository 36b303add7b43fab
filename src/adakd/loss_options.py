"""The options of :class:`adakd.AdaKDLoss`: their valid values, checked in one place (imports only torch).

Every check raises :class:`~adakd.errors.OptionError` naming the option as a config names it under ``loss.``, so
that the config layer reports ``file: loss.<key>: reason`` without checking any value itself.
"""

from __future__ import annotations

import math
from typing import Any

from .controllers import LATF, RatioSchedule, check_ratio
from .errors import OptionError
from .fused.terms import IMPLS

__all__ = ["C_MAX", "REDUCTIONS", "SELECTIONS", "TAU_WEIGHTS", "TEMPERATURES", "build_controller", "check_options"]

SELECTIONS = ("latf", "fixed", "linear", "cosine", "all")
TEMPERATURES = ("inverse", "fixed", "reverse")
TAU_WEIGHTS = ("squared", "none")
REDUCTIONS = ("mean", "sum")
LATF_OPTIONS = ("ema_decay", "tolerance", "step_size", "min_ratio", "max_ratio", "warmup_steps")
# IDTS bound: τ ∈ τ_base·(e^−c, e^c) ⊂ τ_base·(4.5e-5, 2.2e4) at c = 10, so logits/τ stay finite in float32.
C_MAX = 10.0


def _choice(option: str, value: object, valid: tuple[str, ...]) -> OptionError:
    message = f"unknown {option} {value!r}; valid: {', '.join(valid)}"
    return OptionError(option, f"unknown {value!r}; valid: {', '.join(valid)}", message)


def check_options(
    *,
    selection: str,
    temperature: str,
    reduction: str,
    impl: str,
    c: float,
    tau_weight: str,
    detach_tau: bool,
    one_pass: bool,
    tau_base: float,
    ratio: float | None,
    latf_kwargs: dict[str, Any],
) -> None:
    """Raise :class:`OptionError` for the first invalid option or combination (the arguments of
    :class:`adakd.AdaKDLoss`); the divergence, the indicator and LATF's own values are checked where they are built."""
    for option, value, valid in (
        ("selection", selection, SELECTIONS),
        ("temperature", temperature, TEMPERATURES),
        ("reduction", reduction, REDUCTIONS),
        ("impl", impl, IMPLS),
    ):
        if value not in valid:
            raise _choice(option, value, valid)
    if not (math.isfinite(c) and 0 <= c <= C_MAX):
        # τ lies in τ_base·(e^−c, e^c) by construction; beyond c = C_MAX, z/τ overflows for ordinary logits.
        raise OptionError("c", f"must be a number in [0, {C_MAX:g}] (τ stays in τ_base·(e^-c, e^c)), got {c}")
    if tau_weight not in TAU_WEIGHTS:
        raise _choice("tau_weight", tau_weight, TAU_WEIGHTS)
    if not isinstance(detach_tau, bool):
        raise OptionError("detach_tau", f"must be true or false, got {detach_tau!r}")
    if one_pass and not detach_tau:
        raise OptionError(
            "detach_tau",
            "false needs one_pass off (one_pass takes its temperatures from the previous batch)",
            "one_pass supports detach_tau=True only (its temperatures come from the previous batch)",
        )
    if not (math.isfinite(tau_base) and tau_base > 0):
        raise OptionError("tau_base", f"must be a positive finite number, got {tau_base}")
    if ratio is not None:
        check_ratio("ratio", ratio)
    if ratio is not None and selection == "latf":
        # A ratio that LATF would ignore is a user's mistake, not a default: say where r_0 comes from.
        reason = (
            "applies to selection 'fixed', 'linear' and 'cosine'; LATF starts at max_ratio (r_0 = r_max) and "
            "moves by itself"
        )
        raise OptionError("ratio", reason, f"ratio ({ratio}) {reason}")
    if latf_kwargs and selection != "latf":
        keys = ", ".join(sorted(latf_kwargs))
        raise OptionError(
            sorted(latf_kwargs)[0],
            f"only applies to selection 'latf' (got selection {selection!r})",
            f"{keys} only apply to selection='latf' (got selection={selection!r})",
        )
    unknown = sorted(set(latf_kwargs) - set(LATF_OPTIONS))
    if unknown:
        message = f"unknown LATF argument(s) {', '.join(unknown)}; valid: {', '.join(LATF_OPTIONS)}"
        raise OptionError(unknown[0], message, message)


def build_controller(
    selection: str, ratio: float | None, total_steps: int | None, latf_kwargs: dict[str, Any]
) -> LATF | RatioSchedule | None:
    """The ratio controller of a selection: :class:`LATF`, a :class:`RatioSchedule`, or None for ``all``."""
    if selection == "latf":
        return LATF(**latf_kwargs)
    if selection == "all":
        return None
    return RatioSchedule(selection, ratio=1.0 if ratio is None else ratio, total_steps=total_steps)
