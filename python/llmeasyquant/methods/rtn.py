"""Round-to-nearest methods: AbsMax (symmetric), ZeroPoint (asymmetric),
ZeroQuant (group-wise weights + per-token dynamic activations).

The three differ only in their config defaults; with ``act="static"`` the
per-tensor activation range of every layer is calibrated first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..calibration import collect_input_stats
from ..models.extract import ModelSpec
from ..sharding import Shard
from ._common import quantize_owned, target_paths
from .base import QuantConfig, register_method


@dataclass
class AbsMaxConfig(QuantConfig):
    method: ClassVar[str] = "absmax"


@dataclass
class ZeroPointConfig(QuantConfig):
    method: ClassVar[str] = "zeropoint"
    w_symmetric: bool = False
    act_symmetric: bool = False


@dataclass
class ZeroQuantConfig(QuantConfig):
    """Group-wise weights + per-token dynamic activations (W8A8 / W4A8)."""

    method: ClassVar[str] = "zeroquant"
    w_group_size: int = 64
    act: Optional[str] = "dynamic"


def _static(config: QuantConfig) -> bool:
    return config.act == "static"


@register_method(ZeroQuantConfig, calibrates=_static)
@register_method(ZeroPointConfig, calibrates=_static)
@register_method(AbsMaxConfig, calibrates=_static)
@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config, calib, *, progress: bool = True,
          shard: Optional[Shard] = None, device=None) -> None:
    """RTN every target linear; static activations: their ranges from one
    calibration forward of the float model first. Per-layer and cheap, so the
    model is quantized where it is (``device`` unused)."""
    shard = shard or Shard()
    paths = target_paths(model, spec, config.exclude)
    stats = {}
    if config.act == "static":
        with shard.phase("calibration", "calib"):
            stats = collect_input_stats(model, paths, calib, progress)
        shard.reduce_stats_(stats)
    quantize_owned(model, paths, config, shard, stats)
