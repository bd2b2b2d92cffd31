"""Unsigned ``b``-bit codes packed into int32 words, LSB first — the layout
GPTQ (qweight, qzeros), compressed-tensors (``pack_to_int32``) and AWQ share
for ``b`` in {2, 4, 8}: ``32 // b`` codes per word, code ``i`` of a run at
bits ``[b * (i % per), b * (i % per) + b)`` of word ``i // per``. (For these
widths compressed-tensors' "dense" packing of 32 codes into ``b`` words is
the same thing: no code straddles a word.) 3-bit codes do straddle words and
are laid out differently by each format, so they are not packed here.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (2, 4, 8)


def _check(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"int32 packing: expected bits in {PACKABLE_BITS}, got {bits}")
    return 32 // bits


def pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned codes (any int dtype, values in ``[0, 2^bits)``) of a 2-D
    tensor -> int32, packed along ``dim`` (zero-padded to whole words)."""
    per = _check(bits)
    c = codes.to(torch.int64)
    if dim == 0:
        c = c.t()
    rows, n = c.shape
    words = -(-n // per)
    c = torch.nn.functional.pad(c, (0, words * per - n)).reshape(rows, words, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    w = (c << shifts).sum(-1)  # < 2^32: the codes occupy disjoint bits
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return (w.t() if dim == 0 else w).contiguous()


def unpack(words: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 -> int64 codes in ``[0, 2^bits)``, ``n``
    of them along ``dim``."""
    per = _check(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        w = w.t()
    shifts = torch.arange(per, dtype=torch.int64) * bits
    c = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)[:, :n]
    return (c.t() if dim == 0 else c).contiguous()


def packed_len(n: int, bits: int) -> int:
    return -(-n // _check(bits))
