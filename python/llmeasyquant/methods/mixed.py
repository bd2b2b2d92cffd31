"""Mixed precision from a bit map (what :mod:`llmeasyquant.search` found, or
one written by hand): each listed layer is quantized at its own bit width by
the base quantizer, exactly as the search's candidates were built (same
layouts, same float-model Hessians for GPTQ), so ``quantize(model, "mixed",
bitmap=result.assignment, base=result.base)`` reproduces a searched model."""

from __future__ import annotations

import torch
from torch import nn

from ..models.extract import ModelSpec
from ..search.candidates import BASES, collect_hessians, layout_for, quantize_layer
from ._common import swap, target_paths, weight_nk


@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config, calib, progress: bool = True, shard=None) -> None:
    if config.base not in BASES:
        raise ValueError(f"mixed: unknown base {config.base!r}; choose from {', '.join(BASES)}")
    if config.act is not None:
        raise ValueError("mixed: weight-only (act=None); activation quantization is not part of the bit map")
    if not config.bitmap:
        raise ValueError("mixed: the bit map is empty (layer path -> bits)")
    known = set(target_paths(model, spec, ()))
    unknown = sorted(set(config.bitmap) - known)
    if unknown:
        raise ValueError(f"mixed: the bit map names layers this model does not have: {unknown[:5]}")
    paths = [p for p in target_paths(model, spec, ()) if p in config.bitmap]
    H = collect_hessians(model, paths, calib, progress) if config.base == "gptq" else {}
    for p in paths:
        mod = model.get_submodule(p)
        lay = layout_for(int(config.bitmap[p]), weight_nk(mod).shape[1], config.w_group_size, config.w_scale_dtype)
        swap(model, p, quantize_layer(mod, lay, config.base, H.pop(p, None)))
