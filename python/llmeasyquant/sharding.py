"""How a method splits its work, seen from the method.

Methods call a :class:`Shard` at a few points (who owns which layer, combine
statistics, receive the others' quantized layers). This base class is the
single-process case, where every call is a no-op; the distributed
implementation (:class:`llmeasyquant.distributed.ProcessShard`) turns the same
calls into torch.distributed collectives. Keeping the interface here lets the
methods stay below the distributed layer.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from .nn.qlinear import QLinear


# what a method's time is spent on (Shard.phase names; paper eq. 12 plus calibration)
PHASES = ("load", "calib", "quant", "gemm", "comm", "sync")


def partition(keys: Sequence[str], costs: Sequence[float], world: int) -> dict[str, int]:
    """Longest-processing-time-first: each unit (in order of decreasing cost,
    ties by position) goes to the rank with the least work so far (ties: lowest rank)."""
    if len(keys) != len(costs):
        raise ValueError(f"partition: {len(keys)} keys but {len(costs)} costs")
    load = [0.0] * world
    owner = {}
    for i in sorted(range(len(keys)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[keys[i]] = r
        load[r] += float(costs[i])
    return owner


class Shard:
    """The single-process case: this rank owns every unit; nothing is sent."""

    rank = 0
    world = 1
    data_parallel = False

    def __init__(self, timer=None):
        # timer: None or an object with phase(key, name) / forward_times(root, prefix, types)
        # context managers (llmeasyquant.distributed.Breakdown)
        self.timer = timer
        self.owner: dict[str, int] = {}

    # ----------------------------------------------------------- bookkeeping
    def phase(self, key: str, name: str):
        return self.timer.phase(key, name) if self.timer else contextlib.nullcontext()

    def forward_times(self, root: nn.Module, prefix: str):
        return self.timer.forward_times(root, prefix, (QLinear,)) if self.timer else contextlib.nullcontext()

    def assign(self, keys: Sequence[str], costs: Sequence[float]) -> set[str]:
        """Partition ``keys`` over the ranks; returns those this rank owns."""
        self.owner.update(partition(keys, costs, self.world))
        return {k for k in keys if self.owner[k] == self.rank}

    def owns(self, key: str) -> bool:
        return self.owner.get(key, 0) == self.rank

    # ------------------------------------------------------------ collectives
    def local_batches(self, batches: list) -> list:
        return batches

    def reduce_stats_(self, stats: dict) -> None:
        pass

    def reduce_to_owner_(self, key: str, t: torch.Tensor) -> None:
        pass

    def share(self, key: str, value):
        return value

    def gather_modules(self, root: nn.Module, names: Sequence[str], prefix: str = "") -> None:
        pass

    def barrier(self, key: str) -> None:
        pass
