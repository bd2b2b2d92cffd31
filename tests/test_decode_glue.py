"""The decode-step glue ops (add_rms_norm, silu_mul, decode_attention_)
against their PyTorch references (_reference.py: HF's LLaMA arithmetic) on
fresh random inputs: odd sizes, every float dtype, strided rows, GQA, the
first and a late cache position; the cache write in place; bad calls named."""

import pytest
import torch

from llmeasyquant import _reference as R
from llmeasyquant import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# one rounding of the result in a 16-bit type, float32 sums in another order
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 37), (7, 1), (2, 130)])
@pytest.mark.parametrize("residual", [False, True])
def test_add_rms_norm_matches_the_reference(dtype, shape, residual):
    g = _gen(hash((str(dtype), shape, residual)) % 2**31)
    # strided rows: the columns of a wider tensor
    x = (torch.randn(*shape[:-1], shape[-1] + 3, generator=g) * 3)[..., 1:-2].to(dtype)
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    w = torch.randn(shape[-1], generator=g).to(dtype)
    normed, s = ops.add_rms_norm(x, w, 1e-5, r)
    want_n, want_s = R.add_rms_norm(x, r, w, 1e-5)
    assert normed.dtype == dtype and normed.shape == x.shape and s.shape == x.shape
    assert torch.equal(s, want_s)  # one IEEE add, rounded once: exact
    torch.testing.assert_close(normed, want_n, **TOL[dtype])
    if r is None:
        assert s.data_ptr() != x.data_ptr()  # a tensor of its own, never the input


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 1536), (5, 17), (64, 33)])
def test_silu_mul_matches_the_reference_on_joined_halves(dtype, rows, n):
    g = _gen(rows * 1000 + n)
    gu = (torch.randn(rows, 2 * n, generator=g) * 4).to(dtype)
    gate, up = gu.split(n, -1)  # row-strided views, as FastDecoder passes them
    got = ops.silu_mul(gate, up)
    assert got.shape == (rows, n) and got.is_contiguous()
    torch.testing.assert_close(got, R.silu_mul(gate, up), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,D,S,pos", [(1, 9, 3, 64, 40, 0), (2, 4, 4, 6, 9, 8), (3, 6, 2, 32, 300, 257),
                                             (1, 2, 1, 2, 5, 3)])
def test_decode_attention_matches_the_reference_and_writes_the_cache(dtype, B, H, Hkv, D, S, pos):
    g = _gen(B * 7 + H * 13 + D + pos)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g).to(dtype)
    q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), -1)
    kc = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    vc = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    ang = torch.rand(D // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2), torch.cat([ang.sin()] * 2)
    got = ops.decode_attention_(q, k, v, kc, vc, cos, sin, pos, D ** -0.5)
    want = R.decode_attention_(q, k, v, kc2, vc2, cos, sin, pos, D ** -0.5)
    assert got.shape == (B, H * D) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(kc, kc2, **TOL[dtype])
    assert torch.equal(vc, vc2)  # v is copied as it is
    # only position pos changed
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[pos] = False
    assert torch.equal(kc[:, :, untouched], kc2[:, :, untouched])


def test_decode_attention_threads_long_contexts_to_the_same_result():
    g = _gen(5)
    B, H, Hkv, D, S = 2, 8, 2, 64, 1200
    q, k, v = torch.randn(B, H * D, generator=g), torch.randn(B, Hkv * D, generator=g), torch.randn(B, Hkv * D,
                                                                                                  generator=g)
    kc, vc = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    cos, sin = torch.randn(D, generator=g), torch.randn(D, generator=g)
    n = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(ops.decode_attention_(q, k, v, kc.clone(), vc.clone(), cos, sin, S - 1, 0.125))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(outs[0], outs[1])  # each head is one thread's, in one order


def test_bad_calls_say_what_was_expected():
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match=r"expected weight of shape \[8\]"):
        ops.add_rms_norm(x, torch.randn(7), 1e-5)
    with pytest.raises(TypeError, match="expected residual of dtype Float, got BFloat16"):
        ops.add_rms_norm(x, w, 1e-5, x.bfloat16())
    with pytest.raises(ValueError, match="expected a finite eps >= 0, got -1"):
        ops.add_rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match=r"expected up of gate's shape \[2, 8\], got \[2, 7\]"):
        ops.silu_mul(x, torch.randn(2, 7))
    q, k, kc = torch.randn(1, 8), torch.randn(1, 4), torch.randn(1, 1, 4, 4)
    cs = torch.randn(4)
    with pytest.raises(ValueError, match="expected 0 <= pos < max_pos=4, got pos=4"):
        ops.decode_attention_(q, k, k, kc, kc.clone(), cs, cs, 4, 1.0)
    with pytest.raises(ValueError, match=r"expected q of shape \[1, heads \* 4\]"):
        ops.decode_attention_(torch.randn(1, 6), k, k, kc, kc.clone(), cs, cs, 0, 1.0)
    with pytest.raises(TypeError, match="expected cos of dtype Float, got BFloat16"):
        ops.decode_attention_(q, k, k, kc, kc.clone(), cs.bfloat16(), cs, 0, 1.0)
    with pytest.raises(ValueError, match="expected contiguous k_cache"):
        ops.decode_attention_(q, k, k, kc.transpose(2, 3), kc.clone(), cs, cs, 0, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_pytorch_kernel_of_other_devices_agrees(dtype):
    # _fallback's kernels (what CUDA, MPS, ... run), called on CPU tensors
    from llmeasyquant import _fallback

    g = _gen(11)
    x, r = (torch.randn(3, 40, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(40, generator=g).to(dtype)
    for got, want in zip(_fallback._add_rms_norm_kernel(x, r, w, 1e-6), ops.add_rms_norm(x, w, 1e-6, r)):
        torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(_fallback._silu_mul_kernel(x, r), ops.silu_mul(x, r), **TOL[dtype])
    B, H, Hkv, D, S = 2, 6, 3, 16, 12
    q, k, v = torch.randn(B, H * D).to(dtype), torch.randn(B, Hkv * D).to(dtype), torch.randn(B, Hkv * D).to(dtype)
    kc, vc = torch.randn(B, Hkv, S, D).to(dtype), torch.randn(B, Hkv, S, D).to(dtype)
    cos, sin = torch.randn(D), torch.randn(D)
    kc2, vc2 = kc.clone(), vc.clone()
    torch.testing.assert_close(_fallback._decode_attention_kernel(q, k, v, kc, vc, cos, sin, 7, 0.25),
                               ops.decode_attention_(q, k, v, kc2, vc2, cos, sin, 7, 0.25), **TOL[dtype])
    torch.testing.assert_close(kc, kc2, **TOL[dtype])
