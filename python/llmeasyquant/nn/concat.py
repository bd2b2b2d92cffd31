"""Several QLinear layers that read the same input, as one layer.

Why: at decode a LLaMA block calls q/k/v_proj on one normed hidden state and
gate/up_proj on another, each at M = 1, where a call's fixed cost (Python,
dispatcher, output and activation-code allocations, two OpenMP regions) is
~10-15 us against ~5-30 us of streaming its weight: five calls per block
become two when the weights sit side by side. Quantizing the activation
once instead of three times and handing the kernel's threads one wide N
instead of three narrow ones come with it.

Exactness is what decides which layers may be joined: the joined layer must
give each output column bit for bit what its own layer gives, so nothing a
method calibrated per layer may differ.

* The activation path must be a function of the input alone: weight-only
  (``act=None``) or dynamic per-token activations with the same symmetry
  (static and EMA layers hold their own activation scales).
* Same weight layout (bits, group size, symmetry, scale dtype), same input
  permutation (act-order layers gather their inputs by their own order),
  bias on all or none, same device.
* No hooks: a forward (pre-)hook on one layer (an online rotation, a
  calibration observer) would be skipped or applied to all.
* Every kernel computes an output column from its own weight row, its own
  scales and the shared activation alone (int32 sums exact; float sums over
  K in an order that does not depend on the column's neighbours);
  ``tests/test_concat.py`` checks the joined outputs against the separate
  ones with ``torch.equal`` on every CPU tier, odd shapes included. Only
  CPU layers are joined: the CUDA kernels' column independence has not been
  checked on a GPU yet.

The joined layer is derived: it holds a second copy of its parts' integer
weights (their bytes once more, for as long as the caller keeps it) and is
never saved; rebuild it when a part changes (:func:`stale`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .qlinear import QLinear, _tensor_key

# attributes that must be equal on every part (besides the input width)
_SAME = ("w_bits", "w_group_size", "w_symmetric", "act", "act_symmetric")


def hooked(m: nn.Module) -> bool:
    """Whether calling ``m`` runs forward hooks of its own (those registered
    with_kwargs included)."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


def global_hooks() -> bool:
    """Whether forward hooks for every module are registered."""
    return bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def refusal(layers: Sequence[nn.Module]) -> Optional[str]:
    """Why :func:`concat` cannot join ``layers`` exactly (None when it can)."""
    if len(layers) < 2:
        return f"need at least 2 layers, got {len(layers)}"
    if any(type(m) is not QLinear for m in layers):
        return "not all are QLinear: " + ", ".join(type(m).__name__ for m in layers)
    first = layers[0]
    if first.act not in (None, "dynamic"):
        return f"act={first.act!r} holds per-layer activation state"
    for m in layers[1:]:
        if m.in_features != first.in_features:
            return f"in_features differ ({first.in_features} vs {m.in_features})"
        for a in _SAME:
            if getattr(m, a) != getattr(first, a):
                return f"{a} differs ({getattr(first, a)!r} vs {getattr(m, a)!r})"
    b = first._buffers
    if b["qweight"].device.type != "cpu":
        # the per-column equality is tested on the CPU kernels (every tier);
        # the CUDA kernels' has not been run on a GPU yet
        return f"the layers are on {b['qweight'].device.type}; joining is verified on the CPU kernels only"
    for m in layers:
        mb = m._buffers
        if mb["w_scale"].dtype != b["w_scale"].dtype or mb["qweight"].device != b["qweight"].device:
            return "scale dtype or device differs"
        if (mb["bias"] is None) != (b["bias"] is None) or (
                mb["bias"] is not None and mb["bias"].dtype != b["bias"].dtype):
            return "bias on some layers only, or of different dtypes"
        perm, p0 = mb["in_perm"], b["in_perm"]
        if (perm is None) != (p0 is None) or (perm is not None and not torch.equal(perm, p0)):
            return "input permutations (act order) differ"
        if hooked(m):
            return "a layer has forward hooks"
    if global_hooks():
        return "global forward hooks are registered"
    return None


def stale(joined: QLinear, layers: Sequence[QLinear]) -> bool:
    """Whether a part changed (new storage or an in-place edit of its
    weights, scales, zero-points or bias) since ``joined`` was built."""
    return joined.__dict__.get("_concat_of") != _keys(layers)


def _keys(layers) -> tuple:
    return tuple(None if t is None else _tensor_key(t) for m in layers
                 for t in (m._buffers[n] for n in ("qweight", "w_scale", "w_zero", "bias")))


@torch.no_grad()
def concat(layers: Sequence[QLinear]) -> QLinear:
    """One QLinear whose outputs are the outputs of ``layers`` side by side
    (split them with ``out.split([m.out_features for m in layers], -1)``).
    Raises ``ValueError`` with :func:`refusal`'s reason when that would not be
    exact."""
    why = refusal(layers)
    if why is not None:
        raise ValueError(f"concat: cannot join these layers exactly: {why}")
    first = layers[0]
    spec = dict(first.spec(), out_features=sum(m.out_features for m in layers))
    joined = QLinear.from_spec(spec, device=first.qweight.device)
    bufs = joined._buffers
    for name in ("qweight", "w_scale", "w_zero", "bias"):
        if bufs[name] is not None:
            bufs[name].copy_(torch.cat([m._buffers[name] for m in layers]))
    if first.in_perm is not None:
        bufs["in_perm"].copy_(first.in_perm)
    # each part's row sums are current (its own staleness check), and a
    # column's sum is its row's: no pass over the joined weight
    bufs["w_sum"].copy_(torch.cat([m._row_sums() for m in layers]))
    joined._w_sum_of = _tensor_key(bufs["qweight"])
    joined.prepack_cpu_weights = all(m.prepack_cpu_weights for m in layers)
    joined.__dict__["_concat_of"] = _keys(layers)
    return joined
