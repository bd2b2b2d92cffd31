"""Swap float linear layers of any ``nn.Module`` for :class:`QLinear`."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from torch import nn

from .qlinear import QLinear, _is_conv1d

DEFAULT_SKIP = ("lm_head",)


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def replace_linear(model: nn.Module, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
                   skip: Iterable[str] = DEFAULT_SKIP, **qlinear_kwargs) -> nn.Module:
    """Replace every ``nn.Linear`` / ``Conv1D`` in ``model`` (in place) by
    ``QLinear.from_linear(layer, **qlinear_kwargs)``.

    ``filter_fn(name, module)`` picks layers (default: all); ``skip`` lists
    name components never replaced (default: ``lm_head``, whose quantization
    hurts accuracy most for the least memory). Returns ``model``.
    """
    skip = tuple(skip)
    targets = []
    for name, module in model.named_modules():
        if not is_quantizable(module):
            continue
        if any(part in skip for part in name.split(".")):
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QLinear.from_linear(getattr(parent, child), **qlinear_kwargs))
    return model
