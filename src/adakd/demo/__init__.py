"""The embedded demo: synthetic tasks, a teacher trained from scratch, three students, evaluation, a report."""

from .run import DemoSettings, run_demo
from .tasks import FAMILIES, make_splits

__all__ = ["FAMILIES", "DemoSettings", "make_splits", "run_demo"]
