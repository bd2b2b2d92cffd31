"""Round-to-nearest methods: AbsMax (symmetric), ZeroPoint (asymmetric),
ZeroQuant (group-wise weights + per-token dynamic activations).

The three differ only in their config defaults; with ``act="static"`` the
per-tensor activation range of every layer is calibrated first.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import collect_input_stats
from ..models.extract import ModelSpec
from ._common import swap, target_paths, to_qlinear


@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config, calib, progress: bool = True) -> None:
    paths = target_paths(model, spec, config.exclude)
    stats = collect_input_stats(model, paths, calib, progress) if config.act == "static" else {}
    for p in paths:
        q = to_qlinear(model.get_submodule(p), config)
        if config.act == "static":
            st = stats[p]
            q.set_static_range(st.min.min(), st.max.max())
        swap(model, p, q)
