"""Quantization methods. Importing the package registers the built-in ones
(each module registers itself: see :mod:`.base`)."""

from .base import (Method, QuantConfig, available_methods, config_for, config_from_json, method_for,
                   register_method, unregister_method)
from . import autoround, awq, gptq, mixed, rtn, simquant, smoothquant  # noqa: F401  (register the built-in methods)

__all__ = ["Method", "QuantConfig", "available_methods", "config_for", "config_from_json", "method_for",
           "register_method", "unregister_method"]
