"""The label that marks a position without a loss: -100, as PyTorch's ``cross_entropy`` and Hugging Face's
collators use it. Its one home: every module that builds or reads labels imports it from here (this module imports
nothing, so the torch-free cache format and the math modules can both use it)."""

__all__ = ["IGNORE_INDEX"]

IGNORE_INDEX = -100
