"""Calibration: turning text into token batches, per-channel activation
statistics, and whole-model passes with observers. The block-by-block driver
that calibration-based methods run through is :mod:`llmeasyquant.pipeline`.

Text defaults to WikiText-2 *validation* (``wiki.valid.tokens``); evaluation
uses the test split, so calibration never sees evaluation text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .data import default_calib_file, read_text
from .log import logger


def calibration_batches(tokenizer, source: str | Sequence[str] | None = None, *, n_samples: int = 32,
                        seq_len: int = 512, seed: int = 0) -> list[torch.Tensor]:
    """``n_samples`` random windows of ``seq_len`` tokens, each ``[1, seq_len]``.

    ``source``: a text file path (default: WikiText-2 validation) or a list of
    strings (joined with blank lines).
    """
    if n_samples <= 0 or seq_len <= 1:
        raise ValueError(f"calibration needs n_samples >= 1 and seq_len >= 2, got {n_samples}, {seq_len}")
    if source is None or isinstance(source, str):
        text = read_text(source or default_calib_file())
    else:
        text = "\n\n".join(source)
    if not text.strip():
        raise ValueError("calibration set is empty: the text has no content")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() <= seq_len:
        # short text: one window of what there is
        return [ids.unsqueeze(0)]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    logger.info("calibration: %d windows x %d tokens drawn from %d tokens of %s", n_samples, seq_len, ids.numel(),
                source if isinstance(source, str) else ("WikiText-2 validation" if source is None else "given text"))
    return [ids[s: s + seq_len].unsqueeze(0) for s in starts.tolist()]


@dataclass
class ChannelStats:
    """Running per-input-channel statistics of one linear's activations."""

    absmax: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    samples: Optional[torch.Tensor] = None  # [T, K] token rows kept for searches
    keep_tokens: int = 0

    @classmethod
    def empty(cls, K: int, device=None, keep_tokens: int = 0) -> "ChannelStats":
        return cls(*ops.new_channel_stats(K, device), keep_tokens=keep_tokens)

    def update(self, x: torch.Tensor) -> None:
        ops.channel_stats_(x.detach(), self.absmax, self.min, self.max)
        if self.keep_tokens:
            # an evenly spaced subset of each batch's tokens, up to keep_tokens in all
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            have = 0 if self.samples is None else self.samples.shape[0]
            take = min(self.keep_tokens - have, rows.shape[0])
            if take > 0:
                idx = torch.linspace(0, rows.shape[0] - 1, take).round().long()
                picked = rows[idx]
                self.samples = picked if self.samples is None else torch.cat([self.samples, picked])

    @property
    def seen(self) -> bool:
        """Whether any row was observed (an expert no token was routed to: False)."""
        return bool((self.min <= self.max).any())

    def divide_(self, s: torch.Tensor) -> None:
        """The statistics of X / s (s > 0 per channel)."""
        self.absmax.div_(s)
        self.min.div_(s)
        self.max.div_(s)
        if self.samples is not None:
            self.samples = self.samples / s


def _in_features(module: nn.Module) -> int:
    return module.in_features if hasattr(module, "in_features") else module.weight.shape[0]  # Conv1D: [in, out]


@torch.no_grad()
def observe_model(model: nn.Module, paths: Iterable[str], batches: Sequence[torch.Tensor],
                  on_input: Callable[[str, torch.Tensor], None], desc: str = "calibrating",
                  progress: bool = True) -> None:
    """Run the model over ``batches``; ``on_input(path, x)`` sees the input
    ``x`` of every module at ``paths`` (as the module received it)."""
    hooks = [model.get_submodule(p).register_forward_pre_hook(lambda m, args, p=p: on_input(p, args[0].detach()))
             for p in paths]
    try:
        for ids in tqdm(batches, desc=desc, disable=not progress):
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def collect_input_stats(model: nn.Module, paths: Iterable[str], batches: Sequence[torch.Tensor],
                        progress: bool = True, keep_tokens: int = 0) -> dict[str, ChannelStats]:
    """Per-channel absmax/min/max of the inputs of the modules at ``paths``
    (and up to ``keep_tokens`` sample rows of each input, for searches)."""
    paths = list(paths)
    stats = {p: ChannelStats.empty(_in_features(model.get_submodule(p)), keep_tokens=keep_tokens) for p in paths}
    observe_model(model, paths, batches, lambda p, x: stats[p].update(x.float()),
                  "calibrating (activation statistics)", progress)
    return stats
