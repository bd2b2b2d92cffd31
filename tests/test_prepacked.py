"""The CPU's pre-packed int8 weights (llmeasyquant.cpu_pack, cpu_kernels.h
"panel64"): the layout against its index formula, the op
dynamic_quant_linear_packed against dynamic_quant_linear bit for bit on every
tier (the AVX-512 VNNI kernel, and the scalar loop the other tiers run), its
checks, and QLinear deriving, using and re-deriving the copy without ever
saving it. The random-shape fuzz is tests/test_ops_fuzz.py::test_dynamic_quant_linear."""

import pytest
import torch

from conftest import R, lq, noncontig, rand_int8
from llmeasyquant import cpu_pack, quant_format
from llmeasyquant.eval import model_memory

ops = lq.ops


def _weights(N, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = rand_int8(N, K, lo=-127, gen=gen)
    return w, torch.rand(N, generator=gen) / 100 + 1e-4, ops.weight_row_sums(w), torch.randn(N, generator=gen)


@pytest.mark.parametrize("N,K", [(1, 1), (5, 3), (64, 4), (65, 7), (130, 129), (192, 576)])
def test_layout_is_the_index_formula(N, K):
    w = rand_int8(N, K, gen=torch.Generator().manual_seed(N + K))
    wp = cpu_pack.pack_int8_panels(w)
    P, row = cpu_pack.packed_shape(N, K)
    assert wp.shape == (P, row) and P == -(-N // 64) and row == -(-K // 4) * 256
    want = torch.zeros(P, row, dtype=torch.int8)
    for n in range(N):
        for k in range(K):
            want[n // 64, ((k // 4) * 64 + n % 64) * 4 + k % 4] = w[n, k]
    assert torch.equal(wp, want)  # padding included: zero
    assert torch.equal(cpu_pack.unpack_int8_panels(wp, N, K), w)


def test_pack_and_unpack_refuse_what_they_cannot_take():
    with pytest.raises(ValueError, match=r"expected an int8 \[N, K\] weight, got torch.uint8"):
        cpu_pack.pack_int8_panels(torch.zeros(3, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected int8 \[1, 256\] for an \[3, 4\] weight"):
        cpu_pack.unpack_int8_panels(torch.zeros(1, 512, dtype=torch.int8), 3, 4)


# M past one 384-row block takes the (panel, row block) schedule; N = 208 is 13
# column vectors: the two threads' ranges start and end inside panels. On the
# avx512_amx tier, M >= 8 with K % 64 == 0 takes the tile kernel: (17, 33,
# 128) and (400, 208, 64) end inside a 32-row group and a 32-column tile.
@pytest.mark.parametrize("M,N,K", [(1, 5, 3), (1, 208, 576), (2, 192, 1536), (7, 130, 65), (16, 576, 576),
                                   (17, 33, 128), (33, 70, 4097), (385, 33, 100), (400, 208, 64)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_same_numbers_as_the_row_major_op(cpu_isa, M, N, K, symmetric):
    w, s, wsum, bias = _weights(N, K)
    x = torch.randn(M, K) * 3
    want = ops.dynamic_quant_linear(x, w, s, wsum, bias, symmetric)
    got = ops.dynamic_quant_linear_packed(x, cpu_pack.pack_int8_panels(w), s, wsum, K, N, bias, symmetric)
    assert torch.equal(got, want)
    assert torch.equal(got, R.dynamic_quant_linear(x, w, s, wsum, bias, symmetric))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,K", [(5, 96), (9, 128)])  # 18 x 128: the AMX kernel on avx512_amx
def test_dtypes_batch_dims_strided_input_and_no_bias(cpu_isa, dtype, T, K):
    w, s, wsum, bias = _weights(100, K)
    wp = cpu_pack.pack_int8_panels(w)
    x = (torch.randn(2, T, K) * 2).to(dtype)
    for b in (None, bias.to(dtype)):
        want = ops.dynamic_quant_linear(x, w, s, wsum, b, True)
        for xin in (x, noncontig(x)):
            out = ops.dynamic_quant_linear_packed(xin, wp, s, wsum, K, 100, b, True)
            assert out.shape == (2, T, 100) and out.dtype == dtype and torch.equal(out, want)


def test_extremes_and_empty_inputs(cpu_isa):
    K = 65536  # the int32-exact limit: 255 * 128 * K fits
    w = torch.full((3, K), -128, dtype=torch.int8)
    wsum, s = ops.weight_row_sums(w), torch.full((3,), 1e-3)
    for rows in (2, 17):  # 17: the AMX kernel on avx512_amx
        x = torch.ones(rows, K)
        want = ops.dynamic_quant_linear(x, w, s, wsum, None, False)
        assert torch.equal(ops.dynamic_quant_linear_packed(x, cpu_pack.pack_int8_panels(w), s, wsum, K, 3, None,
                                                           False), want)
    w, s, wsum, bias = _weights(9, 20)
    out = ops.dynamic_quant_linear_packed(torch.randn(0, 20), cpu_pack.pack_int8_panels(w), s, wsum, 20, 9, bias, True)
    assert out.shape == (0, 9)


def test_bad_arguments_say_what_was_expected():
    w, s, wsum, bias = _weights(70, 40)
    wp = cpu_pack.pack_int8_panels(w)
    x = torch.randn(3, 40)
    op = ops.dynamic_quant_linear_packed
    # the padded layout cannot tell K = 39 from 40: in_features does
    with pytest.raises(ValueError, match=r"K mismatch: x has K=39 \(shape \[3, 39\]\) but the weight has K=40"):
        op(torch.randn(3, 39), wp, s, wsum, 40, 70, bias, True)
    with pytest.raises(ValueError, match=r"expected w_packed of shape \[2, 2816\].*K=44.*got \[2, 2560\]"):
        op(torch.randn(3, 44), wp, s, wsum, 44, 70, bias, True)  # another K
    with pytest.raises(ValueError, match=r"expected w_scale with 60 elements"):
        op(x, wp, s, wsum, 40, 60, None, True)  # another N
    with pytest.raises(ValueError, match=r"expected w_packed of shape \[1, 2560\]"):
        op(x, wp, s[:60], wsum[:60], 40, 60, None, True)
    with pytest.raises(TypeError, match="expected w_packed of dtype Char, got Byte"):
        op(x, wp.to(torch.uint8), s, wsum, 40, 70, bias, True)
    with pytest.raises(ValueError, match="w_sum"):
        op(x, wp, s, wsum[:5], 40, 70, bias, True)
    with pytest.raises(ValueError, match="exceeds the int32-exact limit"):
        big = torch.zeros(1, cpu_pack.packed_shape(1, 65537)[1], dtype=torch.int8)
        op(torch.randn(1, 65537), big, s[:1], wsum[:1], 65537, 1, None, True)
    # the fake (torch.compile) says the same
    with torch._subclasses.fake_tensor.FakeTensorMode():
        with pytest.raises(ValueError, match=r"expected w_packed of shape \[2, 2560\].*got \[2, 2816\]"):
            op(torch.randn(3, 40), torch.zeros(2, 2816, dtype=torch.int8), torch.ones(70),
               torch.zeros(70, dtype=torch.int32), 40, 70, None, True)
        with pytest.raises(ValueError, match=r"K mismatch: x has K=39"):
            op(torch.randn(3, 39), torch.zeros(2, 2560, dtype=torch.int8), torch.ones(70),
               torch.zeros(70, dtype=torch.int32), 40, 70, None, True)


# ---------------------------------------------------------------- QLinear
def _w8a8(N=150, K=96, seed=0):
    torch.manual_seed(seed)
    return lq.QLinear.from_linear(torch.nn.Linear(K, N), w_bits=8, act="dynamic")


needs_vnni = pytest.mark.skipif(not ops.int8_prepacked_fast(),
                                reason="the pre-packed kernel is the AVX-512 VNNI tier's; this CPU runs another")


def test_qlinear_gives_the_row_major_numbers_whichever_route(monkeypatch):
    q = _w8a8()
    x = torch.randn(4, 7, 96)
    want = ops.dynamic_quant_linear(x, q.qweight, q.w_scale.view(-1), q.w_sum, q.bias, True)
    assert torch.equal(q(x), want)
    monkeypatch.setattr(lq.QLinear, "prepack_cpu_weights", False)
    assert torch.equal(q(x), want)


@needs_vnni
def test_qlinear_derives_the_copy_once_and_never_saves_it(monkeypatch):
    q = _w8a8()
    calls = []
    real = ops.dynamic_quant_linear_packed
    monkeypatch.setattr(ops, "dynamic_quant_linear_packed", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 96)
    q(x)
    first = q.__dict__["_cpu_packed_cache"][1]
    q(x)
    assert len(calls) == 2 and q.__dict__["_cpu_packed_cache"][1] is first  # derived once
    assert "pre-packed" in repr(q)
    assert not any("pack" in k for k in q.state_dict())  # a derived copy, never saved
    assert q.derived_bytes() == first.numel() == 3 * 24 * 256  # counted as held, not as saved
    mem = model_memory(torch.nn.Sequential(q))
    assert mem["derived"] == q.derived_bytes() and mem["total"] == q.memory_bytes()
    # a capped tier takes the row-major op (what the cap is for: testing that tier)
    monkeypatch.setenv("LLMEQ_CPU_ISA", "avx2")
    q(x)
    assert len(calls) == 2


@needs_vnni
def test_qlinear_rederives_after_the_weights_change():
    q = _w8a8()
    x = torch.randn(5, 96)
    q(x)
    with torch.no_grad():
        q.qweight[3:9].neg_()  # in place: the version counter moves
    q._refresh_w_sum()
    want = ops.dynamic_quant_linear(x, q.qweight, q.w_scale.view(-1), q.w_sum, q.bias, True)
    assert torch.equal(q(x), want)
    other = _w8a8(seed=1)
    q.load_state_dict(other.state_dict())
    assert torch.equal(q(x), other(x))
    q.to(torch.float32)  # a module cast drops the derived copy
    assert "_cpu_packed_cache" not in q.__dict__
    assert torch.equal(q(x), other(x))


@needs_vnni
def test_qlinear_under_inference_mode_and_compile():
    q = _w8a8()
    x = torch.randn(2, 96)
    with torch.inference_mode():
        want = q(x)
    assert torch.equal(q(x), want)
    compiled = torch.compile(q, backend="eager", fullgraph=True)  # traced: the row-major op, same numbers
    assert torch.equal(compiled(x), want)


# ---------------------------------------------------------------- W4A8 ("w4panel16")
def _w4(N, K, g, zero_points, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qw, s, z = ops.quantize(torch.randn(N, K, generator=gen), 4, not zero_points, g)
    return qw, s, (z if zero_points else None), torch.randn(N, generator=gen)


@pytest.mark.parametrize("N,K,g", [(1, 8, 8), (5, 64, 32), (17, 24, 8), (33, 100, 20), (16, 99, -1)])
def test_w4a8_layout_is_the_index_formula(N, K, g):
    qw, s, z, _ = _w4(N, K, g, True, seed=N)
    wp, gp = cpu_pack.pack_w4a8(qw, s, z, K)
    q = quant_format.unpack_int4(qw, K)
    G = s.shape[1]
    P = -(-N // 16)
    assert wp.shape == (P, -(-K // 8) * 64) and gp.shape == (P, G, 2, 16)
    want = torch.full(wp.shape, 0x88, dtype=torch.uint8)  # padding: u = 8 (q = 0) in both nibbles
    for n in range(N):
        for k in range(K):
            j = (k // 8) * 64 + (n % 16) * 4 + k % 4
            u = int(q[n, k]) + 8
            b = int(want[n // 16, j])
            want[n // 16, j] = (b & 0xF0) | u if k % 8 < 4 else (b & 0x0F) | (u << 4)
    assert torch.equal(wp, want)
    for n in range(N):
        assert torch.equal(gp[n // 16, :, 0, n % 16], s[n]) and torch.equal(gp[n // 16, :, 1, n % 16], 8.0 + z[n])
    for n in range(N, P * 16):  # padding columns: scale 1, zero-point 0
        assert (gp[n // 16, :, 0, n % 16] == 1).all() and (gp[n // 16, :, 1, n % 16] == 8).all()
    q2, s2, z2 = cpu_pack.unpack_w4a8(wp, gp, N, K)
    assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(z2, z)


# g = 8 is the smallest group the SIMD kernel takes (one 64-byte block); 20 and
# 99 are off its grid (the scalar loop on the layout); M = 300 spans row chunks.
@pytest.mark.parametrize("M,N,K,g", [(1, 5, 64, 32), (1, 50, 512, 128), (2, 192, 576, 64), (7, 33, 1024, 8),
                                     (300, 40, 256, 64), (3, 21, 100, 20), (4, 9, 99, -1), (16, 576, 1536, -1)])
@pytest.mark.parametrize("zero_points", [False, True])
def test_w4a8_same_numbers_as_the_canonical_op(cpu_isa, M, N, K, g, zero_points):
    qw, s, z, bias = _w4(N, K, g, zero_points)
    x = torch.randn(M, K) * 3
    want = ops.w4a8_linear(x, qw, s, z, g, bias)
    wp, gp = cpu_pack.pack_w4a8(qw, s, z, K)
    assert torch.equal(ops.w4a8_linear_packed(x, wp, gp, K, N, g, bias), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_w4a8_dtypes_batch_dims_strided_input_and_extremes(cpu_isa, dtype):
    qw, s, z, bias = _w4(20, 128, 32, True)
    wp, gp = cpu_pack.pack_w4a8(qw, s, z, 128)
    x = (torch.randn(2, 5, 128) * 2).to(dtype)
    for b in (None, bias.to(dtype)):
        want = ops.w4a8_linear(x, qw, s, z, 32, b)
        for xin in (x, noncontig(x)):
            out = ops.w4a8_linear_packed(xin, wp, gp, 128, 20, 32, b)
            assert out.shape == (2, 5, 20) and out.dtype == dtype and torch.equal(out, want)
    # the largest group sums: activations at +-127, weights at -8 / 7 against far zero-points
    K = 8192
    x = torch.where(torch.arange(K) % 2 == 0, 1.0, -1.0).repeat(3, 1)
    q = torch.where(torch.arange(K) % 3 == 0, -8, 7).to(torch.int8).repeat(6, 1)
    qw = quant_format.pack_int4(q)
    s = torch.full((6, 1), 1e-3)
    z = torch.tensor([[7], [-8], [0], [7], [-8], [3]], dtype=torch.int8)
    wp, gp = cpu_pack.pack_w4a8(qw, s, z, K)
    assert torch.equal(ops.w4a8_linear_packed(x, wp, gp, K, 6, -1, None), ops.w4a8_linear(x, qw, s, z, -1, None))


def test_w4a8_bad_arguments_say_what_was_expected():
    qw, s, z, bias = _w4(20, 64, 32, True)
    wp, gp = cpu_pack.pack_w4a8(qw, s, z, 64)
    x = torch.randn(3, 64)
    op = ops.w4a8_linear_packed
    with pytest.raises(ValueError, match=r"K mismatch: x has K=60 \(shape \[3, 60\]\) but the weight has K=64"):
        op(torch.randn(3, 60), wp, gp, 64, 20, -1, bias)  # 60 and 64 pack alike: in_features tells
    with pytest.raises(ValueError, match=r"expected w_packed of shape \[2, 1024\].*K=128.*got \[2, 512\]"):
        op(torch.randn(3, 128), wp, gp, 128, 20, 32, bias)
    with pytest.raises(ValueError, match=r"expected w_packed of shape \[3, 512\].*N=40"):
        op(x, wp, gp, 64, 40, 32, None)
    with pytest.raises(ValueError, match=r"expected gparams of shape \[2, 4, 2, 16\], got \[2, 2, 2, 16\]"):
        op(x, wp, gp, 64, 20, 16, bias)
    with pytest.raises(ValueError, match="group_size=24 does not divide K=64"):
        op(x, wp, gp, 64, 20, 24, bias)
    with pytest.raises(TypeError, match="expected w_packed of dtype Byte, got Char"):
        op(x, wp.view(torch.int8), gp, 64, 20, 32, bias)
    with pytest.raises(ValueError, match="bias"):
        op(x, wp, gp, 64, 20, 32, bias[:5])
    with torch._subclasses.fake_tensor.FakeTensorMode():
        with pytest.raises(ValueError, match=r"expected gparams of shape \[2, 4, 2, 16\]"):
            op(torch.randn(3, 64), torch.zeros(2, 512, dtype=torch.uint8), torch.zeros(2, 2, 2, 16), 64, 20, 16, None)


@needs_vnni
def test_qlinear_w4a8_takes_the_packed_op_and_rederives_it():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 40)
    q = lq.QLinear.from_linear(lin, w_bits=4, w_group_size=32, w_symmetric=False, act="dynamic")
    assert q.w4a8 and "pre-packed" in repr(q)
    x = torch.randn(3, 7, 128)
    want = ops.w4a8_linear(x, q.qweight, q.w_scale, q.w_zero, 32, q.bias)
    assert torch.equal(q(x), want)
    wp, gp = q.__dict__["_cpu_w4a8_cache"][1]
    assert q.derived_bytes() == wp.numel() + 4 * gp.numel()
    assert not any("pack" in k for k in q.state_dict())
    with torch.no_grad():
        q.w_zero[2:5] = 0  # a zero-point edit alone re-derives the group parameters
    want = ops.w4a8_linear(x, q.qweight, q.w_scale, q.w_zero, 32, q.bias)
    assert torch.equal(q(x), want)
    q.prepack_cpu_weights = False  # the canonical op: the same numbers
    assert torch.equal(q(x), want)
