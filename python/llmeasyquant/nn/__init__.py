"""Quantized modules."""

from .qlinear import ACT_MODES, QLinear
from .replace import is_quantizable, replace_linear

__all__ = ["ACT_MODES", "QLinear", "is_quantizable", "replace_linear"]
