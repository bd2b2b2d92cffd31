"""AWQ: activation-aware weight quantization (scale search and clipping search).

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration", following the reference implementation (mit-han-lab/llm-awq,
``awq/quantize/auto_scale.py`` and ``auto_clip.py``). Pure tensor math: the
caller owns the modules and folds the results in.

Pipeline for one group of linears that share an input ``x`` (q/k/v; gate/up;
o_proj; down_proj):

1. ``res = awq_search_scale([W_q, W_k, W_v], x, bits=..., group_size=...)``
2. fold: ``W_i <- apply_scale_to_linear_weight(W_i, res.scale)`` and divide the
   output of the op producing ``x`` (RMSNorm weight, or the previous linear's
   rows) by ``res.scale``; the float function is unchanged:
   ``(x / s) @ (W * s)^T == x @ W^T``.
3. per linear: ``clip = awq_search_clip(W_i, x / s, ...)``, ``W_i <- apply_clip(W_i, clip)``.
4. quantize ``W_i`` with plain RTN (``_reference.quantize``) in the same
   ``bits``/``group_size``/``symmetric`` setting used here.

All quantization here is RTN in LLMEasyQuant's conventions (``_reference.py``):
``scale_from_absmax`` / ``scale_zp_from_minmax``, round half to even, true
division, dequantized as ``scale * (q - zero_point)`` in float32.

Differences from the reference implementation:

* Our quantization grid (signed, scale = absmax/qmax when symmetric; min/max
  widened to contain 0 otherwise) replaces llm-awq's ``pseudo_quantize_tensor``.
* The output error of the default (linear) forward is computed from the weight
  difference, ``x @ (W_hat - W)^T``, or, when that is cheaper (more tokens than
  the reduced dimension), through the Gram matrix ``x^T x``; both equal the
  reference's ``mean((out_fp - out_q)^2)`` up to float rounding.
* Clip search: token subsampling uses ``step = max(1, T // n_sample_tokens)``
  (the reference divides by zero when ``T < n_sample_tokens``), and the search
  covers ``max(1, int(max_shrink * n_grid))`` shrink ratios; no output-channel
  batching is needed (memory stays O(N * K)).
* Ties (equal losses) keep the smaller ratio / the smaller shrink, as the
  reference's strict ``<`` does. Everything is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ...quant_format import qrange, scale_from_absmax, scale_zp_from_minmax

__all__ = ["AWQScaleResult", "awq_search_scale", "awq_search_clip", "apply_clip",
           "apply_scale_to_linear_weight", "fake_quantize_rtn"]


@dataclass
class AWQScaleResult:
    """Output of :func:`awq_search_scale`.

    * ``scale``: float32 ``[K]`` per-input-channel scale ``s`` (multiply weight
      columns by it, divide the input by it).
    * ``ratio``: the chosen exponent ``alpha`` in ``s = mean|x|^alpha`` (normalised).
    * ``ratios`` / ``losses``: every candidate exponent and its output MSE (mean over
      tokens and output features of the squared difference between the float output
      and the output with quantized weights; units of ``x * W`` squared).
      ``losses[0]`` (ratio 0, ``s = 1``) is plain RTN.
    """

    scale: torch.Tensor
    ratio: float
    ratios: list = field(default_factory=list)
    losses: list = field(default_factory=list)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _divisors(K: int) -> list[int]:
    return [d for d in range(1, K + 1) if K % d == 0]


def _check_bits_group(bits: int, group_size: int, K: int) -> int:
    """Validate bits (2..8) and group_size (-1 or a divisor of K); returns g (K for -1)."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    if not isinstance(group_size, int) or group_size == 0 or group_size < -1 or (
            group_size > 0 and K % group_size):
        raise ValueError(f"group_size must be -1 (per output channel) or a positive divisor of "
                         f"K={K}: one of {_divisors(K)}; got {group_size!r}")
    return K if group_size == -1 else group_size


def _check_weight(W, name: str = "weight") -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        shape = list(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"{name} must be a 2-D floating tensor [N, K], got {shape}")
    if W.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {list(W.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError(f"{name} contains NaN or Inf")


def _check_x(x, K: int) -> torch.Tensor:
    """x [..., K] floating, finite, at least one token -> float32 [T, K]."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != K:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating tensor [T, K] with K={K} (the weights' in_features), "
                         f"got {shape}")
    x = x.reshape(-1, K).float()
    if x.shape[0] == 0:
        raise ValueError("x must contain at least one calibration token")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or Inf")
    return x


def fake_quantize_rtn(W: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest quantize + dequantize ``W [..., K]`` group-wise along K.

    Returns float32, bit-identical to ``_reference.dequantize(*_reference.quantize(W, ...))``
    for finite float32 input (same ops in the same order). ``group_size`` -1 or a divisor of K.
    """
    K = W.shape[-1]
    g = K if group_size == -1 else group_size
    qmin, qmax = qrange(bits)
    wg = W.float().reshape(*W.shape[:-1], K // g, g)
    if symmetric:
        s = scale_from_absmax(wg.abs().amax(dim=-1), bits)
        z = torch.zeros_like(s)
    else:
        s, zi = scale_zp_from_minmax(wg.amin(dim=-1), wg.amax(dim=-1), bits)
        z = zi.float()
    s, z = s.unsqueeze(-1), z.unsqueeze(-1)
    q = (torch.round(wg / s) + z).clamp_(qmin, qmax)
    return (s * (q - z)).reshape(W.shape)


def _out_mse(dW: torch.Tensor, x: torch.Tensor, gram: Optional[torch.Tensor]) -> float:
    """mean((x @ dW^T)^2) over [T, M]; via gram = x^T x when given (cheaper for T > K)."""
    T, M = x.shape[0], dW.shape[0]
    if gram is not None:
        tot = ((dW @ gram) * dW).sum(dtype=torch.float64)
    else:
        tot = (x @ dW.T).pow(2).sum(dtype=torch.float64)
    return float(tot.item()) / (T * M)


# --------------------------------------------------------------------------
# scale search
# --------------------------------------------------------------------------
@torch.no_grad()
def awq_search_scale(weights: Sequence[torch.Tensor], x: torch.Tensor, *, bits: int, group_size: int,
                     symmetric: bool = False, grid: int = 20,
                     forward: Optional[Callable] = None) -> AWQScaleResult:
    """Search AWQ's per-input-channel scale for linears that share one input.

    Args:
        weights: list of ``[N_i, K]`` float weights (``nn.Linear`` layout) of the linears
            fed by ``x`` (e.g. q/k/v, or gate/up); one ``s`` is shared by all of them.
            Not modified.
        x: ``[T, K]`` (or ``[..., K]``, flattened) calibration inputs of these linears.
        bits: 2..8. ``group_size``: -1 or a positive divisor of K. ``symmetric``: the RTN
            mode the weights will be quantized with afterwards.
        grid: number of candidate exponents ``ratio in {0, 1/grid, ..., (grid-1)/grid}``.
        forward: optional ``forward(ws: list[Tensor], x: Tensor) -> Tensor`` computing the
            block output from the weights (float32, same shapes as ``weights``) and the
            float32 ``x [T, K]``, e.g. a whole attention/MLP block as in the reference.
            Default: the linears' outputs, ``cat([x @ W_i^T])``.

    For each ratio: ``s = clamp(mean_t |x[t, j]|^ratio, min=1e-4)``, normalised by
    ``sqrt(max(s) * min(s))``; every ``W_i * s`` is RTN-quantized, dequantized and divided
    by ``s``; the loss is the output MSE against the float weights. The lowest loss wins
    (ratio 0, i.e. ``s = 1`` = plain RTN, is a candidate, so the result is never worse
    than RTN on ``x``).

    Returns:
        :class:`AWQScaleResult` with ``scale`` float32 ``[K]`` on ``x``'s device.
    """
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError("weights must be a non-empty list of [N_i, K] tensors")
    for i, W in enumerate(weights):
        _check_weight(W, f"weights[{i}]")
    K = weights[0].shape[1]
    for i, W in enumerate(weights):
        if W.shape[1] != K:
            raise ValueError(f"all weights must share in_features K; weights[0] has K={K}, "
                             f"weights[{i}] has shape {list(W.shape)}")
    _check_bits_group(bits, group_size, K)
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    x = _check_x(x, K)
    dev = x.device
    T = x.shape[0]

    sizes = [W.shape[0] for W in weights]
    Wc = torch.cat([W.to(dev, torch.float32) for W in weights], dim=0)  # [M, K]

    # Activation statistic: average magnitude per input channel (llm-awq get_act_scale).
    x_mean = x.abs().mean(dim=0)
    if forward is None:
        gram = x.T @ x if T > K else None  # cheaper loss when there are more tokens than K
        ref_out = None
    else:
        gram = None
        ref_out = forward(list(Wc.split(sizes, dim=0)), x).float()

    ratios, losses = [], []
    best_loss, best_ratio, best_s = math.inf, None, None
    for r in range(grid):
        ratio = r / grid
        s = x_mean.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        W_hat = fake_quantize_rtn(Wc * s, bits, group_size, symmetric) / s
        if forward is None:
            loss = _out_mse(W_hat - Wc, x, gram)
        else:
            out = forward(list(W_hat.split(sizes, dim=0)), x).float()
            loss = float((ref_out - out).pow(2).mean(dtype=torch.float64).item())
        ratios.append(ratio)
        losses.append(loss)
        if loss < best_loss:  # strict: ties keep the smaller ratio
            best_loss, best_ratio, best_s = loss, ratio, s
    if best_s is None:  # every loss NaN (only possible through a custom forward)
        raise ValueError(f"AWQ scale search produced no finite loss: {losses}")
    return AWQScaleResult(scale=best_s.float().contiguous(), ratio=best_ratio, ratios=ratios,
                          losses=losses)


def apply_scale_to_linear_weight(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W * s[None, :]`` for ``W [N, K]``, ``s [K]`` (computed in float32, returned in
    ``W.dtype``). The caller divides the producer of this linear's input by ``s``."""
    if W.dim() != 2 or s.dim() != 1 or s.shape[0] != W.shape[1]:
        raise ValueError(f"need W [N, K] and s [K]; got W {list(W.shape)}, s {list(s.shape)}")
    return (W.float() * s.to(W.device, torch.float32)[None, :]).to(W.dtype)


# --------------------------------------------------------------------------
# clipping search
# --------------------------------------------------------------------------
@torch.no_grad()
def awq_search_clip(W: torch.Tensor, x: torch.Tensor, *, bits: int, group_size: int,
                    symmetric: bool = False, n_grid: int = 20, max_shrink: float = 0.5,
                    n_sample_tokens: int = 512) -> torch.Tensor:
    """Search a per-group weight clipping threshold (llm-awq ``auto_clip_layer``).

    Args:
        W: ``[N, K]`` float weight (after the AWQ scale was applied, if any). Not modified.
        x: ``[T, K]`` (or ``[..., K]``) inputs of this linear (divided by the AWQ scale, if
            any). Every ``step``-th token is used, ``step = max(1, T // n_sample_tokens)``.
        bits, group_size (-1 = one group per row), symmetric: the RTN setting.
        n_grid, max_shrink: candidates ``clip = absmax_group * (1 - i / n_grid)`` for
            ``i in range(max(1, int(max_shrink * n_grid)))``; ``i = 0`` is "no clipping".

    For each candidate the group is clamped to ``[-clip, clip]``, RTN-quantized and
    dequantized, and scored by the mean over sampled tokens of the squared error of
    that group's partial output ``x_group . w_group``; each (row, group) keeps its best
    candidate. Since "no clipping" is a candidate, the chosen clip never increases
    that error.

    Asymmetric quantization: the clip is symmetric (``+-clip``), as in the reference
    (whose default quantizer is asymmetric too): it shrinks the larger-magnitude side
    of the group first, and the smaller side only once ``clip`` goes below it; the
    zero-point quantizer then uses the clamped group's min/max.

    Returns:
        float32 ``[N, G]`` clip thresholds (``G = 1`` for ``group_size=-1``), on ``x``'s
        device; use with :func:`apply_clip`.
    """
    _check_weight(W, "W")
    N, K = W.shape
    g = _check_bits_group(bits, group_size, K)
    G = K // g
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive integer, got {n_grid!r}")
    if not (isinstance(max_shrink, (int, float)) and 0 <= max_shrink < 1):
        raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink!r}")
    if not isinstance(n_sample_tokens, int) or n_sample_tokens < 1:
        raise ValueError(f"n_sample_tokens must be a positive integer, got {n_sample_tokens!r}")
    x = _check_x(x, K)
    x = x[::max(1, x.shape[0] // n_sample_tokens)]
    T = x.shape[0]
    dev = x.device

    wg = W.to(dev, torch.float32).reshape(N, G, g)
    org_max = wg.abs().amax(dim=-1, keepdim=True)  # [N, G, 1]
    xg = x.reshape(T, G, g).permute(1, 0, 2)  # [G, T, g]
    # Per-group error of the partial outputs: mean_t (x_t,grp . dw_grp)^2. With more
    # sampled tokens than the group width, go through the per-group Gram matrix.
    gram = xg.transpose(1, 2) @ xg if T > g else None  # [G, g, g]

    best_err = torch.full((N, G), math.inf, dtype=torch.float64, device=dev)
    best_max = org_max.squeeze(-1).clone()
    n_cand = max(1, int(max_shrink * n_grid))
    for i in range(n_cand):
        max_val = org_max * (1 - i / n_grid)
        cw = torch.clamp(wg, -max_val, max_val)
        dw = (fake_quantize_rtn(cw, bits, g, symmetric) - wg).permute(1, 0, 2)  # [G, N, g]
        if gram is not None:
            err = ((dw @ gram) * dw).sum(dim=-1, dtype=torch.float64) / T  # [G, N]
        else:
            err = (xg @ dw.transpose(1, 2)).pow(2).mean(dim=1, dtype=torch.float64)  # [G, N]
        err = err.T
        better = err < best_err  # strict: ties keep the smaller shrink
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val.squeeze(-1), best_max)
    return best_max.contiguous()


def apply_clip(W: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Clamp every group of ``W [N, K]`` to ``[-clip, clip]`` with ``clip [N, G]``
    (``G`` must divide ``K``; group ``j`` is columns ``j*K/G .. (j+1)*K/G - 1``).

    Symmetric clamp in both quantization modes (see :func:`awq_search_clip`). Returns a
    new tensor in ``W.dtype``; the clamp runs in float32 so ``clip`` is not rounded to a
    low-precision dtype first.
    """
    if W.dim() != 2 or clip.dim() != 2 or clip.shape[0] != W.shape[0] or clip.shape[1] == 0 \
            or W.shape[1] % clip.shape[1]:
        raise ValueError(f"need W [N, K] and clip [N, G] with G dividing K; got W {list(W.shape)}, "
                         f"clip {list(clip.shape)}")
    N, K = W.shape
    G = clip.shape[1]
    c = clip.to(W.device, torch.float32).unsqueeze(-1)
    wg = W.float().reshape(N, G, K // G)
    return torch.clamp(wg, -c, c).reshape(N, K).to(W.dtype)
