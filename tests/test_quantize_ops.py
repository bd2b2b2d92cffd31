"""quantize / quantize_static / dequantize / channel_stats_ / ema_quantize_
against the pure-PyTorch reference (bit-exact: same IEEE ops in the same order)."""

import pytest
import torch

from conftest import R, lq, noncontig

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 7), (3, 64), (17, 100), (128, 65), (2, 5, 48)]


def _groups(K):
    return [0, -1] + [g for g in (4, 16, 5) if K % g == 0 and g < K]


def _x(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g) * 4
    x[..., 0] += 3.0  # an outlier channel, as in real LLM activations
    return x.to(dtype).to(device)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_matches_reference(device, dtype, shape, bits, symmetric):
    x = _x(shape, dtype, device, seed=hash((shape, bits)) % 1000)
    if device.type == "cuda" and bits < 4:  # the CUDA kernels take 4 and 8 bits; ops.py runs 2/3 in PyTorch
        with pytest.raises(ValueError, match="CPU kernels only"):
            torch.ops.llmeasyquant.quantize(x, bits, symmetric, -1)
    for g in _groups(shape[-1]):
        q, s, z = lq.ops.quantize(x, bits, symmetric, g)
        rq, rs, rz = R.quantize(x.cpu(), bits, symmetric, g)
        assert q.dtype == (torch.uint8 if bits != 8 else torch.int8)
        assert q.shape[-1] == R.packed_len(shape[-1], bits)
        torch.testing.assert_close(s.cpu(), rs, rtol=0, atol=0)
        assert torch.equal(z.cpu(), rz)
        assert torch.equal(q.cpu(), rq), f"group_size={g}"
        d = lq.ops.dequantize(q, s, z, bits, g, shape[-1], dtype)
        assert torch.equal(d.cpu(), R.dequantize(rq, rs, rz, bits, g, shape[-1], dtype))
        # quantize_static with the dynamic scales reproduces the dynamic result
        assert torch.equal(lq.ops.quantize_static(x, s, z, bits, g).cpu(), rq)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_is_bounded(device, bits):
    x = _x((33, 96), torch.float32, device, seed=1)
    for sym in (True, False):
        for g in (-1, 32):
            q, s, z = lq.ops.quantize(x, bits, sym, g)
            d = lq.ops.dequantize(q, s, z, bits, g, 96)
            step = s.repeat_interleave(96 if g == -1 else g, dim=-1)
            assert ((d - x).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()


def test_noncontiguous_input(device):
    x = _x((9, 40), torch.bfloat16, device, seed=2)
    xn = noncontig(x)
    for bits in (8, 4):
        a = lq.ops.quantize(xn, bits, False, 8)
        b = lq.ops.quantize(x, bits, False, 8)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    xt = _x((40, 9), torch.float32, device, seed=3).t()  # transposed view
    assert all(torch.equal(u, v) for u, v in zip(lq.ops.quantize(xt), lq.ops.quantize(xt.contiguous())))


def test_int4_packing_order_and_odd_k():
    q = torch.tensor([[1, -2, 7, -8, 3]], dtype=torch.int8)
    p = R.pack_int4(q)
    # element 0 low nibble, element 1 high nibble; odd K pads the last high nibble with 0
    assert p.tolist() == [[0x1 | (0xE << 4), 0x7 | (0x8 << 4), 0x3]]
    assert torch.equal(R.unpack_int4(p, 5), q)
    x = torch.tensor([[1.0, -2.0, 7.0, -8.0, 3.0]])
    kq, _, _ = lq.ops.quantize(x, 4, True, -1)
    assert kq.shape == (1, 3)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("K", [1, 5, 7, 8, 9, 13, 67])
def test_low_bit_packing_round_trips_at_odd_k(bits, K):
    lo, hi = R.qrange(bits)
    q = torch.randint(lo, hi + 1, (3, K), generator=torch.Generator().manual_seed(K * bits), dtype=torch.int8)
    p = R.pack_bits(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (3, R.packed_len(K, bits))
    assert torch.equal(R.unpack_bits(p, bits, K), q)
    # the C++ dequantize reads the same layout
    one = torch.ones(3, 1)
    zero = torch.zeros(3, 1, dtype=torch.int8)
    assert torch.equal(lq.ops.dequantize(p, one, zero, bits, -1, K), q.float())


def test_three_bit_layout_is_the_documented_bit_stream():
    # 8 values -> 3 bytes: value i's code (q + 4) at bits [3i, 3i+3) of a little-endian 24-bit word
    q = torch.tensor([[-4, 3, 0, -1, 1, 2, -3, -2, 3]], dtype=torch.int8)
    word = sum((int(v) + 4) << (3 * i) for i, v in enumerate(q[0, :8].tolist()))
    tail = int(q[0, 8]) + 4  # the 9th value starts a new zero-padded 3-byte group
    want = [word & 0xFF, (word >> 8) & 0xFF, word >> 16, tail, 0, 0]
    assert R.pack_bits(q, 3).tolist() == [want]
    assert R.pack_bits(torch.tensor([[-2, 1, 0, -1, 1]], dtype=torch.int8), 2).tolist() == [
        [0 | (3 << 2) | (2 << 4) | (1 << 6), 3]]


def test_zero_and_nan_rows():
    x = torch.zeros(2, 8)
    x[1, 3] = float("nan")
    q, s, z = lq.ops.quantize(x, 8, True, -1)
    assert s[0].item() == 1.0 and (q[0] == 0).all()  # zero range -> scale 1, q 0
    assert torch.isnan(s[1]).all()  # NaN stays visible in the scale
    rq, rs, rz = R.quantize(x, 8, True, -1)
    assert torch.equal(q, rq)


@pytest.mark.parametrize("dtype", FLOATS)
def test_channel_stats_accumulate(device, dtype):
    K = 37
    stats = lq.ops.new_channel_stats(K, device)
    ref = lq.ops.new_channel_stats(K)
    for seed in range(3):
        x = _x((seed * 7 + 1, 3, K), dtype, device, seed)
        lq.ops.channel_stats_(noncontig(x) if seed == 1 else x, *stats)
        R.channel_stats_(x.cpu(), *ref)
    for a, b in zip(stats, ref):
        assert torch.equal(a.cpu(), b)
    assert (stats[0] >= stats[2].abs()).all()


def test_channel_stats_nan_propagates():
    stats = lq.ops.new_channel_stats(4)
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    lq.ops.channel_stats_(x, *stats)
    assert torch.isnan(stats[0][2]) and not torch.isnan(stats[0][[0, 1, 3]]).any()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_ema_matches_reference(device, symmetric, bits):
    state = lq.ops.new_ema_state(device)
    ref = lq.ops.new_ema_state()
    for t in range(6):
        x = _x((5, 24), torch.float32, device, seed=10 + t) * (1 + t)
        update = t != 4  # one frozen step
        q, s, z = lq.ops.ema_quantize_(x, state, 0.8, 1e-5, bits, symmetric, update)
        rq, rs, rz = R.ema_quantize_(x.cpu(), ref, 0.8, 1e-5, bits, symmetric, update)
        assert torch.equal(state.cpu(), ref), f"step {t}"
        assert torch.equal(s.cpu(), rs) and torch.equal(z.cpu(), rz) and torch.equal(q.cpu(), rq)
    assert state[3].item() == 5


def test_ema_follows_paper_equation():
    state = lq.ops.new_ema_state()
    x1 = torch.tensor([[1.0, -4.0]])
    x2 = torch.tensor([[2.0, 0.5]])
    lq.ops.ema_quantize_(x1, state, 0.9, 1e-5)
    assert state[0].item() == 4.0  # first step initialises delta with the observation
    _, s, _ = lq.ops.ema_quantize_(x2, state, 0.9, 1e-5)
    delta = 0.9 * 4.0 + 0.1 * 2.0
    assert abs(state[0].item() - delta) < 1e-6
    assert abs(s.item() - delta / 127) < 1e-7


# ---- hostile inputs (issue #14) --------------------------------------------
BAD = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bad", BAD)
def test_ema_non_finite_batch_does_not_poison_the_state(device, symmetric, bad):
    state = lq.ops.new_ema_state(device)
    ref = lq.ops.new_ema_state()
    x = _x((5, 24), torch.float32, device, seed=40)
    lq.ops.ema_quantize_(x, state, 0.8, 1e-5, 8, symmetric, True)
    R.ema_quantize_(x.cpu(), ref, 0.8, 1e-5, 8, symmetric, True)
    before = state.clone()
    _, s_before, z_before = lq.ops.ema_quantize_(x, state.clone(), 0.8, 1e-5, 8, symmetric, False)
    xb = x.clone()
    xb[2, 7] = bad
    q, s, z = lq.ops.ema_quantize_(xb, state, 0.8, 1e-5, 8, symmetric, True)
    rq, rs, rz = R.ema_quantize_(xb.cpu(), ref, 0.8, 1e-5, 8, symmetric, True)
    # the observation is skipped (steps unchanged), the batch quantized with the existing state
    assert torch.equal(state, before) and torch.equal(ref, before.cpu())
    assert torch.equal(s, s_before) and torch.equal(z, z_before)
    assert torch.equal(s.cpu(), rs) and torch.equal(z.cpu(), rz) and torch.equal(q.cpu(), rq)
    # later finite batches are unaffected
    for t in range(3):
        x2 = _x((5, 24), torch.float32, device, seed=41 + t)
        q, s, z = lq.ops.ema_quantize_(x2, state, 0.8, 1e-5, 8, symmetric, True)
        rq, rs, rz = R.ema_quantize_(x2.cpu(), ref, 0.8, 1e-5, 8, symmetric, True)
        assert torch.isfinite(state).all() and torch.isfinite(s).all()
        assert torch.equal(state.cpu(), ref) and torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)
    assert state[3].item() == 4  # 1 + 3 updates, the bad batch not counted


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bad", BAD)
def test_ema_non_finite_first_batch_leaves_state_uninitialised(device, symmetric, bad):
    state = lq.ops.new_ema_state(device)
    ref = lq.ops.new_ema_state()
    x = _x((3, 16), torch.float32, device, seed=50)
    x[1, 1] = bad
    q, s, z = lq.ops.ema_quantize_(x, state, 0.9, 1e-5, 8, symmetric, True)
    rq, rs, rz = R.ema_quantize_(x.cpu(), ref, 0.9, 1e-5, 8, symmetric, True)
    assert (state == 0).all() and (ref == 0).all()
    # no state to fall back on: the batch's own (non-finite) scale, so the output is visibly not finite
    assert not torch.isfinite(s).all()
    torch.testing.assert_close(s.cpu(), rs, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(z.cpu(), rz) and torch.equal(q.cpu(), rq)
    assert not torch.isfinite(lq.ops.dequantize(q, s, z, 8, 0, 16)).all()
    x2 = _x((3, 16), torch.float32, device, seed=51)
    lq.ops.ema_quantize_(x2, state, 0.9, 1e-5, 8, symmetric, True)
    R.ema_quantize_(x2.cpu(), ref, 0.9, 1e-5, 8, symmetric, True)
    assert state[3].item() == 1 and torch.equal(state.cpu(), ref)  # the first finite batch initialises


HUGE = 3.0e38  # hi - lo overflows float32 (max 3.4028e38)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_huge_finite_range_gives_finite_scales(device, dtype, bits, symmetric):
    x = torch.tensor([[HUGE, -HUGE, 1.0, 0.0], [HUGE, HUGE / 2, -1.0, 2.0], [-HUGE, -1.0, 0.5, 0.0]]).to(dtype)
    x = x.to(device)
    for g in (0, -1, 2):
        q, s, z = lq.ops.quantize(x, bits, symmetric, g)
        rq, rs, rz = R.quantize(x.cpu(), bits, symmetric, g)
        assert torch.isfinite(rs).all() and (rs > 0).all(), f"group_size={g}: {rs}"
        assert torch.equal(s.cpu(), rs) and torch.equal(z.cpu(), rz) and torch.equal(q.cpu(), rq)
        d = lq.ops.dequantize(q, s, z, bits, g, 4)
        # (at 2/3 bits -3e38 sits half-way and rounds to a grid point beyond
        # FLT_MAX: the scale is finite, that one dequantized value is not)
        assert bits < 4 or torch.isfinite(d).all()
        if bits == 8:  # the extremes come back within one step
            step = s.cpu().double().repeat_interleave(4 if g != 2 else 2, dim=-1) if g != 0 else s.cpu().double()
            assert ((d.cpu().double() - x.cpu().double()).abs() <= step * 0.5 * (1 + 1e-5)).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_huge_finite_range_ema_and_per_token_linear(device, symmetric):
    x = torch.tensor([[HUGE, -HUGE, 1.0], [2.0, -3.0, 0.0]], device=device)
    state = lq.ops.new_ema_state(device)
    ref = lq.ops.new_ema_state()
    for _ in range(2):
        q, s, z = lq.ops.ema_quantize_(x, state, 0.9, 1e-5, 8, symmetric, True)
        rq, rs, rz = R.ema_quantize_(x.cpu(), ref, 0.9, 1e-5, 8, symmetric, True)
        assert torch.isfinite(rs).all() and torch.equal(state.cpu(), ref)
        assert torch.equal(s.cpu(), rs) and torch.equal(z.cpu(), rz) and torch.equal(q.cpu(), rq)
    w = torch.tensor([[1, -1, 0], [0, 0, 1]], dtype=torch.int8, device=device)
    w_s = torch.full((2,), 1e-37, device=device)
    out = lq.ops.dynamic_quant_linear(x, w, w_s, lq.ops.weight_row_sums(w), None, symmetric)
    ref = R.dynamic_quant_linear(x.cpu(), w.cpu(), w_s.cpu(), lq.ops.weight_row_sums(w.cpu()), None, symmetric)
    assert torch.isfinite(ref).all() and torch.equal(out.cpu(), ref)


def test_ordinary_asymmetric_scales_unchanged():
    # the overflow-safe range keeps today's rounding, (hi - lo) / (2^b - 1), wherever hi - lo is finite
    g = torch.Generator().manual_seed(3)
    mn = -torch.rand(1000, generator=g) * torch.logspace(-30, 30, 1000)
    mx = torch.rand(1000, generator=g) * torch.logspace(30, -30, 1000)
    for bits in (2, 3, 4, 8):
        s, _ = R.scale_zp_from_minmax(mn, mx, bits)
        want = (mx - mn) / float((1 << bits) - 1)
        assert torch.equal(s, torch.where(want == 0, torch.ones_like(want), want))
