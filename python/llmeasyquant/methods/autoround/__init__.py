"""AutoRound (SignRound) on a whole model: learned rounding offsets and clip
ranges, block by block (:mod:`llmeasyquant.pipeline`). The per-weight
quantizer is :class:`.rounding.LearnedRounding`.

Per decoder block, with every linear of the block at once:

* **input**: what the *quantized* blocks before it produce (the driver's
  sequential stream; AutoRound's default ``enable_quanted_input``), or, with
  ``quantized_input=False``, what the float blocks produce;
* **target**: the *float* block's output on the *float* model's input to this
  block (AutoRound's reference output). With quantized inputs the block thus
  also learns to undo the error of the blocks before it. The float stream is
  carried beside the driver's (one more block's activations held);
* **loss**: mean squared error between the block's output with fake-quantized
  weights and the target, over a minibatch of ``batch_size`` calibration
  sequences drawn at random each step (one backward per step);
* **steps**: signed gradient descent, ``p -= lr_t * sign(grad)`` with ``lr_t``
  decaying linearly from ``lr`` to 0 over ``iters`` steps (AutoRound's
  default schedule; ``lr`` defaults to ``1 / iters`` as there, so V can move
  by at most about 0.5 in total); V clamped to [-0.5, 0.5], clip factors to
  [0.5, 1] after each step;
* **best iterate**: the parameters with the lowest minibatch loss seen (as
  AutoRound keeps them); then the loss over *all* calibration sequences is
  compared with that of round-to-nearest (the starting point, measured the
  same way), and the block keeps round-to-nearest if the learned rounding is
  not better. So the block's calibration loss never increases
  (``AutoRoundHooks.losses`` records both, per block).

The linears become the same packed QLinear as every weight-only method
(``quantized_from``), so save / load / export / kernels are unchanged.
Activation quantization (``act="dynamic"``) is applied by the QLinear at run
time but not simulated during the optimisation.

CPU defaults (SmolLM2-135M, 30 blocks, 2 cores): 32 sequences x 256 tokens,
40 steps of 4 sequences. AutoRound's GPU defaults are 128-512 x 2048 tokens,
200 steps of 8; pass them (``iters=200, batch_size=8, n_calib=128,
calib_seq_len=2048``) on a GPU. ``device=`` runs each block (and its
optimisation) there; the CUDA path is written like the CPU one but has not
been run on a GPU here.

Not done: data-parallel calibration (refused), tuning of norm / bias
parameters, AutoRound's per-layer learning-rate / mixed-precision options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ...log import logger
from ...models.extract import ModelSpec
from ...nn.qlinear import _is_conv1d
from ...pipeline import BlockContext, BlockHooks, BlockInputs, block_forward
from ...quant_format import scale_dtype_of
from ...sharding import Shard
from .._common import quantize_blockwise, quantized_from, swap, weight_nk
from ..base import QuantConfig, register_method
from .rounding import CLIP_RANGE, V_RANGE, LearnedRounding

__all__ = ["AutoRoundConfig", "AutoRoundHooks", "LearnedRounding", "apply", "CLIP_RANGE", "V_RANGE"]


@dataclass
class AutoRoundConfig(QuantConfig):
    """AutoRound: ``iters`` signed-gradient steps per block on ``batch_size``
    calibration sequences each; ``lr`` (None: ``1 / iters``) for the rounding
    offsets, ``clip_lr`` (None: = lr) for the clip factors; ``clip=False``
    learns the rounding only; ``quantized_input`` feeds each block the
    quantized blocks' output (AutoRound's default); ``seed`` draws the
    minibatches. ``iters=0`` is round-to-nearest."""

    method: ClassVar[str] = "autoround"
    w_bits: int = 4
    w_group_size: int = 64
    w_symmetric: bool = False
    iters: int = 40
    batch_size: int = 4
    lr: Optional[float] = None
    clip_lr: Optional[float] = None
    clip: bool = True
    quantized_input: bool = True
    seed: int = 0
    n_calib: int = 32
    calib_seq_len: int = 256

    def __post_init__(self):
        super().__post_init__()
        m = self.method

        def _int(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{m}: {name} must be an integer >= {lo}, got {v!r}")

        if self.w_bits not in (2, 3, 4, 8):
            raise ValueError(f"{m}: w_bits must be one of 2, 3, 4, 8, got {self.w_bits!r}")
        if isinstance(self.w_group_size, bool) or not isinstance(self.w_group_size, int) or (
                self.w_group_size != -1 and self.w_group_size < 1):
            raise ValueError(f"{m}: w_group_size must be -1 (per output channel) or a positive group size, "
                             f"got {self.w_group_size!r}")
        _int("iters", 0)
        _int("batch_size", 1)
        _int("n_calib", 1)
        _int("calib_seq_len", 1)
        _int("seed", 0)
        for name in ("lr", "clip_lr"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v <= 0):
                raise ValueError(f"{m}: {name} must be a finite number > 0 or None (default), got {v!r}")
        for name in ("clip", "quantized_input", "w_symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{m}: {name} must be true or false, got {getattr(self, name)!r}")
        if self.act not in (None, "dynamic"):
            raise ValueError(f"{m}: act must be None (weight-only) or 'dynamic', got {self.act!r}")

    @property
    def step_lr(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(1, self.iters)

    @property
    def step_clip_lr(self) -> float:
        return self.clip_lr if self.clip_lr is not None else self.step_lr


def _to(obj, device):
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.float() - target.float()).pow(2).mean()


class AutoRoundHooks(BlockHooks):
    desc = "AutoRound"
    sequential = True

    def __init__(self, config: AutoRoundConfig):
        self.config = config
        self.fp_hidden: Optional[list[torch.Tensor]] = None  # the float model's input to the current block
        # per block: (round-to-nearest loss, kept loss, learned rounding kept?) on all calibration sequences
        self.losses: list[tuple[float, float, bool]] = []
        self.gen = torch.Generator().manual_seed(config.seed)

    def quantize(self, ctx: BlockContext) -> None:
        cfg, block, dev = self.config, ctx.block, ctx.device
        q_in = ctx.inputs
        fp_in = BlockInputs(self.fp_hidden if self.fp_hidden is not None else q_in.hidden, q_in.args, q_in.kwargs)
        home = q_in.hidden[0].device
        # the target: the float block on the float stream (also the next block's float input)
        targets = [block_forward(block, fp_in, j, dev) for j in range(len(q_in.hidden))]
        self.fp_hidden = [t.to(home) for t in targets]
        if not ctx.names:
            return
        src = q_in if cfg.quantized_input else fp_in
        mods = {n: ctx.module(n) for n in ctx.names}
        rounders = {n: LearnedRounding(weight_nk(m).detach().to(dev) if dev is not None else weight_nk(m).detach(),
                                       bits=cfg.w_bits, group_size=self._group(ctx, n, m), symmetric=cfg.w_symmetric,
                                       scale_dtype=scale_dtype_of(cfg.w_scale_dtype), clip=cfg.clip)
                    for n, m in mods.items()}
        frozen = [(p, p.requires_grad) for p in block.parameters()]
        try:
            for p, _ in frozen:
                p.requires_grad_(False)
            with torch.enable_grad():
                init = rounders_state(rounders)
                rtn_loss = self._full_loss(block, rounders, mods, src, targets, dev)
                best = self._optimise(block, rounders, mods, src, targets, dev)
                load_state(rounders, best)
                loss = self._full_loss(block, rounders, mods, src, targets, dev)
                kept = loss <= rtn_loss
                if not kept:
                    load_state(rounders, init)
                    logger.info("%s: %s: learned rounding did not lower the block loss (%.4g > %.4g at "
                                "round-to-nearest); kept round-to-nearest", self.desc, ctx.key, loss, rtn_loss)
                self.losses.append((rtn_loss, loss if kept else rtn_loss, kept))
                logger.debug("%s: %s: block loss %.4g -> %.4g", self.desc, ctx.key, rtn_loss, self.losses[-1][1])
        finally:
            for p, rg in frozen:
                p.requires_grad_(rg)
        for n, m in mods.items():
            q, s, zp = rounders[n].integers()
            swap(block, n, quantized_from(m, cfg, q, s, zp))

    def _group(self, ctx, n, m) -> int:
        g, K = self.config.w_group_size, weight_nk(m).shape[1]
        if g != -1 and K % g:
            raise ValueError(f"{self.config.method}: w_group_size={g} does not divide the input width K={K} of "
                             f"{ctx.path(n)}; use -1 (per channel) or a divisor of {K}")
        return g

    @staticmethod
    def _weights(rounders, mods) -> dict[str, torch.Tensor]:
        out = {}
        for n, r in rounders.items():
            w = r.fake()
            out[f"{n}.weight"] = (w.t() if _is_conv1d(mods[n]) else w).to(mods[n].weight.dtype)
        return out

    def _loss(self, block, weights, src: BlockInputs, targets, j: int, dev) -> torch.Tensor:
        args = (_to(src.hidden[j], dev), *_to(src.args[j], dev))
        out = torch.func.functional_call(block, weights, args, _to(src.kwargs[j], dev))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return _mse(out, targets[j])

    @torch.no_grad()
    def _full_loss(self, block, rounders, mods, src, targets, dev) -> float:
        weights = self._weights(rounders, mods)
        return sum(float(self._loss(block, weights, src, targets, j, dev)) for j in range(len(targets))) / len(targets)

    def _optimise(self, block, rounders, mods, src, targets, dev):
        """SignSGD over ``iters`` steps; returns the state with the lowest minibatch loss."""
        cfg = self.config
        n = len(targets)
        bs = min(cfg.batch_size, n)
        best, best_loss = rounders_state(rounders), math.inf
        for t in range(cfg.iters):
            idx = torch.randperm(n, generator=self.gen)[:bs].tolist()
            weights = self._weights(rounders, mods)
            loss = sum(self._loss(block, weights, src, targets, j, dev) for j in idx) / bs
            value = float(loss.detach())
            if value < best_loss:  # the parameters that gave this loss (before this step's update)
                best, best_loss = rounders_state(rounders), value
            params = [p for r in rounders.values() for p in r.params()]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            decay = 1.0 - t / cfg.iters
            with torch.no_grad():
                k = 0
                for r in rounders.values():
                    for p in r.params():
                        g = grads[k]
                        k += 1
                        if g is None:
                            continue
                        lr = cfg.step_lr if p is r.V else cfg.step_clip_lr
                        p.sub_(lr * decay * torch.sign(g))
                    r.clamp_()
        return best


def rounders_state(rounders) -> dict:
    return {n: r.state() for n, r in rounders.items()}


def load_state(rounders, state) -> None:
    for n, r in rounders.items():
        r.load_(state[n])


@register_method(AutoRoundConfig, calibrates=True)
@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config: AutoRoundConfig, calib, *, progress: bool = True,
          shard: Optional[Shard] = None, device=None):
    if shard is not None and shard.data_parallel:
        raise ValueError(f"{config.method}: data-parallel calibration is not supported (each block is optimised "
                         "on all calibration sequences at once); run without --data-parallel")
    hooks = AutoRoundHooks(config)
    report = quantize_blockwise(model, spec, config, calib, hooks, progress=progress, shard=shard, device=device)
    report.block_losses = hooks.losses
    return report
