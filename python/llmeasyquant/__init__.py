"""LLMEasyQuant: quantization toolkit for large language models.

Importing the package loads the compiled extension, which registers the ops
under ``torch.ops.llmeasyquant``; :mod:`llmeasyquant.ops` wraps them.
"""

from ._native import build_info
from . import _fake  # noqa: F401  (fake kernels for torch.compile)
from . import data, ops
from .nn import QLinear, replace_linear
from .api import quantize
from .methods.base import available_methods, config_for
from .io import load, save

__version__ = build_info()["version"]

__all__ = ["QLinear", "available_methods", "build_info", "config_for", "load", "ops", "quantize", "replace_linear",
           "save", "__version__"]
