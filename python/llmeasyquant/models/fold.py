"""Folding per-channel scales into a decoder block: the op that produces a
scale group's input is divided by ``s``, the group's linears multiplied by
``s``, so the float block computes the same function (up to float rounding).

It lives with the architecture knowledge, not with the methods, because the
generic fallback verifies each discovered group by folding it
(:mod:`llmeasyquant.models.discover`); SmoothQuant and AWQ fold through the
same functions (re-exported by ``methods._common``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.qlinear import _is_conv1d
from .archs import ScaleGroup


@torch.no_grad()
def scale_input_channels(module: nn.Module, s: torch.Tensor) -> None:
    """W[:, j] *= s[j] (the linear now expects inputs divided by s)."""
    if _is_conv1d(module):
        module.weight.mul_(s.to(module.weight.dtype).unsqueeze(1))
    else:
        module.weight.mul_(s.to(module.weight.dtype).unsqueeze(0))


def _rows(n: int, part, want: int, what: str) -> slice:
    """The output rows ``part`` = (index, count) names, of ``n`` rows."""
    if part is None:
        if n != want:
            raise ValueError(f"{what}: expected {want} output channels (the scales), got {n}")
        return slice(0, n)
    index, count = part
    if n % count or n // count != want:
        raise ValueError(f"{what}: expected {count} parts of {want} output rows (the scales), got {n} rows")
    return slice(index * want, (index + 1) * want)


@torch.no_grad()
def divide_output_channels(module: nn.Module, s: torch.Tensor, *, part=None, weight_offset: float = 0.0) -> None:
    """Output channel j of a norm or linear divided by s[j].

    Linears: ``part`` = (index, count) divides only the rows of part ``index``
    of ``count`` equal parts (a fused projection). Norms computing
    ``normalize(x) * (weight_offset + w)``: w' = (weight_offset + w) / s -
    weight_offset (Gemma: offset 1)."""
    s = s.to(module.weight.dtype)
    what = type(module).__name__
    if isinstance(module, nn.Linear):
        rows = _rows(module.weight.shape[0], part, s.numel(), what)
        module.weight[rows].div_(s.unsqueeze(1))
    elif _is_conv1d(module):  # [in, out]
        rows = _rows(module.weight.shape[1], part, s.numel(), what)
        module.weight[:, rows].div_(s.unsqueeze(0))
    else:  # LayerNorm / RMSNorm: y = norm(x) * (offset + weight) (+ bias)
        if part is not None:
            raise ValueError(f"{what}: a norm has no parts, got part={part}")
        rows = _rows(module.weight.shape[-1], None, s.numel(), what)
        if weight_offset:
            module.weight.add_(weight_offset).div_(s).sub_(weight_offset)
        else:
            module.weight.div_(s)
    if getattr(module, "bias", None) is not None:
        module.bias[rows].div_(s.to(module.bias.dtype))


def fold_scales(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Make the group's input X/s and its weights W*s: the float block computes
    exactly the same function (up to float rounding)."""
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"scales for {group.prev} -> {group.linears} must be finite and > 0")
    divide_output_channels(block.get_submodule(group.prev), s, part=group.prev_part,
                           weight_offset=group.weight_offset)
    for name in group.linears:
        scale_input_channels(block.get_submodule(name), s)
