"""Checkpoint formats other than our own, by name: each module has
``prepare(model) -> write(folder)`` (every check before anything is written)
and ``read(folder, quantization_config, trust_remote_code) -> model``.
:mod:`llmeasyquant.io` dispatches to them; ``"native"`` stays its own."""

from __future__ import annotations

from . import awq, compressed_tensors, gptq

NATIVE = "native"
_MODULES = {compressed_tensors.NAME: compressed_tensors, gptq.NAME: gptq, awq.NAME: awq}
# config.json quantization_config.quant_method -> format
_BY_METHOD = {compressed_tensors.QUANT_METHOD: compressed_tensors, gptq.QUANT_METHOD: gptq, awq.QUANT_METHOD: awq}
NAMES = (NATIVE, *_MODULES)
# written beside an exported folder: marks it as ours (a later save may
# replace it without overwrite=True) and records what wrote it
EXPORT_MARKER = "llmeasyquant_export.json"


def get(name: str):
    if name not in _MODULES:
        raise ValueError(f"save: expected format one of {', '.join(NAMES)}, got {name!r}")
    return _MODULES[name]


def for_quant_method(method):
    """The format module reading a ``quantization_config.quant_method``, or None."""
    return _BY_METHOD.get(method) if isinstance(method, str) else None
EXPORT_MARKER_FORMAT = "llmeasyquant-export"
