"""The arguments of :class:`adakd.integrations.trl.AdaKDDistillationTrainer` that AdaKD cannot honour, refused
before TRL builds anything (each :class:`adakd.errors.InputError` names the argument), and its loss."""

from __future__ import annotations

import dataclasses
from typing import Any

from trl import DistillationConfig

from ..errors import InputError
from ..loss import AdaKDLoss

__all__ = ["build_loss", "check_arguments"]


def build_loss(adakd_loss: AdaKDLoss | dict[str, Any] | None) -> AdaKDLoss:
    """The trainer's loss: an ``AdaKDLoss(reduction="sum")`` as given, or built from a dict of its arguments."""
    if adakd_loss is None:
        adakd_loss = {}
    if isinstance(adakd_loss, dict):
        if adakd_loss.get("reduction", "sum") != "sum":
            raise InputError(
                f"adakd_loss: reduction={adakd_loss['reduction']!r}; the trainer normalises over the accumulation "
                "window itself: leave reduction out"
            )
        try:
            return AdaKDLoss(**{**adakd_loss, "reduction": "sum"})
        except InputError as e:  # the loss checks its own options; name the argument they came from
            raise InputError(f"adakd_loss: {e}") from e
    if not isinstance(adakd_loss, AdaKDLoss):
        raise InputError(f"adakd_loss: expected an adakd.AdaKDLoss or a dict of its arguments, got {adakd_loss!r}")
    if adakd_loss.reduction != "sum":
        raise InputError(
            f"adakd_loss: AdaKDLoss(reduction={adakd_loss.reduction!r}); the trainer needs reduction='sum' (it "
            "normalises over the accumulation window itself), or pass the loss's arguments as a dict"
        )
    return adakd_loss


def _columns(dataset: Any) -> list[str] | None:
    """A dataset's column names when it declares them (``datasets.Dataset``, a typed ``IterableDataset``)."""
    names = getattr(dataset, "column_names", None)
    return list(names) if isinstance(names, list | tuple) else None


def _columns(dataset: Any) -> list[str] | None:
    """A dataset's column names when it declares them (``datasets.Dataset``, a typed ``IterableDataset``)."""
    names = getattr(dataset, "column_names", None)
    return list(names) if isinstance(names, list | tuple) else None


def check_arguments(
    args: DistillationConfig | None,
    teacher_model: Any,
    lmbda: Any,
    chunk_size: Any,
    datasets: dict[str, Any],
    tools: Any = None,
) -> None:
    """Refuse what AdaKD cannot honour: ``lmbda`` outside [0, 1], no teacher, TRL's ``beta`` changed (AdaKD's
    ``base`` chooses the divergence), ``tools`` or a dataset without ``completion`` with ``lmbda < 1``, a bad
    ``chunk_size``. ``datasets`` maps argument names (``train_dataset``, ...) to the datasets."""
    if isinstance(lmbda, bool) or not isinstance(lmbda, int | float) or not 0.0 <= lmbda <= 1.0:
        raise InputError(f"lmbda: must be a number in [0, 1], got {lmbda!r}")
    if teacher_model is None:
        raise InputError("teacher_model: AdaKDDistillationTrainer needs a teacher (a hub id, a path or a model)")
    if args is not None:
        default_beta = {f.name: f.default for f in dataclasses.fields(DistillationConfig)}["beta"]
        if args.beta != default_beta:
            raise InputError(
                f"DistillationConfig.beta={args.beta}: TRL's choice of divergence, which AdaKD replaces; leave "
                "beta at its default and choose the divergence with adakd_loss={'base': ...} (e.g. 'jsd' with "
                "base_params={'lam': 1 - beta})"
            )
    if lmbda < 1 and tools:
        raise InputError("tools: only with lmbda=1 (the dataset's completions carry no tool-call masks)")
    if lmbda < 1:
        for name, dataset in datasets.items():
            columns = _columns(dataset)
            if columns is not None and "completion" not in columns:
                raise InputError(
                    f"{name}: lmbda={lmbda} trains on the dataset's completions, but it has no 'completion' "
                    f"column (columns: {', '.join(columns)}); use TRL's prompt-completion format, or lmbda=1"
                )
    if chunk_size is not None and (type(chunk_size) is not int or chunk_size < 1):
        raise InputError(f"chunk_size: must be a positive int, got {chunk_size!r}")
