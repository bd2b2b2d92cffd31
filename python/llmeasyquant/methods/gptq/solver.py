"""GPTQ: second-order, error-compensating weight quantization.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (Algorithm 1), following the reference implementation
(IST-DASLab/gptq, ``GPTQ.fasterquant``): columns are quantized one at a time and
the rounding error of each column is pushed onto the not-yet-quantized columns
through the upper Cholesky factor of the inverse Hessian, with the updates of
columns outside the current block applied lazily, once per block, as a matmul.

The result is expressed in LLMEasyQuant's conventions (see ``_reference.py``):
``w ~= scale * (q - zero_point)``, ``q`` in ``[-2**(b-1), 2**(b-1) - 1]``, scales
from :func:`scale_from_absmax` (symmetric) or :func:`scale_zp_from_minmax`
(asymmetric, range widened to contain 0), round half to even, true division.

Differences from the reference implementation (all deliberate):

* Quantization grid: ours (above), not the reference's unsigned ``[0, maxq]``
  grid with ``zero = (maxq + 1) / 2`` for symmetric weights.
* Group scales (``group_size > 0``, no ``act_order``) are computed when the
  quantizer reaches the group's first column, from the *fully* error-updated
  weights of the group. The reference reads them from ``W``, which lacks the
  in-block updates when a group starts in the middle of a block
  (``group_size < block_size``); the two agree whenever group starts fall on
  block starts (e.g. the default 128/128). With ours the result does not depend
  on ``block_size`` (up to float rounding) and equals the unblocked OBS update.
* ``act_order`` always uses "static groups" (all group scales computed up front
  from the original weights) so the storage layout stays contiguous groups in
  the original column order (no ``g_idx``).
* Per-row scales (``group_size=-1``) are computed after dead columns are zeroed
  (their weights never see a non-zero input, so they should not widen the range).
* Ties in ``act_order`` are broken by column index (stable sort), so the
  permutation, and the result, is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...quant_format import qrange, scale_from_absmax, scale_zp_from_minmax

__all__ = ["ClipSearch", "GPTQResult", "gptq_quantize"]


@dataclass
class GPTQResult:
    """Output of :func:`gptq_quantize`, in the original column order.

    * ``q``: int8 ``[N, K]``, unpacked integers in ``[qmin, qmax]`` (pack 4-bit
      values with ``_reference.pack_bits`` for storage).
    * ``scale``: float32 ``[N, G]``; ``G = 1`` for ``group_size=-1``, else ``K // group_size``.
    * ``zero_point``: int8 ``[N, G]`` (all zeros when symmetric).
    * ``loss``: the GPTQ objective summed over all columns, ``sum_i (w_i - dq_i)^2 / d_i^2``.
      In exact arithmetic this equals ``tr((W - W_hat) H_d (W - W_hat)^T)`` with
      ``H_d = H + damp * mean(diag(H)) * I`` (dead columns of ``W`` zeroed), i.e.
      ``||X W^T - X W_hat^T||_F^2`` plus the damping term when ``H = X^T X``.
      It is in the units of ``H``: scaling ``H`` scales ``loss`` and nothing else.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    loss: float
    bits: int
    group_size: int
    symmetric: bool

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale * (q - zero_point)`` as ``[N, K]`` (fp32 math, then ``dtype``),
        the same operations as ``_reference.dequantize``."""
        N, K = self.q.shape
        G = self.scale.shape[1]
        qg = self.q.float().reshape(N, G, K // G)
        w = self.scale.float().unsqueeze(-1) * (qg - self.zero_point.float().unsqueeze(-1))
        return w.reshape(N, K).to(dtype)


def _divisors(K: int) -> list[int]:
    return [d for d in range(1, K + 1) if K % d == 0]


def _check_common(W: torch.Tensor, bits: int, group_size: int) -> tuple[int, int]:
    """Shared argument checks (also used by awq); returns (N, K)."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        shape = list(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"weight must be a 2-D floating tensor [N, K], got {shape}")
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    N, K = W.shape
    if K == 0 or N == 0:
        raise ValueError(f"weight must be non-empty, got shape {list(W.shape)}")
    if not isinstance(group_size, int) or group_size == 0 or group_size < -1 or (
            group_size > 0 and K % group_size):
        raise ValueError(f"group_size must be -1 (per output channel) or a positive divisor of "
                         f"K={K}: one of {_divisors(K)}; got {group_size!r}")
    if not torch.isfinite(W).all():
        raise ValueError("weight contains NaN or Inf")
    return N, K


def _minmax_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype):
    if symmetric:
        s = scale_from_absmax(torch.maximum(-lo, hi), bits, scale_dtype)
        return s, torch.zeros_like(s, dtype=torch.int8)
    return scale_zp_from_minmax(lo, hi, bits, scale_dtype)


def _group_params(wg: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype,
                  clip: "ClipSearch | None" = None):
    """Scale/zero-point (float32 [N], int8 [N]) for each row of wg [N, g].

    ``clip``: the range [min, max] of each row is shrunk by the factor
    ``p`` in ``1, 1 - 1/grid, ...`` (down to ``1 - max_shrink``) that
    minimises ``sum |w - dq(w)|^norm`` over the row (the GPTQ reference's
    ``Quantizer(mse=True)`` search, in our grid conventions); p = 1 is
    min/max, so the error never exceeds min/max's."""
    lo = wg.amin(dim=1).float().clamp(max=0.0)
    hi = wg.amax(dim=1).float().clamp(min=0.0)
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    s, z = _minmax_params(lo, hi, bits, symmetric, scale_dtype)
    if clip is None:
        return s, z
    qmin, qmax = qrange(bits)
    w = wg.float()

    def err(s, z):
        q = (torch.round(w / s[:, None]) + z.float()[:, None]).clamp(qmin, qmax)
        return (w - s[:, None] * (q - z.float()[:, None])).abs().pow(clip.norm).sum(dim=1)

    best = err(s, z)
    for i in range(1, int(clip.max_shrink * clip.grid) + 1):
        p = 1.0 - i / clip.grid
        s2, z2 = _minmax_params(lo * p, hi * p, bits, symmetric, scale_dtype)
        e = err(s2, z2)
        better = e < best
        best = torch.where(better, e, best)
        s = torch.where(better, s2, s)
        z = torch.where(better, z2, z)
    return s, z


@dataclass(frozen=True)
class ClipSearch:
    """Per-group range shrink search (see :func:`_group_params`)."""

    grid: int = 100
    max_shrink: float = 0.8
    norm: float = 2.4


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, *, bits: int, group_size: int = -1,
                  symmetric: bool = False, block_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, scale_dtype: torch.dtype = torch.float32,
                  clip: Optional[ClipSearch] = None) -> GPTQResult:
    """Quantize a linear layer's weight with GPTQ.

    Args:
        W: ``[N, K]`` float weight (``out_features x in_features``, as ``nn.Linear``).
            Not modified. Any float dtype; see "Precision".
        H: ``[K, K]`` symmetric positive semi-definite proxy Hessian
            ``sum_t x_t x_t^T = X^T X`` over the calibration tokens ``X [T, K]`` (the inputs
            of this linear). Un-normalised sums are expected, but any positive multiple
            (e.g. the reference's ``2 X^T X / T``) gives the same ``q``/``scale``/
            ``zero_point``; only ``loss`` scales with it. Only the lower triangle is read
            by the factorisation; pass an exactly symmetric matrix.
        bits: 2..8. ``group_size``: -1 (one scale per output row) or a positive divisor
            of K (groups of consecutive input columns). ``symmetric``: AbsMax scales and
            zero-point 0, else min/max scales with a zero-point.
        block_size: columns per lazy-update block (any positive value; need not divide K).
            Affects speed only, not the result (beyond float rounding).
        damp: relative dampening; ``damp * mean(diag(H))`` is added to the diagonal.
        act_order: quantize columns in order of decreasing ``diag(H)`` (static groups).
        clip: None (min/max ranges), or a :class:`ClipSearch`: each group's range is
            shrunk to the factor with the least ``|w - dq|^norm`` before its columns are
            quantized (MSE-optimal clipping).
        scale_dtype: float32, or float16 for layers that hold float16 scales: each
            scale is rounded to it before its columns are quantized, so the error
            compensation sees the weights the layer will really hold.

    Dead inputs (``H[i, i] == 0``) get ``H[i, i] = 1`` and ``W[:, i] = 0`` as in the
    reference, so their quantized weights are 0 (exact zero-point).

    Precision: the inverse-Hessian Cholesky factor is always computed in float64
    (``cholesky(H) -> cholesky_inverse -> cholesky(upper)``: cheap next to the column
    loop and avoids failures on ill-conditioned ``H``); the column loop runs in float64
    if ``W`` is float64, else in float32. Scales are float32 (the convention); each
    column's dequantized value is ``scale * (q - zp)`` in float32, as the model will see it.

    Deterministic: no random choices, stable act-order sort.

    Returns:
        :class:`GPTQResult` in the original column order.

    Raises:
        ValueError: bad shapes/dtypes, bits, group_size (message lists valid sizes),
            block_size, damp, non-finite W or H, or ``H + damp`` not positive definite.
    """
    N, K = _check_common(W, bits, group_size)
    if not isinstance(H, torch.Tensor) or not H.is_floating_point() or tuple(H.shape) != (K, K):
        shape = list(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(f"H must be a floating tensor of shape [K, K] = [{K}, {K}] for W of shape "
                         f"[{N}, {K}], got {shape}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if not torch.isfinite(H).all():
        raise ValueError("H contains NaN or Inf")

    dev = W.device
    wdt = torch.float64 if W.dtype == torch.float64 else torch.float32
    qmin, qmax = qrange(bits)
    g = K if group_size == -1 else group_size
    G = K // g

    W = W.to(wdt).clone()
    H = H.to(device=dev, dtype=torch.float64).clone()

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scale = torch.empty(N, G, dtype=torch.float32, device=dev)
    zero = torch.zeros(N, G, dtype=torch.int8, device=dev)
    # Static scales: per-row always (one group spans all of K), every group under act_order.
    static = group_size == -1 or act_order
    if static:
        for gi in range(G):
            scale[:, gi], zero[:, gi] = _group_params(W[:, gi * g:(gi + 1) * g], bits, symmetric, scale_dtype, clip)

    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        col_group = (perm // g).tolist()  # original group of each processed column
    else:
        perm = None
        col_group = [j // g for j in range(K)]

    H.diagonal().add_(damp * torch.diagonal(H).mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0:
        raise ValueError(f"H + {damp} * mean(diag(H)) * I is not positive definite (in float64); "
                         "pass a positive semi-definite H (X^T X) or increase damp")
    Hinv = Hinv.to(wdt)
    del H, L

    Q = torch.empty(N, K, dtype=torch.int8, device=dev)
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    # float copies of the current group's parameters, refreshed on group change
    cur = -1
    s32 = z32 = s_w = None

    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            gi = col_group[j]
            if not static and j % g == 0:
                # Group scales from the *current* weights of the group: the in-block part
                # of W1 is up to date; columns past this block still lack this block's
                # lazy update, so apply it for them here (not to W: that happens below).
                wg = W1[:, i:i + g]
                if j + g > i2:
                    rest = W[:, i2:j + g] - Err1[:, :i] @ Hinv[i1:j, i2:j + g]
                    wg = torch.cat([wg, rest], dim=1)
                scale[:, gi], zero[:, gi] = _group_params(wg, bits, symmetric, scale_dtype, clip)
            if gi != cur:
                cur = gi
                s32 = scale[:, gi]
                z32 = zero[:, gi].float()
                s_w = s32.to(wdt)
            w = W1[:, i]
            # q = clamp(round(w / scale) + zp): the convention's ops (true division, half-even)
            q = (torch.round(w / s_w) + z32.to(wdt)).clamp_(qmin, qmax)
            Q[:, j] = q.to(torch.int8)
            dq = (s32 * (q.float() - z32)).to(wdt)  # exactly what dequantize() will give
            err = (w - dq) / Hinv1[i, i]
            # OBS update of the remaining columns of this block (row i of the upper
            # Cholesky factor of H^-1 restricted to columns >= j is the needed direction)
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        # (w - dq)^2 / d^2 per column = err^2
        loss += Err1.double().pow(2).sum()
        # lazy batched update of all columns after this block
        if i2 < K:
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(q=Q, scale=scale, zero_point=zero, loss=float(loss.item()), bits=bits,
                      group_size=group_size, symmetric=symmetric)
