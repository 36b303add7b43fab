"""The embedded demo: synthetic tasks, a teacher trained from scratch, students compared over training seeds,
evaluation, a report."""

from .run import ABLATIONS, COMPARED, METHODS, DemoSettings, run_demo
from .tasks import FAMILIES, SOFT_FAMILIES, TASK_SETS, TaskRecord, make_splits

__all__ = [
    "ABLATIONS", "COMPARED", "FAMILIES", "METHODS", "SOFT_FAMILIES", "TASK_SETS", "DemoSettings", "TaskRecord",
    "make_splits", "run_demo",
]  # fmt: skip
