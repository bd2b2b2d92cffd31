"""Online Hadamard rotation of a linear's input (QuaRot's rotation before
``down_proj``), carried by the module whatever replaces it.

Where a rotation cannot be folded into the op before a linear (``down_proj``
reads ``act(gate) * up``, an elementwise product), the linear computes
``(x Q^T) (W Q^T)^T = x W^T``: its weight is rotated offline and its input
online. The online half is a forward *pre*-hook, prepended, so that

* every observer a method registers later (calibration statistics, GPTQ
  Hessians, AWQ activations: all pre-hooks) sees the rotated input — the
  input the quantized weight multiplies;
* it applies the same way to an ``nn.Linear`` and to the ``QLinear`` that
  replaces it (``methods._common.swap`` calls :func:`carry`; ``io.load``
  re-attaches from ``quantization.json``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import hadamard
from .. import ops

_ATTR = "llmeq_input_hadamard"
_HANDLE = "_llmeq_input_hadamard_hook"


def size_of(module: nn.Module) -> Optional[int]:
    """The order of the module's online input rotation; None without one."""
    return getattr(module, _ATTR, None)


def _in_features(module: nn.Module) -> int:
    if hasattr(module, "in_features"):
        return int(module.in_features)
    return int(module.weight.shape[0])  # Conv1D: [in, out]


def attach(module: nn.Module, n: int) -> None:
    """Rotate ``module``'s input online by the orthonormal Hadamard of order ``n``
    (``x -> x @ hadamard.matrix(n).T``). The caller rotates the weight."""
    if size_of(module) is not None:
        raise ValueError(f"{type(module).__name__} already rotates its input (order {size_of(module)})")
    k = _in_features(module)
    if n != k:
        raise ValueError(f"online Hadamard: expected the order to equal the layer's input width {k}, got {n}")
    had_m = hadamard.small_matrix(n)  # raises for an order not built here
    cache: dict = {}

    def rotate(mod, args):
        x = args[0]
        m = None
        if had_m is not None:
            m = cache.get(x.device)
            if m is None:
                m = cache[x.device] = had_m.to(x.device)
        if torch.onnx.is_in_onnx_export():
            # ONNX has no Hadamard op: export the PyTorch butterflies (plain ops)
            return (hadamard.transform(x, m),) + tuple(args[1:])
        return (ops.hadamard_transform(x, m),) + tuple(args[1:])

    setattr(module, _ATTR, n)
    setattr(module, _HANDLE, module.register_forward_pre_hook(rotate, prepend=True))


def detach(module: nn.Module) -> None:
    handle = getattr(module, _HANDLE, None)
    if handle is not None:
        handle.remove()
    for a in (_ATTR, _HANDLE):
        if hasattr(module, a):
            delattr(module, a)


def carry(old: nn.Module, new: nn.Module) -> None:
    """``new`` takes ``old``'s place: it rotates its input as ``old`` did."""
    n = size_of(old)
    if n is not None and size_of(new) is None:
        attach(new, n)


def rotated_inputs(model: nn.Module) -> dict[str, int]:
    """Every module of ``model`` rotating its input online: path -> order."""
    return {name: size_of(m) for name, m in model.named_modules() if size_of(m) is not None}


@torch.no_grad()
def rotate_weight_inputs(module: nn.Module, n: int) -> None:
    """``W <- W Q^T`` along the input dim: the offline half of :func:`attach`."""
    if module.weight.shape[-1 if hasattr(module, "in_features") else 0] != n:
        raise ValueError(f"online Hadamard: expected the order to equal the layer's input width "
                         f"{_in_features(module)}, got {n}")
    w = module.weight.double()
    if hasattr(module, "in_features"):
        module.weight.copy_(hadamard.rotate(w).to(module.weight.dtype))
    else:  # Conv1D [in, out]: Q W = (W^T Q^T)^T
        module.weight.copy_(hadamard.rotate(w.T).T.to(module.weight.dtype))
