"""Bytes a model actually holds: parameters and buffers that are saved
(quantized weights, scales, zero-points, biases, embeddings, norms)."""

from __future__ import annotations

from torch import nn

from ..nn.qlinear import QLinear


def model_memory(model: nn.Module) -> dict:
    """{'total': bytes of the state_dict, 'linear': bytes of the linear layers
    (QLinear or float), 'other': the rest, 'derived': bytes of the kernel
    layouts QLinear derived so far and holds beside them (the CPU pre-packed
    and CUDA panel copies: never saved, not in 'total')}. Tied weights are
    counted once."""
    seen = set()
    total = 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    linear = derived = 0
    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            linear += m.memory_bytes()
            derived += m.derived_bytes()
        elif isinstance(m, nn.Linear) and "lm_head" not in name:
            linear += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return {"total": total, "linear": linear, "other": total - linear, "derived": derived}
