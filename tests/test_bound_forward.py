"""QLinear.bound_forward: the layer's kernel op with its arguments bound once
(what the fast decoder calls ~120 times per token) gives forward's outputs
bit for bit, on every CPU tier, every layout, odd shapes, strided and 3-D
inputs, bf16 activations, act order; layers it cannot bind return forward."""

import pytest
import torch

from conftest import lq, noncontig

LAYOUTS = {
    "w8a8": dict(),
    "w8a8-asym": dict(act_symmetric=False),
    "w8a16": dict(act=None),
    "w8a16-g32-asym": dict(act=None, w_group_size=32, w_symmetric=False),
    "w4g32": dict(w_bits=4, w_group_size=32, act=None),
    "w4g32-asym-fp16": dict(w_bits=4, w_group_size=32, w_symmetric=False, act=None, w_scale_dtype="float16"),
    "w3g16": dict(w_bits=3, w_group_size=16, act=None),
    "w2g16": dict(w_bits=2, w_group_size=16, act=None),
    "w4a8": dict(w_bits=4, w_group_size=32, act="dynamic"),
    "w4a8-asym-w": dict(w_bits=4, w_group_size=32, w_symmetric=False, act="dynamic"),
    "w8a8-g32-simulated": dict(w_group_size=32),
}


def _layer(K, N, seed, bias=True, **kw):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.05)
    return lq.QLinear.from_linear(lin, **kw)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("M,K,N", [(1, 64, 40), (1, 96, 17), (5, 160, 33), (33, 64, 7)])
def test_bound_forward_is_forward_bit_for_bit(cpu_isa, layout, M, K, N):
    q = _layer(K, N, seed=M + K + N, bias=M % 2 == 1, **LAYOUTS[layout])
    f = q.bound_forward()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K))
    for inp in (x, noncontig(x), x.view(1, M, K), x.to(torch.bfloat16)):
        want = q(inp)
        got = f(inp)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), f"{layout} M={M} K={K} N={N} {inp.dtype}"


def test_bound_forward_binds_the_kernel_op_where_there_is_one():
    # the point of it: no Python forward in between (a plain closure over the op)
    for layout in ("w8a8", "w8a16", "w4g32", "w4a8"):
        assert _layer(64, 16, 0, **LAYOUTS[layout]).bound_forward().__name__ == "<lambda>", layout
    static = _layer(64, 16, 0, act="static")
    static.set_static_range(-2.0, 2.0)
    ema = _layer(64, 16, 0, act="ema")
    ema.ema_update = False  # (each observing call moves the EMA state: two calls would differ)
    for q in (static, ema):  # per-layer activation state: forward's own path
        assert q.bound_forward() == q.forward
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
        assert torch.equal(q.bound_forward()(x), q(x))


def test_bound_forward_of_an_act_order_layer():
    g = torch.Generator().manual_seed(5)
    q = lq.QLinear(64, 24, bias=False, w_bits=4, w_group_size=16, act=None, in_perm=True)
    q.set_quantized(torch.randint(-8, 8, (24, 64), generator=g, dtype=torch.int8), torch.rand(24, 4, generator=g) + 0.1)
    q.set_in_perm(torch.randperm(64, generator=g))
    x = torch.randn(2, 3, 64, generator=g)
    assert torch.equal(q.bound_forward()(x), q(x))
