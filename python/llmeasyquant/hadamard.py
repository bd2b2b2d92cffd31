"""Orthonormal Hadamard transforms of the widths LLMs have.

A Hadamard matrix of order ``n`` has entries +-1 and ``H H^T = n I``;
``Q = H / sqrt(n)`` is orthogonal, and ``x @ Q^T`` spreads every outlier
channel of ``x`` over all ``n`` channels (incoherence processing: QuaRot,
SpinQuant). Rotating a layer's input by ``Q`` and its weight by the same
``Q`` leaves ``x W^T`` unchanged while both quantize with smaller error.

Widths are rarely powers of two (576 = 36 x 16, 1536 = 12 x 128, 14336 =
28 x 512), so an order ``n`` is built as the Kronecker product
``kron(H_m, S_p)`` of a small Paley matrix ``H_m`` (``m`` = 1, 2 or a
multiple of 4 from a prime) and the Sylvester matrix ``S_p`` of ``p = n / m =
2**k``:

* Paley I, prime ``q = 3 (mod 4)``: order ``q + 1`` (12, 20, 24, 32, 44, ...);
* Paley II, prime ``q = 1 (mod 4)``: order ``2 (q + 1)`` (12, 28, 36, 60, ...).

The transform the op computes (``hadamard_transform``), for ``x`` of last
dim ``n`` and index ``j = a p + b`` (``a < m``, ``b < p``)::

    y[..., a p + b] = scale * sum_{a', b'} H_m[a, a'] S_p[b, b'] x[..., a' p + b']

i.e. ``y = scale * x @ kron(H_m, S_p)^T`` with ``scale = 1 / sqrt(n)``:
a fast Walsh-Hadamard transform (``log2 p`` butterfly stages) on each of the
``m`` blocks, then the ``m x m`` matrix across blocks. ``S_p`` is symmetric,
``H_m`` need not be.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``J[i, j] = chi(j - i)``, chi the quadratic character of GF(q), q prime."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if d in squares else -1 for d in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    # J is antisymmetric for q = 3 (mod 4): S = [[0, 1^T], [-1, J]] is skew and
    # S S^T = q I, so H = I + S has H H^T = (q + 1) I
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + S


def _paley2(q: int) -> torch.Tensor:
    # J is symmetric for q = 1 (mod 4): C = [[0, 1^T], [1, J]] is a symmetric
    # conference matrix (C C^T = q I, zero diagonal); replacing each 0 by
    # [[1, -1], [-1, -1]] and each +-1 by +-[[1, 1], [1, -1]] gives an order
    # 2 (q + 1) Hadamard matrix
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.float64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = _jacobsthal(q)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, one) + torch.kron(torch.eye(n, dtype=torch.float64), zero)


@functools.lru_cache(maxsize=None)
def _small_order(m: int) -> Optional[torch.Tensor]:
    """A Hadamard matrix of order ``m`` (1, 2 or a multiple of 4) by Paley, or None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def factor(n: int) -> Optional[tuple[int, int]]:
    """``(m, p)`` with ``n = m * p``, ``p`` a power of two and ``H_m`` constructible,
    ``m`` as small as possible (more of the transform is butterflies); None
    when no such split exists (e.g. 11008 = 172 x 64: order 172 needs a table)."""
    if n < 1:
        return None
    p = 1 << ((n & -n).bit_length() - 1)  # largest power of two dividing n
    while p >= 1:
        m = n // p
        if _small_order(m) is not None:
            return m, p
        p //= 2
    return None


def supported(n: int) -> bool:
    return factor(n) is not None


def _require(n: int) -> tuple[int, int]:
    f = factor(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n} is built here: expected n = m * 2**k with m = 1, 2, "
                         f"q + 1 (prime q = 3 mod 4) or 2 (q + 1) (prime q = 1 mod 4), got {n}")
    return f


def small_matrix(n: int, dtype=torch.float32, device=None) -> Optional[torch.Tensor]:
    """The ``m x m`` +-1 factor of order ``n`` (None when ``m = 1``): what the op takes."""
    m, _ = _require(n)
    return None if m == 1 else _small_order(m).to(dtype=dtype, device=device)


def sylvester(p: int) -> torch.Tensor:
    """The Sylvester (natural-order Walsh) matrix of order ``p = 2**k``."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"sylvester: expected a power of two, got {p}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < p:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal ``Q = kron(H_m, S_p) / sqrt(n)`` (dense; for folding into weights)."""
    m, p = _require(n)
    Q = torch.kron(_small_order(m), sylvester(p)) / math.sqrt(n)
    return Q.to(dtype=dtype, device=device)


def random_signs(n: int, seed: int, device=None) -> torch.Tensor:
    """+-1 of length ``n`` from ``seed`` (randomised Hadamard: ``Q diag(s)``)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(dtype=torch.float64, device=device)


def transform(x: torch.Tensor, had_m: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """``scale * x @ kron(had_m, S_p)^T`` along the last dim, in PyTorch (fast
    Walsh-Hadamard butterflies on the power-of-two factor). The CPU / CUDA
    kernels compute the same (``ops.hadamard_transform``); this is their
    fallback on other devices. Accumulates in float32 (float64 for a float64
    ``x``: the offline rotations of weights), returns ``x.dtype``."""
    n = x.shape[-1]
    m = 1 if had_m is None else had_m.shape[0]
    if n % m or (n // m) & (n // m - 1):
        raise ValueError(f"hadamard transform: last dim {n} is not {m} x a power of two")
    p = n // m
    scale = 1.0 / math.sqrt(n) if scale is None else scale
    shape = x.shape
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.reshape(-1, m, p).to(work)
    h = 1
    while h < p:
        # one butterfly stage: pairs (i, i + h) inside blocks of 2h
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    y = y.reshape(-1, m, p)
    if had_m is not None:
        y = torch.einsum("ab,rbp->rap", had_m.to(device=y.device, dtype=work), y)
    return (y * scale).reshape(shape).to(x.dtype)


def rotate(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x @ Q^T`` (``inverse``: ``x @ Q``) along the last dim, ``Q = matrix(n)``,
    without forming ``Q``: ``Q^T = kron(H_m^T, S_p) / sqrt(n)`` (``S_p`` is
    symmetric), so both are :func:`transform` with ``H_m`` or its transpose.
    For folding rotations into weights, where the dense product would cost
    ``n`` times more (and ``n^2`` memory) on wide models."""
    m = small_matrix(x.shape[-1], torch.float64, x.device)
    return transform(x, None if m is None else (m.T if inverse else m))
