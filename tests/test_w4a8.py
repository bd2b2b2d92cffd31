"""W4A8 on its int8 kernel (ops.w4a8_linear): the op against its definition
(_reference.w4a8_linear) on the shapes each tier takes, extreme values, the
checks; QLinear taking it for 4-bit weights with dynamic symmetric
activations on the CPU and giving the simulated path's real number. The
random-shape fuzz is tests/test_ops_fuzz.py::test_w4a8_linear."""

import pytest
import torch

from conftest import R, lq, noncontig
from llmeasyquant import quant_format

ops = lq.ops


def _layer(N, K, g, zero_points, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qw, s, z = ops.quantize(torch.randn(N, K, generator=gen), 4, not zero_points, g)
    return qw, s, (z if zero_points else None), torch.randn(N, generator=gen)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 7, 50])
@pytest.mark.parametrize("K,g", [(64, 32), (256, 64), (640, 128), (512, -1), (2048, -1), (96, 24), (99, -1)])
@pytest.mark.parametrize("zero_points", [False, True])
def test_matches_its_definition_bit_for_bit(cpu_isa, M, K, g, zero_points):
    qw, s, z, bias = _layer(13, K, g, zero_points)
    x = torch.randn(M, K) * 3
    assert torch.equal(ops.w4a8_linear(x, qw, s, z, g, bias), R.w4a8_linear(x, qw, s, z, g, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_batch_dims_and_strided_input(cpu_isa, dtype):
    qw, s, z, bias = _layer(9, 128, 32, True)
    x = (torch.randn(2, 5, 128) * 2).to(dtype)
    want = R.w4a8_linear(x, qw, s, z, 32, bias.to(dtype))
    for xin in (x, noncontig(x)):
        out = ops.w4a8_linear(xin, qw, s, z, 32, bias.to(dtype))
        assert out.shape == (2, 5, 9) and out.dtype == dtype and torch.equal(out, want)


def test_extreme_values_stay_exact(cpu_isa):
    # rows that quantize to +-127 everywhere, weights at -8 / 7 against zero-points at the far end:
    # the largest group sums the AVX2 tier's int16 accumulation (8 blocks) must hold
    K, g = 8192, -1
    x = torch.where(torch.arange(K) % 2 == 0, 1.0, -1.0).repeat(3, 1)
    q = torch.where(torch.arange(K) % 3 == 0, -8, 7).to(torch.int8).repeat(6, 1)
    qw = quant_format.pack_int4(q)
    s = torch.full((6, 1), 1e-3)
    z = torch.tensor([[7], [-8], [0], [7], [-8], [3]], dtype=torch.int8)
    out = ops.w4a8_linear(x, qw, s, z, g, None)
    assert torch.equal(out, R.w4a8_linear(x, qw, s, z, g, None))
    # and the exact integer result is what a float64 product gives
    exact = (127 * x.double()) @ (q.double() - z.double()).T * (1e-3 * (1.0 / 127.0))
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)


def test_is_the_simulated_path_up_to_rounding():
    qw, s, z, bias = _layer(24, 256, 64, True)
    x = torch.randn(6, 256) * 4
    qx, sx, zx = ops.quantize(x, 8, True, -1)
    xq = ops.dequantize(qx, sx, zx, 8, -1, 256, torch.float32)
    simulated = ops.weight_only_linear(xq, qw, s, z, 4, 64, bias)
    # fp32 rounding only: within a few ulps of the sum of |terms| (outputs may cancel)
    wd = ops.dequantize(qw, s, z, 4, 64, 256, torch.float32)
    mag = xq.abs() @ wd.abs().T + bias.abs()
    diff = (ops.w4a8_linear(x, qw, s, z, 64, bias) - simulated).abs()
    assert (diff <= 256 * 2 ** -23 * mag).all(), (diff / mag).max()


def test_bad_arguments_say_what_was_expected():
    qw, s, z, bias = _layer(5, 64, 32, True)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"K mismatch: x has K=60"):
        ops.w4a8_linear(torch.randn(2, 60), qw, s, z, 32, bias)
    with pytest.raises(ValueError, match=r"group_size"):
        ops.w4a8_linear(x, qw, s, z, 0, bias)
    with pytest.raises(TypeError, match=r"expected qw of dtype Byte, got Char"):
        ops.w4a8_linear(x, qw.to(torch.int8), s, z, 32, bias)
    with pytest.raises(ValueError, match=r"scale"):
        ops.w4a8_linear(x, qw, s[:, :1], z, 32, bias)
    with pytest.raises(ValueError, match=r"bias"):
        ops.w4a8_linear(x, qw, s, z, 32, torch.randn(4))
    big = 65536 + 64
    with pytest.raises(ValueError, match=r"exceeds the int32-exact limit 65536"):
        ops.w4a8_linear(torch.randn(1, big), torch.zeros(1, big // 2, dtype=torch.uint8), torch.ones(1, 1), None,
                        -1, None)
    # the fake (torch.compile's view) says the same
    with pytest.raises(ValueError, match=r"K mismatch: x has K=60"):
        ops.w4a8_linear(torch.randn(2, 60, device="meta"), qw.to("meta"), s.to("meta"), z.to("meta"), 32, None)


# ---------------------------------------------------------------- QLinear
def _qlinear(act_symmetric=True, w_symmetric=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(128, 20)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(20, 128, generator=gen) * 0.05)
    q = lq.QLinear.from_linear(lin, w_bits=4, w_group_size=32, w_symmetric=w_symmetric, act="dynamic",
                               act_symmetric=act_symmetric)
    return lin, q


needs_simd = pytest.mark.skipif(not lq._native.has_w4a8_simd(),
                                reason="this CPU has no SIMD W4A8 tier: QLinear takes the simulated path")


@needs_simd
@pytest.mark.parametrize("w_symmetric", [True, False])
def test_qlinear_w4a8_runs_the_op(w_symmetric):
    lin, q = _qlinear(w_symmetric=w_symmetric)
    assert q.w4a8 and not q.int8_gemm and "W4A8 int8 kernel" in repr(q)
    x = torch.randn(3, 7, 128)
    want = R.w4a8_linear(x, q.qweight, q.w_scale, q.w_zero, 32, q.bias)
    assert torch.equal(q(x), want)
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.15, rel


@needs_simd
def test_qlinear_w4a8_with_act_order_permutes_the_input():
    _, q0 = _qlinear()
    q = lq.QLinear(128, 20, w_bits=4, w_group_size=32, w_symmetric=False, act="dynamic", in_perm=True)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    q.load_state_dict({**q0.state_dict(), "in_perm": perm})
    x = torch.randn(4, 128)
    want = R.w4a8_linear(x[:, perm], q.qweight, q.w_scale, q.w_zero, 32, q.bias)
    assert torch.equal(q(x), want)


def test_qlinear_asymmetric_activations_stay_simulated():
    _, q = _qlinear(act_symmetric=False)
    assert not q.w4a8 and "simulated" in repr(q)


def test_qlinear_w4a8_off_the_kernel_grid_runs_simulated():
    # groups of 16 are not on the SIMD kernel's 32-value grid: the scalar loop would be slower than simulating
    gen = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(64, 10)
    q = lq.QLinear.from_linear(lin, w_bits=4, w_group_size=16, act="dynamic")
    assert not ops.w4a8_fast(64, 16) and not q.w4a8
    x = torch.randn(3, 64, generator=gen)
    qx, sx, zx = ops.quantize(x, 8, True, -1)
    xq = ops.dequantize(qx, sx, zx, 8, -1, 64, torch.float32)
    assert torch.equal(q(x), ops.weight_only_linear(xq, q.qweight, q.w_scale, q.w_zero, 4, 16, q.bias))
