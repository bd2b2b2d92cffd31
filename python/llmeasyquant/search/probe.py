"""Measured loss of mixed assignments on calibration tokens, fast.

The float model's hidden states at every decoder block's input are computed
once; a layer's sensitivity (the model with only that layer quantized) then
needs only the blocks from that layer's block to the end. The loss is the mean
next-token cross-entropy over the calibration tokens.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..pipeline import capture_block_inputs
from ..methods._common import swap
from ..models.extract import ModelSpec


def _run(block: nn.Module, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(h, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class LossProbe:
    def __init__(self, model: nn.Module, spec: ModelSpec, batches: list[torch.Tensor]):
        if not batches:
            raise ValueError("the search needs at least one calibration batch")
        self.model, self.spec, self.batches = model, spec, batches
        self.prefix = spec.arch.layers_path
        with torch.no_grad():
            inputs = capture_block_inputs(model, spec.blocks[0], batches)
            self.args, self.kwargs = inputs.args, inputs.kwargs
            # float hidden states entering each block, per batch
            self.hidden = [list(inputs.hidden)]
            for block in spec.blocks[:-1]:
                self.hidden.append([_run(block, h, self.args[j], self.kwargs[j])
                                    for j, h in enumerate(self.hidden[-1])])
        self.finals = [model.get_submodule(p) for p in spec.arch.final if _has(model, p)]
        self.head = model.get_output_embeddings()
        self.evals = 0
        self.float_loss = self.loss_from(0)

    def block_of(self, path: str) -> int:
        if not path.startswith(self.prefix + "."):
            return 0  # outside the blocks (e.g. a projection before them): run everything
        return int(path[len(self.prefix) + 1:].split(".")[0])

    @torch.no_grad()
    def loss_from(self, start: int) -> float:
        """Mean next-token loss, running blocks ``start``.. on the cached float inputs."""
        self.evals += 1
        total, count = 0.0, 0
        for j, ids in enumerate(self.batches):
            h = self.hidden[start][j]
            for block in self.spec.blocks[start:]:
                h = _run(block, h, self.args[j], self.kwargs[j])
            for m in self.finals:
                h = m(h)
            logits = self.head(h).float()
            total += F.cross_entropy(logits[0, :-1], ids[0, 1:].to(logits.device), reduction="sum").item()
            count += ids.shape[1] - 1
        return total / count

    @contextlib.contextmanager
    def swapped(self, layers: dict[str, nn.Module]):
        """The model with ``layers`` (path -> module) in place, restored afterwards."""
        old = {p: self.model.get_submodule(p) for p in layers}
        try:
            for p, m in layers.items():
                swap(self.model, p, m)
            yield
        finally:
            for p, m in old.items():
                swap(self.model, p, m)

    def loss_with(self, layers: dict[str, nn.Module]) -> float:
        """Loss with ``layers`` swapped in (only the blocks from the first changed one run)."""
        start = min((self.block_of(p) for p in layers), default=len(self.spec.blocks))
        with self.swapped(layers):
            return self.loss_from(min(start, len(self.spec.blocks) - 1))


def _has(model: nn.Module, path: str) -> bool:
    try:
        return model.get_submodule(path) is not None
    except AttributeError:
        return False
