"""int8 GEMM, fused dynamic linear and weight-only linear against the reference,
for every CPU instruction-set path (scalar, AVX2, AVX-512 VNNI)."""

import zlib

import pytest
import torch

from conftest import R, assert_close_to_reference, lq, noncontig, rand_int8

MS = [1, 3, 17, 128]
KS = [3, 17, 100, 130]  # not multiples of 4, 16 or 64
NS = [1, 5, 33]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gen(*key):
    # crc32, not hash(): str hashing is salted per process, which made inputs differ run to run
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K", KS)
def test_int8_gemm_exact(cpu_isa, M, K):
    g = _gen(M, K)
    for N in NS:
        a, b = rand_int8(M, K, gen=g), rand_int8(N, K, gen=g)
        assert torch.equal(lq.ops.int8_gemm(a, b), R.int8_gemm(a, b))


def test_int8_gemm_extremes_and_large_k(cpu_isa):
    # all -128 / 127: the largest |acc| the u8 offset trick must still get exactly
    K = 4099
    for av, bv in ((-128, -128), (-128, 127), (127, -128), (127, 127)):
        a = torch.full((2, K), av, dtype=torch.int8)
        b = torch.full((3, K), bv, dtype=torch.int8)
        assert torch.equal(lq.ops.int8_gemm(a, b), R.int8_gemm(a, b))


def test_int8_gemm_noncontiguous(cpu_isa):
    g = _gen("nc")
    a, b = rand_int8(17, 64, gen=g), rand_int8(9, 64, gen=g)
    assert torch.equal(lq.ops.int8_gemm(noncontig(a), b.t().contiguous().t()), R.int8_gemm(a, b))


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_scaled_int8_gemm_exact(cpu_isa, M, out_dtype):
    g = _gen(M, str(out_dtype))
    for K, N in ((17, 5), (100, 33), (130, 1)):
        a, b = rand_int8(M, K, gen=g), rand_int8(N, K, gen=g)
        a_s = torch.rand(M, generator=g) + 0.01
        b_s = torch.rand(N, generator=g) + 0.01
        a_z = rand_int8(M, gen=g)
        bias = torch.randn(N, generator=g).to(out_dtype)
        for zero, bsum, bb, per_tensor in ((None, None, None, False), (a_z, None, bias, False),
                                           (a_z[:1], lq.ops.weight_row_sums(b), bias, True)):
            sc = a_s[:1] if per_tensor else a_s
            out = lq.ops.scaled_int8_gemm(a, sc, b, b_s, a_zero=zero, b_sum=bsum, bias=bb, out_dtype=out_dtype)
            ref = R.scaled_int8_gemm(a, sc, zero, b, b_s, bsum, bb, out_dtype)
            assert out.dtype == out_dtype
            assert torch.equal(out, ref), f"K={K} N={N} zero={zero is not None}"


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("act_symmetric", [True, False])
def test_dynamic_quant_linear_exact(cpu_isa, M, dtype, act_symmetric):
    g = _gen(M, str(dtype), act_symmetric)
    for K, N in ((17, 5), (100, 33), (130, 7)):
        x = (torch.randn(M, K, generator=g) * 3 + 0.5).to(dtype)
        w = rand_int8(N, K, lo=-127, gen=g)
        w_s = torch.rand(N, generator=g) / 100
        bias = torch.randn(N, generator=g).to(dtype)
        w_sum = lq.ops.weight_row_sums(w)
        out = lq.ops.dynamic_quant_linear(x, w, w_s, w_sum, bias, act_symmetric)
        ref = R.dynamic_quant_linear(x, w, w_s, w_sum, bias, act_symmetric)
        assert torch.equal(out, ref)


def test_dynamic_quant_linear_batched_noncontiguous(cpu_isa):
    g = _gen("batched")
    x = torch.randn(2, 3, 40, generator=g)
    w = rand_int8(6, 40, lo=-127, gen=g)
    w_s, w_sum = torch.rand(6, generator=g) / 50, lq.ops.weight_row_sums(w)
    out = lq.ops.dynamic_quant_linear(noncontig(x), w, w_s, w_sum)
    assert out.shape == (2, 3, 6)
    assert torch.equal(out, R.dynamic_quant_linear(x, w, w_s, w_sum, None, True))


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_weight_only_linear(cpu_isa, M, bits, dtype):
    g = _gen(M, bits, str(dtype))
    for K, N, gs, sym in ((17, 5, -1, True), (100, 33, 20, False), (130, 9, 10, True), (64, 3, 16, False)):
        w = torch.randn(N, K, generator=g)
        qw, s, z = lq.ops.quantize(w, bits, sym, gs)
        zp = None if sym else z
        x = torch.randn(M, K, generator=g).to(dtype)
        bias = torch.randn(N, generator=g)
        out = lq.ops.weight_only_linear(x, qw, s, zp, bits, gs, bias)
        ref = R.weight_only_linear(x, qw, s, zp, bits, gs, bias)
        wd = R.dequantize(qw, s, z, bits, gs, K, torch.float64)
        ref64 = (x.double() @ wd.T + bias.double()).to(dtype).double() if dtype != torch.float32 \
            else x.double() @ wd.T + bias.double()
        assert_close_to_reference(out, ref, ref64)


def test_weight_only_linear_batched_noncontiguous(cpu_isa):
    g = _gen("wo-batched")
    w = torch.randn(7, 48, generator=g)
    qw, s, z = lq.ops.quantize(w, 4, False, 16)
    x = torch.randn(2, 3, 48, generator=g)
    out = lq.ops.weight_only_linear(noncontig(x), qw, s, z, 4, 16)
    ref = R.weight_only_linear(x, qw, s, z, 4, 16, None)
    assert out.shape == (2, 3, 7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_weight_only_linear_large_m_uses_blas_path(bits):
    # above the direct-kernel threshold (512 / 256 tokens) blocks are dequantized for BLAS
    g = _gen("large-m", bits)
    w = torch.randn(300, 64, generator=g)
    qw, s, z = lq.ops.quantize(w, bits, False, 16)
    x = torch.randn(600, 64, generator=g)
    bias = torch.randn(300, generator=g)
    out = lq.ops.weight_only_linear(x, qw, s, z, bits, 16, bias)
    ref = R.weight_only_linear(x, qw, s, z, bits, 16, bias)
    ref64 = x.double() @ R.dequantize(qw, s, z, bits, 16, 64, torch.float64).T + bias.double()
    assert_close_to_reference(out, ref, ref64)


# ---- b_sum: a cache of sum_k b[n, k], never a free parameter (issue #14) ----
@pytest.mark.parametrize("with_zero", [False, True])
def test_b_sum_is_only_a_cache_of_the_row_sums(cpu_isa, with_zero):
    g = _gen("bsum", with_zero)
    M, K, N = 5, 37, 9
    a, b = rand_int8(M, K, gen=g), rand_int8(N, K, gen=g)
    a_s, b_s = torch.rand(M, generator=g) + 0.01, torch.rand(N, generator=g) + 0.01
    zero = rand_int8(M, gen=g) if with_zero else None
    plain = lq.ops.scaled_int8_gemm(a, a_s, b, b_s, a_zero=zero)
    cached = lq.ops.scaled_int8_gemm(a, a_s, b, b_s, a_zero=zero, b_sum=lq.ops.weight_row_sums(b))
    ref = R.scaled_int8_gemm(a, a_s, zero, b, b_s, lq.ops.weight_row_sums(b), None, torch.float32)
    assert torch.equal(plain, cached) and torch.equal(cached, ref)
    assert torch.equal(ref, R.scaled_int8_gemm(a, a_s, zero, b, b_s, None, None, torch.float32))
    # a b_sum that is not the row sums is a caller bug the oracle names
    wrong = lq.ops.weight_row_sums(b)
    wrong[3] += 1
    with pytest.raises(ValueError, match=r"expected b_sum\[n\] = sum_k b\[n, k\] \(ops.weight_row_sums\(b\)\), "
                                         r"got b_sum\[3\] = -?\d+ for a row summing to -?\d+"):
        R.scaled_int8_gemm(a, a_s, zero, b, b_s, wrong, None, torch.float32)


@pytest.mark.parametrize("act_symmetric", [True, False])
def test_w_sum_must_be_the_row_sums(act_symmetric):
    g = _gen("wsum", act_symmetric)
    x, w = torch.randn(3, 20, generator=g), rand_int8(4, 20, lo=-127, gen=g)
    w_s, w_sum = torch.rand(4, generator=g) / 50, lq.ops.weight_row_sums(w)
    assert torch.equal(lq.ops.dynamic_quant_linear(x, w, w_s, w_sum, None, act_symmetric),
                       R.dynamic_quant_linear(x, w, w_s, w_sum, None, act_symmetric))
    with pytest.raises(ValueError, match=r"expected w_sum\[n\] = sum_k w\[n, k\]"):
        R.dynamic_quant_linear(x, w, w_s, w_sum + 1, None, act_symmetric)
