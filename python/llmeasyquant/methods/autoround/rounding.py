"""Learned rounding of one weight matrix (AutoRound / SignRound, Cheng et al.
2023, "Optimize Weight Rounding via Signed Gradient Descent for the
Quantization of LLMs").

A weight ``W [N, K]`` in groups ``[N, G, g]`` is fake-quantized as

    lo = alpha * min(W_g, 0),  hi = beta * max(W_g, 0)         (per group)
    scale, zp = the package's min/max rule on [lo, hi]         (quant_format)
    q  = clamp(round(W / scale + V) + zp, qmin, qmax)
    W~ = scale * (q - zp)

with trainable rounding offsets ``V`` (same shape as ``W``, in [-0.5, 0.5])
and clip factors ``alpha``, ``beta`` (one per group, in [0.5, 1]); symmetric
weights have one factor (``beta`` scales ``max |W_g|``, ``alpha`` is unused).
``round`` has a straight-through gradient; the clamps have their ordinary
(zero outside) gradient. ``V = 0, alpha = beta = 1`` is exactly
round-to-nearest (the ZeroPoint / AbsMax rule), the starting point.

:meth:`LearnedRounding.integers` gives the integers, scales and zero-points
from the same operations (no gradient), so the QLinear holds exactly the
weights the optimisation saw: ``scale * (q - zp)`` equals :meth:`fake`
bit for bit.
"""

from __future__ import annotations

import torch

from ...quant_format import qrange, scale_from_absmax, scale_zp_from_minmax, storable_scale

__all__ = ["CLIP_RANGE", "V_RANGE", "LearnedRounding"]

V_RANGE = (-0.5, 0.5)     # rounding offsets: at most one step away from round-to-nearest
CLIP_RANGE = (0.5, 1.0)   # clip factors of the group range (the paper's alpha, beta)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round (half to even) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


class LearnedRounding:
    """Trainable rounding of one ``[N, K]`` weight (see the module doc).

    ``clip=False``: ``alpha``/``beta`` stay 1 (only the rounding is learned).
    ``scale_dtype`` float16: scales are rounded to float16 in the forward (a
    straight-through gradient), as the layer will hold them."""

    def __init__(self, W: torch.Tensor, *, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype = torch.float32, clip: bool = True):
        N, K = W.shape
        g = K if group_size == -1 else group_size
        if K % g:
            raise ValueError(f"group_size must be -1 or a divisor of K={K}, got {group_size}")
        self.shape, self.G, self.g = (N, K), K // g, g
        self.bits, self.symmetric, self.scale_dtype = bits, symmetric, scale_dtype
        self.Wg = W.detach().float().reshape(N, self.G, g)
        self.lo = self.Wg.amin(-1).clamp(max=0.0)  # [N, G]: the range always contains 0 (the format's rule)
        self.hi = self.Wg.amax(-1).clamp(min=0.0)
        dev = W.device
        self.V = torch.zeros(N, self.G, g, device=dev, requires_grad=True)
        self.alpha = torch.ones(N, self.G, device=dev, requires_grad=clip and not symmetric)
        self.beta = torch.ones(N, self.G, device=dev, requires_grad=clip)

    def params(self) -> list[torch.Tensor]:
        """(rounding offsets, clip factors) that are trained."""
        return [p for p in (self.V, self.alpha, self.beta) if p.requires_grad]

    def clamp_(self) -> None:
        with torch.no_grad():
            self.V.clamp_(*V_RANGE)
            self.alpha.clamp_(*CLIP_RANGE)
            self.beta.clamp_(*CLIP_RANGE)

    def state(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach().clone() for p in (self.V, self.alpha, self.beta))

    def load_(self, state) -> None:
        with torch.no_grad():
            for p, s in zip((self.V, self.alpha, self.beta), state):
                p.copy_(s)

    # ---- the quantizer: differentiable (fake) and exact (integers) share the formulas
    def _scale_zp(self, exact: bool):
        qmin, qmax = qrange(self.bits)
        if exact:
            with torch.no_grad():
                if self.symmetric:
                    s = scale_from_absmax(torch.maximum(-self.lo, self.hi) * self.beta, self.bits, self.scale_dtype)
                    return s, torch.zeros_like(s, dtype=torch.int8)
                return scale_zp_from_minmax(self.lo * self.alpha, self.hi * self.beta, self.bits, self.scale_dtype)
        if self.symmetric:
            s = torch.maximum(-self.lo, self.hi) * self.beta / qmax
            zp = torch.zeros_like(s)
        else:
            lo, hi = self.lo * self.alpha, self.hi * self.beta
            s = (hi - lo) / float((1 << self.bits) - 1)
        s = torch.where(s == 0, torch.ones_like(s), s)
        s = s + (storable_scale(s.detach(), self.scale_dtype) - s.detach())  # float16 scales: STE
        if not self.symmetric:
            zp = (qmin - _round_ste(lo / s)).clamp(qmin, qmax)
        return s, zp

    def fake(self) -> torch.Tensor:
        """The fake-quantized weight ``[N, K]`` (differentiable in V, alpha, beta)."""
        qmin, qmax = qrange(self.bits)
        s, zp = self._scale_zp(exact=False)
        s3, zp3 = s.unsqueeze(-1), zp.unsqueeze(-1)
        q = (_round_ste(self.Wg / s3 + self.V) + zp3).clamp(qmin, qmax)
        return (s3 * (q - zp3)).reshape(self.shape)

    @torch.no_grad()
    def integers(self):
        """``(q int8 [N, K], scale float32 [N, G], zero_point int8 [N, G])`` of the current parameters."""
        qmin, qmax = qrange(self.bits)
        s, zp = self._scale_zp(exact=True)
        v = torch.round(self.Wg / s.unsqueeze(-1) + self.V) + zp.unsqueeze(-1).float()
        q = v.clamp(qmin, qmax).to(torch.int8).reshape(self.shape)
        return q, s, zp
