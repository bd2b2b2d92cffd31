"""LLMEasyQuant: quantization toolkit for large language models.

Importing the package loads the compiled extension, which registers the ops
under ``torch.ops.llmeasyquant``; :mod:`llmeasyquant.ops` wraps them.
"""

from ._native import build_info
from . import _fake  # noqa: F401  (fake kernels for torch.compile)
from . import _fallback  # noqa: F401  (PyTorch kernels for devices without compiled ones)
from . import data, ops
from .nn import QLinear, replace_linear
from .api import quantize
from .methods import available_methods, config_for
from .io import load, save
from .models.rotate import rotate


def export_onnx(model, path, **kwargs):
    """ONNX export (needs onnx, onnxscript, onnxruntime): see :mod:`llmeasyquant.onnx_export`."""
    from .onnx_export import export_onnx as _export

    return _export(model, path, **kwargs)


__version__ = build_info()["version"]

__all__ = ["QLinear", "available_methods", "build_info", "config_for", "export_onnx", "load", "ops", "quantize", "replace_linear",
           "rotate", "save", "__version__"]
