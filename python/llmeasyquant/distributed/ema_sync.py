"""Online (EMA) activation scales kept consistent across ranks.

Each rank's ``act="ema"`` QLinear tracks the range of the activations *it*
sees; data-parallel ranks see different tokens, so their scales drift apart.
:class:`EMASync` combines the states of all such layers in one all-reduce
every ``every`` forwards of the model:

* ``mode="mean"`` - the average of the ranks' EMA states (what one EMA over
  the interleaved streams would approach);
* ``mode="max"``  - the widest range (absmax and max: max over ranks, min: min):
  never clips what any rank has seen.

After a sync every rank quantizes with identical scales.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..nn.qlinear import QLinear
from .runtime import collective

MODES = ("mean", "max")


class EMASync:
    def __init__(self, model: nn.Module, every: int = 1, mode: str = "mean", group=None):
        if every < 1:
            raise ValueError(f"EMASync: every must be >= 1 forward, got {every}")
        if mode not in MODES:
            raise ValueError(f"EMASync: mode must be one of {MODES}, got {mode!r}")
        self.layers = [m for m in model.modules() if isinstance(m, QLinear) and m.act == "ema"]
        if not self.layers:
            raise ValueError("EMASync: the model has no QLinear with act='ema'")
        self.every, self.mode, self.group = every, mode, group
        self.forwards = 0
        self.syncs = 0
        self.seconds = 0.0  # wall time spent in sync() (communication + copies)
        self._hook = model.register_forward_hook(self._after_forward)

    def _after_forward(self, module, args, out) -> None:
        self.forwards += 1
        if self.forwards % self.every == 0:
            self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """One all-reduce of every EMA state ``[L, 4]`` (absmax, min, max, steps)."""
        t0 = time.perf_counter()
        states = torch.stack([m.ema_state for m in self.layers])
        world = dist.get_world_size(self.group)
        with collective("EMA activation-scale sync"):
            if self.mode == "mean":
                dist.all_reduce(states, op=dist.ReduceOp.SUM, group=self.group)
                states[:, :3] /= world
                states[:, 3] /= world
            else:
                states[:, 1] = -states[:, 1]  # max of -min = -(min of min)
                dist.all_reduce(states, op=dist.ReduceOp.MAX, group=self.group)
                states[:, 1] = -states[:, 1]
        for m, s in zip(self.layers, states):
            m.ema_state.copy_(s)
        self.syncs += 1
        self.seconds += time.perf_counter() - t0

    def remove(self) -> None:
        self._hook.remove()

    def bytes_per_sync(self) -> int:
        return len(self.layers) * 4 * 4


def ema_states(model: nn.Module) -> Optional[torch.Tensor]:
    layers = [m for m in model.modules() if isinstance(m, QLinear) and m.act == "ema"]
    return torch.stack([m.ema_state for m in layers]) if layers else None
