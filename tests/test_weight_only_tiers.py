"""The SIMD tiers of the CPU weight-only GEMM (gemm_wo_avx2.cpp, and
gemm_wo_avx512.cpp where the CPU has it) against the PyTorch reference.

Shapes are chosen to hit every schedule edge of the AVX2 file: M = 1 (1x4
tiles, scale folded per group), 2..13 (MRx4 / 6x2 tiles with remainders),
>= 14 (dequantized 48 x 256 panels with 16- and 8-row x blocks), N off every
tile width, K off the 8 / 16-value chunk grid, group sizes that straddle
chunks (odd ones included) and several K blocks."""

from __future__ import annotations

import pytest
import torch

from conftest import ISA_CHAINS, R, assert_close_to_reference, lq, noncontig

# The x86 tiers with weight-only kernels of their own (avx512_amx runs the
# AVX-512 ones) that this CPU can run.
_X86 = ISA_CHAINS[0]
_BEST = lq.build_info()["cpu_isa_detected"]
TIERS = [t for t in ("avx2", "avx512_vnni") if _BEST in _X86 and _X86.index(t) <= _X86.index(_BEST)]
pytestmark = pytest.mark.skipif(not TIERS, reason="this CPU has no AVX2 (only the scalar path)")

MS = [1, 2, 3, 5, 16, 33, 300]
# (N, K, group_size): -1 = per row; 32 / 64 / 128 on and off the panel K block;
# 7, 10, 20, 24, 40 off the chunk grid (7: odd); K = 999 odd with an odd group.
SHAPES = [
    (13, 64, 32),
    (50, 256, 64),
    (7, 384, 128),
    (29, 1000, 40),
    (5, 105, 7),
    (17, 130, 10),
    (11, 100, 20),
    (9, 96, 24),
    (6, 999, 333),
    (3, 17, -1),
]


@pytest.fixture(params=TIERS)
def tier(request, monkeypatch):
    monkeypatch.setenv("LLMEQ_CPU_ISA", request.param)
    assert lq.build_info()["cpu_isa_active"] == request.param
    return request.param


def _case(N, K, gs, bits, sym, M, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    qw, s, z = lq.ops.quantize(w, bits, sym, gs)
    x = torch.randn(M, K, generator=g)
    bias = torch.randn(N, generator=g)
    return qw, s, z, x, bias


def _check(x, qw, s, z, zp, bits, gs, bias):
    K = x.shape[-1]
    out = lq.ops.weight_only_linear(x, qw, s, zp, bits, gs, bias)
    ref = R.weight_only_linear(x, qw, s, zp, bits, gs, bias)
    wd = R.dequantize(qw, s, z if zp is not None else torch.zeros_like(z), bits, gs, K, torch.float64)
    ref64 = x.double().reshape(-1, K) @ wd.T
    if bias is not None:
        ref64 = ref64 + bias.double()
    assert_close_to_reference(out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1]), ref64)


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_tier_matches_reference(tier, M, bits):
    for i, (N, K, gs) in enumerate(SHAPES):
        if M == 300 and K > 384:
            continue  # keep the file quick; M = 300 runs on the smaller shapes
        for sym, use_bias in ((True, True), (False, False), (False, True)):
            qw, s, z, x, bias = _case(N, K, gs, bits, sym, M, seed=1000 * bits + 37 * M + i)
            _check(x, qw, s, z, None if sym else z, bits, gs, bias if use_bias else None)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("M", [1, 5, 16, 33])
def test_tier_noncontiguous_batched_input(tier, bits, M):
    N, K, gs = 19, 192, 64
    qw, s, z, x, bias = _case(N, K, gs, bits, False, 2 * M, seed=7 * bits + M)
    x3 = noncontig(x.reshape(2, M, K))
    _check(x3, qw, s, z, z, bits, gs, bias)


@pytest.mark.parametrize("bits", [8, 4])
def test_tier_several_k_blocks_and_panels(tier, bits):
    # K = 1536 spans 6 panel K blocks of 256; N = 100 spans 3 panels of 48 rows
    # (the last one partial); M = 20 = a 16-row and an 8-row x block.
    for M in (1, 4, 13, 20, 64):
        qw, s, z, x, bias = _case(100, 1536, 64, bits, False, M, seed=M + bits)
        _check(x, qw, s, z, z, bits, 64, bias)


def test_tier_agrees_with_scalar_path(monkeypatch):
    # same inputs through the scalar path and every SIMD tier: each tier's
    # error against fp64 within the conftest bound of the scalar path's error
    qw, s, z, x, bias = _case(37, 520, 40, 4, False, 9, seed=3)
    ref64 = x.double() @ R.dequantize(qw, s, z, 4, 40, 520, torch.float64).T + bias.double()
    monkeypatch.setenv("LLMEQ_CPU_ISA", "scalar")
    base = lq.ops.weight_only_linear(x, qw, s, z, 4, 40, bias)
    for t in TIERS:
        monkeypatch.setenv("LLMEQ_CPU_ISA", t)
        out = lq.ops.weight_only_linear(x, qw, s, z, 4, 40, bias)
        assert_close_to_reference(out, base, ref64)

