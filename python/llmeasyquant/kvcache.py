"""Quantized KV cache ("SimQuant", after KVQuant and KIVI): pure-PyTorch quantizers
for keys and values, a transformers ``Cache`` that holds the KV in that form, and
an honest memory report.

Quantizers (conventions of ``quant_format``: ``x = scale * (q - zero_point)``, signed
``q`` in ``[-2**(b-1), 2**(b-1) - 1]``, round-half-even, true division, float32
scales, int8 zero-points, asymmetric ranges widened to contain 0; any ``bits`` in
2..8):

* **keys per channel** (KVQuant / KIVI): one scale and zero-point per (batch, head,
  channel), over the tokens of a chunk. Key outliers live in a few channels, so a
  per-channel range isolates them instead of letting them set every token's scale.
* **values per token**: one scale and zero-point per (batch, head, token), over
  ``head_dim`` (or over groups of ``v_group_size`` channels).
* optional **dense-and-sparse outliers**: in every (batch, head) slice of a chunk
  the ``round(outlier_fraction * tokens * head_dim)`` largest-magnitude values are
  kept exactly (original dtype, with an int32 index each); the scales of the dense
  part are computed without them.

Storage is packed for real: 8-bit values as int8; 4-bit two per byte
(``quant_format.pack_int4``, two's-complement nibbles); 2, 3, 5, 6 and 7 bits as an
LSB-first bit stream of the offset-binary code ``q - qmin`` (``ceil(L / 8) * bits``
bytes for a row of ``L`` values). Keys are packed along tokens, values along
``head_dim``.

Pre-RoPE keys (KVQuant, ``pre_rope=True``, where ``models/archs.py`` declares one
rotate-half RoPE): the cache receives keys after RoPE; it un-rotates them with the
model's own cos/sin for their positions (the token index in the cache), quantizes
per channel, and rotates the dequantized keys back. Rotation is orthogonal, so this
is exact up to float rounding whatever the true positions are; per-channel ranges
are simply taken where channels are stable rather than spinning with position.

What attention sees (``SimQuantLayer.update``): per layer, the tokens seen so far
split into, oldest first,

0. the first ``sink_tokens`` tokens (attention sinks; default 0), kept in float;
1. *committed chunks* of ``chunk_size`` tokens, stored quantized: attention gets
   their dequantized values;
2. a *pending* partial chunk (fewer than ``chunk_size`` tokens older than the
   residual window), stored in float until the chunk fills, and given to attention
   quantized-dequantized as a chunk of its current length (keys per channel over
   those tokens). When more tokens arrive it is re-quantized with them; once it
   holds ``chunk_size`` tokens it is committed;
3. the *residual window*: the most recent ``residual_length`` tokens, stored and
   seen in full precision.

So with ``residual_length=0`` (and ``sink_tokens=0``) every token, including the
current forward's own tokens, reaches attention quantized-dequantized: a single prefill over a window is
the KVQuant-style perplexity measurement of a quantized cache. (Per-channel key
statistics of a chunk include all of its tokens, so within a prefill a query sees
keys quantized with a range that also covers later tokens of its chunk; the
causal mask still hides those tokens themselves.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from transformers.cache_utils import Cache

from . import hadamard
from . import ops
from . import quant_format as qf

try:  # transformers >= 5: base of the layers that store KV in a quantized form
    from transformers.cache_utils import BaseQuantizedLayer as _LayerBase
except ImportError:  # pragma: no cover - older transformers
    from transformers.cache_utils import DynamicLayer as _LayerBase

MIN_BITS, MAX_BITS = 2, 8

__all__ = [
    "QTensor", "RopeTable", "SimQuantCache", "SimQuantLayer", "check_bits", "check_kv_config", "dequantize",
    "kv_memory_bytes", "pack_bits", "packed_len", "quantize_keys", "quantize_rows", "quantize_values", "rope_apply",
    "rope_invert", "unpack_bits",
]


def check_bits(bits, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


# --------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------
def packed_len(n: int, bits: int) -> int:
    """Bytes one row of ``n`` ``bits``-bit values takes once packed."""
    return qf.packed_len(n, check_bits(bits))


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`llmeasyquant.quant_format.pack_bits` (the one packed layout of the project)."""
    return qf.pack_bits(q, check_bits(bits))


def unpack_bits(packed: torch.Tensor, bits: int, L: int) -> torch.Tensor:
    return qf.unpack_bits(packed, check_bits(bits), L)


# --------------------------------------------------------------------------
# quantizers
# --------------------------------------------------------------------------
@dataclass
class QTensor:
    """A tensor quantized row-wise: ``shape`` [..., rows, L], groups along L.

    ``data``: packed ints [..., rows, packed_len(L)]. ``scale`` (float32) and
    ``zero_point`` (int8, None when symmetric): [..., rows, L // group]. Outliers
    (optional): ``outlier_idx`` int32 [..., n], flat indices into the rows*L values
    of each [rows, L] slice, and their exact values ``outlier_val`` [..., n].
    ``transposed``: the quantized layout is the input's last two dims swapped
    (keys); ``dequantize`` swaps them back.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    bits: int
    length: int
    group_size: int
    outlier_idx: Optional[torch.Tensor] = None
    outlier_val: Optional[torch.Tensor] = None
    transposed: bool = False

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = unpack_bits(self.data, self.bits, self.length).float()
        g = self.length if self.group_size == -1 else self.group_size
        qg = q.reshape(*q.shape[:-1], self.length // g, g)
        s = self.scale.unsqueeze(-1)
        x = s * qg if self.zero_point is None else s * (qg - self.zero_point.float().unsqueeze(-1))
        x = x.reshape(q.shape)
        if self.outlier_idx is not None:
            flat = x.flatten(-2)
            flat.scatter_(-1, self.outlier_idx.long(), self.outlier_val.float())
            x = flat.view(q.shape)
        if self.transposed:
            x = x.transpose(-1, -2)
        return x.to(dtype)

    def tensors(self) -> dict[str, Optional[torch.Tensor]]:
        return {"data": self.data, "scale": self.scale, "zero_point": self.zero_point,
                "outlier_idx": self.outlier_idx, "outlier_val": self.outlier_val}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "QTensor":
        """Apply ``fn`` to every stored tensor (all have the batch dim first)."""
        return replace(self, **{k: (None if t is None else fn(t)) for k, t in self.tensors().items()})

    def nbytes(self) -> dict[str, int]:
        def b(t):
            return 0 if t is None else t.numel() * t.element_size()
        return {"quantized": b(self.data), "scales": b(self.scale), "zero_points": b(self.zero_point),
                "outliers": b(self.outlier_idx) + b(self.outlier_val)}


def quantize_rows(x: torch.Tensor, bits: int, symmetric: bool = False, group_size: int = -1,
                  outlier_fraction: float = 0.0) -> QTensor:
    """Quantize x [..., rows, L] with one scale per row (``group_size=-1``) or per
    group of ``group_size`` along L; outliers chosen per [rows, L] slice."""
    check_bits(bits)
    if x.dim() < 2:
        raise ValueError(f"expected a tensor [..., rows, L], got shape {tuple(x.shape)}")
    if not 0.0 <= outlier_fraction < 1.0:
        raise ValueError(f"outlier_fraction must be in [0, 1), got {outlier_fraction}")
    rows, L = x.shape[-2:]
    g = L if group_size == -1 else group_size
    if g <= 0 or L % g:
        raise ValueError(f"group_size {group_size} must be -1 or a positive divisor of {L}")
    xf = x.float()
    xg = xf.reshape(*xf.shape[:-1], L // g, g)
    n_out = min(int(round(outlier_fraction * rows * L)), rows * L)
    idx = val = mask = None
    if n_out > 0:
        flat = xf.flatten(-2)
        idx = flat.abs().topk(n_out, dim=-1).indices
        val = x.flatten(-2).gather(-1, idx)
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True).view(xg.shape)
        idx = idx.to(torch.int32)
    if symmetric:
        a = xg.abs() if mask is None else xg.abs().masked_fill(mask, 0.0)
        scale = qf.scale_from_absmax(a.amax(-1), bits)
        zp = None
        zq = torch.zeros_like(scale, dtype=torch.int8)
    else:
        if mask is None:
            mn, mx = xg.amin(-1), xg.amax(-1)
        else:  # range of the dense part only; a group made only of outliers gets [0, 0]
            mn = xg.masked_fill(mask, float("inf")).amin(-1)
            mx = xg.masked_fill(mask, float("-inf")).amax(-1)
            empty = mask.all(-1)
            mn = torch.where(empty, torch.zeros_like(mn), mn)
            mx = torch.where(empty, torch.zeros_like(mx), mx)
        scale, zp = qf.scale_zp_from_minmax(mn, mx, bits)
        zq = zp
    dense = xg if mask is None else xg.masked_fill(mask, 0.0)
    q = qf.quantize_values(dense, scale, zq, bits).reshape(xf.shape)
    return QTensor(pack_bits(q, bits), scale, zp, bits, L, group_size, idx, val)


def quantize_keys(k: torch.Tensor, bits: int, symmetric: bool = False, outlier_fraction: float = 0.0) -> QTensor:
    """Keys [..., T, D]: per channel, one scale/zero-point per (..., channel) over the T tokens."""
    qt = quantize_rows(k.transpose(-1, -2), bits, symmetric, -1, outlier_fraction)
    qt.transposed = True
    return qt


def quantize_values(v: torch.Tensor, bits: int, symmetric: bool = False, group_size: int = -1,
                    outlier_fraction: float = 0.0) -> QTensor:
    """Values [..., T, D]: per token, one scale/zero-point per (..., token) over D
    (``group_size`` g > 0: per group of g channels)."""
    return quantize_rows(v, bits, symmetric, group_size, outlier_fraction)


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return qt.dequantize(dtype)


# --------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------
_CONFIG_FIELDS = ("k_bits", "v_bits", "k_symmetric", "v_symmetric", "chunk_size", "v_group_size",
                  "outlier_fraction", "residual_length", "sink_tokens", "pre_rope", "k_hadamard",
                  "v_hadamard")


@dataclass
class KVCacheConfig:
    """How the cache quantizes (the fields of ``SimQuantConfig``, which extends this).

    Keys are quantized per channel over chunks of ``chunk_size`` tokens (before
    RoPE when ``pre_rope`` and the model has an invertible rotary embedding),
    values per token over head_dim (or groups of ``v_group_size`` channels), both
    asymmetric unless ``*_symmetric``; ``outlier_fraction`` of each (batch, head)
    chunk slice, the largest magnitudes, is kept exactly (dense-and-sparse). The
    most recent ``residual_length`` tokens and the first ``sink_tokens`` stay in
    full precision. ``residual_length=0`` (and ``sink_tokens=0``): attention sees
    every K/V quantized, the setting for perplexity measurements.
    ``v_hadamard`` / ``k_hadamard``: each head's values / keys (before RoPE where
    they are quantized so) are rotated by the orthonormal head_dim Hadamard
    before quantizing and rotated back after (QuaRot's online K/V rotation,
    inside the cache: attention sees the original basis, the error is that of
    the rotated coordinates). Values gain (per-token quantization, outlier
    channels spread); keys lose on the default model (per-channel quantization
    already isolates their outlier channels, the rotation mixes them back):
    docs/results.md.
    """

    k_bits: int = 4
    v_bits: int = 4
    k_symmetric: bool = False
    v_symmetric: bool = False
    chunk_size: int = 64
    v_group_size: int = -1
    outlier_fraction: float = 0.0
    residual_length: int = 32
    sink_tokens: int = 0
    pre_rope: bool = True
    k_hadamard: bool = False
    v_hadamard: bool = False


def default_kv_config() -> KVCacheConfig:
    return KVCacheConfig()


def check_kv_config(cfg) -> None:
    """Validate a SimQuant config (any object with the fields below)."""
    missing = [f for f in _CONFIG_FIELDS if not hasattr(cfg, f)]
    if missing:
        raise TypeError(f"KV-cache config {type(cfg).__name__} lacks {missing}")
    check_bits(cfg.k_bits, "k_bits")
    check_bits(cfg.v_bits, "v_bits")
    if isinstance(cfg.chunk_size, bool) or not isinstance(cfg.chunk_size, int) or cfg.chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {cfg.chunk_size!r}")
    if isinstance(cfg.residual_length, bool) or not isinstance(cfg.residual_length, int) or cfg.residual_length < 0:
        raise ValueError(f"residual_length must be an integer >= 0, got {cfg.residual_length!r}")
    if not (cfg.v_group_size == -1 or (isinstance(cfg.v_group_size, int) and cfg.v_group_size > 0)):
        raise ValueError(f"v_group_size must be -1 (per token) or a positive divisor of head_dim, got {cfg.v_group_size!r}")
    if not 0.0 <= float(cfg.outlier_fraction) < 1.0:
        raise ValueError(f"outlier_fraction must be in [0, 1), got {cfg.outlier_fraction!r}")
    if isinstance(cfg.sink_tokens, bool) or not isinstance(cfg.sink_tokens, int) or cfg.sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an integer >= 0, got {cfg.sink_tokens!r}")
    for f in ("k_hadamard", "v_hadamard"):
        if not isinstance(getattr(cfg, f), bool):
            raise ValueError(f"{f} must be true or false, got {getattr(cfg, f)!r}")


# --------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_apply(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotate-half RoPE of llama/mistral/qwen: ``k*cos + rotate_half(k)*sin``."""
    return k * cos + _rotate_half(k) * sin


def rope_invert(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rope_apply`` (also when cos/sin carry an attention scaling a:
    cos^2 + sin^2 = a^2)."""
    return (k * cos - _rotate_half(k) * sin) / (cos * cos + sin * sin)


class RopeTable:
    """float32 cos/sin [positions, head_dim] of a model's rotary embedding module,
    computed once per cache and grown on demand. Positional constants, not KV
    data: ``kv_memory_bytes`` does not count them (a kernel would compute them on
    the fly)."""

    def __init__(self, rotary_emb: torch.nn.Module):
        self.emb = rotary_emb
        self.cos = self.sin = None

    def __call__(self, start: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + n
        if self.cos is None or self.cos.shape[0] < end or self.cos.device != torch.device(device):
            size = max(end, 256, 0 if self.cos is None else 2 * self.cos.shape[0])
            pos = torch.arange(size, device=device).unsqueeze(0)
            with torch.no_grad():
                cos, sin = self.emb(torch.zeros((), dtype=torch.float32, device=device), pos)
            self.cos, self.sin = cos[0].float(), sin[0].float()
        return self.cos[start:end], self.sin[start:end]


@dataclass
class _Block:
    """``n_tokens`` committed tokens (whole chunks) at positions ``pos0 ...``: keys
    quantized from [B, H, n_chunks, chunk, D] (per channel per chunk), values per token."""

    keys: QTensor
    values: QTensor
    n_tokens: int
    pos0: int

    def map(self, fn) -> "_Block":
        return _Block(self.keys.map(fn), self.values.map(fn), self.n_tokens, self.pos0)


class SimQuantLayer(_LayerBase):
    """One layer of a ``SimQuantCache`` (see the module docstring for what
    attention sees). ``self.keys`` / ``self.values`` hold the float tokens not yet
    committed (pending partial chunk + residual window), [B, H, r, D];
    ``sink_keys`` / ``sink_values`` the first ``sink_tokens`` tokens (float).

    ``rope``: a ``RopeTable``; when given and ``config.pre_rope``, keys are
    quantized *before* RoPE (KVQuant): un-rotated with the cos/sin of their
    positions (token index in the cache), quantized per channel, and rotated back
    after dequantization. Rotation is orthogonal, so this is exact up to float
    rounding whatever the true positions; it only changes the basis the per-channel
    ranges are taken in."""

    is_croppable = False
    is_compileable = False
    is_sliding = False

    def __init__(self, config=None, rope: Optional[RopeTable] = None):
        super().__init__()
        config = default_kv_config() if config is None else config
        check_kv_config(config)
        self.config = config
        self.rope = rope if config.pre_rope else None
        self.cumulative_length = 0
        self.blocks: list[_Block] = []
        self.n_committed = 0
        self._had: dict = {}  # (device, back) -> the op's had_m for head_dim (None: a power of two)

    # BaseQuantizedLayer's abstract hooks
    def _quantize(self, tensor, axis=None):  # pragma: no cover - not used by update
        raise NotImplementedError

    def _dequantize(self, q_tensor):  # pragma: no cover
        raise NotImplementedError

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.sink_keys, self.sink_values = self.keys.clone(), self.values.clone()
        self.is_initialized = True

    def _cos_sin(self, pos0: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for tokens pos0.. laid out as ``shape`` [..., (chunks,) T, D]."""
        n = 1
        for d in shape[2:-1]:
            n *= d
        cos, sin = self.rope(pos0, n, self.device)
        if cos.shape[-1] != shape[-1]:
            raise ValueError(f"rotary dim {cos.shape[-1]} != head_dim {shape[-1]}; use pre_rope=False")
        return cos.reshape(*shape[2:]), sin.reshape(*shape[2:])

    def _rot(self, x: torch.Tensor, on: bool, back: bool = False) -> torch.Tensor:
        """x [..., head_dim] -> x Q^T (``back``: x Q) when ``on``; float32."""
        if not on:
            return x
        key = (x.device, back)
        if key not in self._had:  # built once per layer, not per call: every step dequantizes every block
            m = hadamard.small_matrix(x.shape[-1], device=x.device)
            # Q = kron(H_m, S) / sqrt(D) with S symmetric: x Q = transform with H_m^T
            self._had[key] = None if m is None else (m.T.contiguous() if back else m)
        return ops.hadamard_transform(x.float(), self._had[key])

    def _qk(self, k: torch.Tensor, pos0: int) -> QTensor:
        c = self.config
        if self.rope is not None:
            k = rope_invert(k.float(), *self._cos_sin(pos0, k.shape))
        return quantize_keys(self._rot(k, c.k_hadamard), c.k_bits, c.k_symmetric, float(c.outlier_fraction))

    def _dk(self, qt: QTensor, pos0: int, dtype) -> torch.Tensor:
        exact = self.rope is not None or self.config.k_hadamard
        k = self._rot(qt.dequantize(torch.float32 if exact else dtype), self.config.k_hadamard, back=True)
        if self.rope is not None:
            k = rope_apply(k, *self._cos_sin(pos0, k.shape))
        return k.to(dtype)

    def _qv(self, v: torch.Tensor) -> QTensor:
        c = self.config
        return quantize_values(self._rot(v, c.v_hadamard), c.v_bits, c.v_symmetric, c.v_group_size, float(c.outlier_fraction))

    def _dv(self, qt: QTensor, dtype) -> torch.Tensor:
        if not self.config.v_hadamard:
            return qt.dequantize(dtype)
        return self._rot(qt.dequantize(torch.float32), True, back=True).to(dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new tokens; return (keys, values) of every token so far, as
        attention should see them (quantized-dequantized except the residual window
        and sink tokens)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        S = self.config.sink_tokens
        n_sink = min(S - self.sink_keys.shape[-2], key_states.shape[-2])
        if n_sink > 0:  # attention-sink tokens: kept in full precision, never quantized
            self.sink_keys = torch.cat([self.sink_keys, key_states[..., :n_sink, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[..., :n_sink, :]], dim=-2)
            key_states, value_states = key_states[..., n_sink:, :], value_states[..., n_sink:, :]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        C, Rl = self.config.chunk_size, self.config.residual_length
        B, H, r, D = self.keys.shape
        pos0 = self.sink_keys.shape[-2] + self.n_committed  # position of self.keys[..., 0, :]
        n_full = max(0, r - Rl) // C
        if n_full:
            n = n_full * C
            kc = self.keys[..., :n, :].reshape(B, H, n_full, C, D)
            vc = self.values[..., :n, :].reshape(B, H, n_full, C, D)
            self.blocks.append(_Block(self._qk(kc, pos0), self._qv(vc), n, pos0))
            self.keys = self.keys[..., n:, :].clone()
            self.values = self.values[..., n:, :].clone()
            self.n_committed += n
            pos0 += n
        dtype = key_states.dtype
        ks, vs = ([self.sink_keys], [self.sink_values]) if self.sink_keys.shape[-2] else ([], [])
        ks += [self._dk(blk.keys, blk.pos0, dtype).reshape(B, H, blk.n_tokens, D) for blk in self.blocks]
        vs += [self._dv(blk.values, dtype).reshape(B, H, blk.n_tokens, D) for blk in self.blocks]
        r = self.keys.shape[-2]
        n_pend = max(0, r - Rl)
        if n_pend:  # partial chunk: seen as quantized now, re-quantized when it grows
            ks.append(self._dk(self._qk(self.keys[..., :n_pend, :], pos0), pos0, dtype))
            vs.append(self._dv(self._qv(self.values[..., :n_pend, :]), dtype))
        if r > n_pend:
            ks.append(self.keys[..., n_pend:, :])
            vs.append(self.values[..., n_pend:, :])
        if len(ks) == 1:
            return ks[0], vs[0]
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def _map(self, fn) -> None:
        if not self.is_initialized:
            return
        self.blocks = [b.map(fn) for b in self.blocks]
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: quantized ints, scales and outliers are per batch row, so
        reordering them is exact (no dequantize round trip)."""
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            self._map(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > self.keys.shape[-2]:
            raise ValueError(f"SimQuant cache can only crop its uncommitted float tokens ({self.keys.shape[-2]}), "
                             f"not {n}")
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
        self.cumulative_length -= n

    def reset(self) -> None:
        self.blocks = []
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0
        self.n_committed = 0
        self._quantized_keys = self._quantized_values = None

    def offload(self):  # pragma: no cover - offloading is not supported
        raise NotImplementedError("SimQuantCache does not support offloading")

    def memory_bytes(self) -> dict[str, int]:
        out = {"quantized": 0, "scales": 0, "zero_points": 0, "outliers": 0, "residual": 0,
               "tokens": self.cumulative_length, "float_elements": 0}
        if not self.is_initialized:
            return out
        for blk in self.blocks:
            for qt in (blk.keys, blk.values):
                for k, v in qt.nbytes().items():
                    out[k] += v
        out["residual"] = sum(t.numel() * t.element_size()
                              for t in (self.keys, self.values, self.sink_keys, self.sink_values))
        B, H, _, D = self.keys.shape
        out["float_elements"] = 2 * B * H * self.cumulative_length * D
        out["element_size"] = self.keys.element_size()
        return out


class SimQuantCache(Cache):
    """A transformers ``Cache`` whose layers are ``SimQuantLayer``s.

    ``config``: a SimQuant config (default ``SimQuantConfig()``); ``model_config``:
    the model's config (gives the number of layers; without it layers are added
    as they are first updated); ``rotary_emb``: the model's rotary embedding
    module, for pre-RoPE key quantization (``make_cache`` passes it)."""

    def __init__(self, config=None, model_config=None, num_layers: Optional[int] = None,
                 rotary_emb: Optional[torch.nn.Module] = None):
        config = default_kv_config() if config is None else config
        check_kv_config(config)
        rope = RopeTable(rotary_emb) if rotary_emb is not None and config.pre_rope else None
        if model_config is not None:
            num_layers = model_config.get_text_config(decoder=True).num_hidden_layers
        if num_layers is not None:
            super().__init__(layers=[SimQuantLayer(config, rope) for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=functools.partial(SimQuantLayer, config, rope))
        self.kv_config = config
        self.pre_rope = rope is not None


def kv_memory_bytes(cache: Cache) -> dict:
    """Bytes a SimQuant cache actually holds vs a float cache of the same tokens.

    Counts every stored tensor: packed ints (``quantized``), float32 ``scales``,
    int8 ``zero_points``, ``outliers`` (values + int32 indices) and the float
    ``residual`` (pending partial chunk + residual window, in the model's dtype).
    ``fp16_bytes``: the same K/V at 2 bytes per element; ``float_bytes``: at the
    dtype the keys arrived in (what a ``DynamicCache`` would hold).
    """
    layers = [l for l in cache.layers if isinstance(l, SimQuantLayer)]
    if not layers:
        raise TypeError(f"kv_memory_bytes needs a SimQuantCache, got {type(cache).__name__}")
    tot = {"quantized": 0, "scales": 0, "zero_points": 0, "outliers": 0, "residual": 0}
    float_bytes = fp16_bytes = 0
    for l in layers:
        m = l.memory_bytes()
        for k in tot:
            tot[k] += m[k]
        fp16_bytes += 2 * m["float_elements"]
        float_bytes += m.get("element_size", 2) * m["float_elements"]
    total = sum(tot.values())
    return {
        **{f"{k}_bytes": v for k, v in tot.items()},
        "total_bytes": total,
        "fp16_bytes": fp16_bytes,
        "float_bytes": float_bytes,
        "ratio_vs_fp16": total / fp16_bytes if fp16_bytes else float("nan"),
        "ratio_vs_float": total / float_bytes if float_bytes else float("nan"),
        "tokens": layers[0].cumulative_length,
        "layers": len(layers),
    }
