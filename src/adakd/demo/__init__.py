"""The embedded demo: synthetic tasks, a teacher trained from scratch, three students, evaluation, a report."""

from .run import DemoSettings, run_demo
from .tasks import FAMILIES, SOFT_FAMILIES, TASK_SETS, make_splits

__all__ = ["FAMILIES", "SOFT_FAMILIES", "TASK_SETS", "DemoSettings", "make_splits", "run_demo"]
