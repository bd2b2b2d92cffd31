"""Round-to-nearest methods: AbsMax (symmetric), ZeroPoint (asymmetric),
ZeroQuant (group-wise weights + per-token dynamic activations).

The three differ only in their config defaults; with ``act="static"`` the
per-tensor activation range of every layer is calibrated first.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..calibration import collect_input_stats
from ..sharding import Shard
from ..models.extract import ModelSpec
from ._common import quantize_owned, target_paths


@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config, calib, progress: bool = True,
          shard: Optional[Shard] = None) -> None:
    shard = shard or Shard()
    paths = target_paths(model, spec, config.exclude)
    stats = {}
    if config.act == "static":
        with shard.phase("calibration", "calib"):
            stats = collect_input_stats(model, paths, calib, progress)
        shard.reduce_stats_(stats)
    quantize_owned(model, paths, config, shard, stats)
