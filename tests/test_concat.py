"""nn.concat: QLinear layers that read one input, joined into one layer whose
output columns are bit for bit the separate layers' (every CPU tier, odd
shapes, every weight layout it accepts); everything else refused with the
reason."""

import pytest
import torch

from conftest import lq, noncontig
from llmeasyquant.nn import concat


def _layers(K, Ns, seed=0, bias=False, **kw):
    g = torch.Generator().manual_seed(seed)
    out = []
    for N in Ns:
        lin = torch.nn.Linear(K, N, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(N, K, generator=g) * 0.05)
            if bias:
                lin.bias.copy_(torch.randn(N, generator=g))
        out.append(lq.QLinear.from_linear(lin, **kw))
    return out


LAYOUTS = {
    "w8a8": dict(),
    "w8a8-asym": dict(act_symmetric=False),
    "w8a16": dict(act=None),
    "w4g32": dict(w_bits=4, w_group_size=32, act=None),
    "w4g32-asym": dict(w_bits=4, w_group_size=32, w_symmetric=False, act=None),
    "w3g16": dict(w_bits=3, w_group_size=16, act=None),
    "w2g16": dict(w_bits=2, w_group_size=16, act=None),
    "w4a8": dict(w_bits=4, w_group_size=32, act="dynamic"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("M,K,Ns", [(1, 64, (64, 32, 32)), (1, 96, (17, 5, 40)), (3, 64, (96, 96)),
                                    (20, 160, (33, 64, 7)), (1, 576, (576, 192, 192))])
def test_joined_outputs_are_the_separate_outputs_bit_for_bit(cpu_isa, layout, M, K, Ns):
    layers = _layers(K, Ns, seed=M + K, **LAYOUTS[layout])
    joined = concat.concat(layers)
    assert joined.out_features == sum(Ns) and joined.in_features == K
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K))
    for inp in (x, noncontig(x), x.view(1, M, K)):
        parts = joined(inp).split(list(Ns), -1)
        for part, layer in zip(parts, layers):
            assert torch.equal(part, layer(inp)), f"{layout} M={M} K={K} N={layer.out_features}"


def test_bias_bfloat16_scales_and_inputs():
    layers = _layers(64, (48, 16), bias=True, w_scale_dtype="float16")
    joined = concat.concat(layers)
    assert joined.w_scale.dtype == torch.float16 and joined.bias is not None
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 64).to(dtype)
        a, b = joined(x).split([48, 16], -1)
        assert a.dtype == dtype and torch.equal(a, layers[0](x)) and torch.equal(b, layers[1](x))


def test_a_part_changed_makes_the_joined_layer_stale():
    layers = _layers(32, (16, 16))
    joined = concat.concat(layers)
    assert not concat.stale(joined, layers)
    with torch.no_grad():
        layers[1].qweight[0, 0] += 1  # an in-place edit bumps the version counter
    assert concat.stale(joined, layers)
    layers[1].w_scale = layers[1].w_scale.clone()  # new storage
    assert concat.stale(concat.concat(layers), layers) is False


def test_what_cannot_be_joined_exactly_is_refused_with_the_reason():
    base = _layers(32, (16, 16))
    assert "need at least 2 layers" in concat.refusal(base[:1])
    assert "not all are QLinear" in concat.refusal([base[0], torch.nn.Linear(32, 16)])
    assert "in_features differ (32 vs 48)" in concat.refusal([base[0]] + _layers(48, (16,)))
    assert "w_bits differs (8 vs 4)" in concat.refusal(
        [base[0]] + _layers(32, (16,), w_bits=4, w_group_size=16))
    assert "act_symmetric differs" in concat.refusal([base[0]] + _layers(32, (16,), act_symmetric=False))
    assert "bias on some layers only" in concat.refusal([base[0]] + _layers(32, (16,), bias=True))
    static = _layers(32, (16, 16), act="static")
    assert "act='static' holds per-layer activation state" in concat.refusal(static)
    ema = _layers(32, (16, 16), act="ema")
    assert "act='ema'" in concat.refusal(ema)

    perm = [lq.QLinear(32, 16, bias=False, in_perm=True) for _ in range(2)]
    perm[1].set_in_perm(torch.randperm(32, generator=torch.Generator().manual_seed(0)))
    assert "input permutations (act order) differ" in concat.refusal(perm)
    perm[0].set_in_perm(perm[1].in_perm)
    assert concat.refusal(perm) is None

    meta = [lq.QLinear(32, 16, bias=False, device="meta") for _ in range(2)]
    assert "on meta; joining is verified on the CPU kernels only" in concat.refusal(meta)

    hooked = _layers(32, (16, 16))
    handle = hooked[1].register_forward_pre_hook(lambda m, args: None)
    assert "forward hooks" in concat.refusal(hooked)
    handle.remove()
    assert concat.refusal(hooked) is None
    with pytest.raises(ValueError, match="concat: cannot join these layers exactly: act='static'"):
        concat.concat(static)


def test_joined_act_order_layers_match():
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(64, generator=g)
    layers = []
    for N in (24, 40):
        m = lq.QLinear(64, N, bias=False, w_bits=4, w_group_size=16, act=None, in_perm=True)
        m.set_quantized(torch.randint(-8, 8, (N, 64), generator=g, dtype=torch.int8), torch.rand(N, 4, generator=g) + 0.1)
        m.set_in_perm(perm)
        layers.append(m)
    joined = concat.concat(layers)
    x = torch.randn(3, 64, generator=g)
    a, b = joined(x).split([24, 40], -1)
    assert torch.equal(a, layers[0](x)) and torch.equal(b, layers[1](x))
