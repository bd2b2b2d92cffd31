"""QLinear keeps its invariants whatever is done to the module: casts keep the
scales' and the activation state's dtype, an in-place edit of the integer
weights never leaves a stale row sum, and a cast model saves and loads
(issue 14, section 4)."""

import pytest
import torch

import tiny_models
from conftest import lq


def _layer(**kw):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.mul_(1e-4)  # scales ~1e-6: below float16's smallest normal, where a cast would flush them
    return lq.QLinear.from_linear(lin, **kw)


@pytest.mark.parametrize("cfg", [dict(act="dynamic"), dict(act="static"), dict(act="ema"),
                                 dict(act=None, w_bits=4, w_group_size=16, w_symmetric=False)])
@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()])
def test_casts_keep_scale_and_state_dtypes(cfg, cast):
    q = _layer(**cfg)
    if q.act == "static":
        q.set_static_range(-3.0, 3.0)
    before = {k: (v.dtype, v.clone()) for k, v in q.state_dict().items() if k != "bias"}
    cast(q)
    for k, (dt, v) in before.items():
        t = q.state_dict()[k]
        assert t.dtype == dt and torch.equal(t, v), k
    if q.bias.dtype == torch.float64:  # no float64 kernels: the bias kept its dtype
        assert q.bias.dtype == torch.float32
    out = q(torch.randn(5, 64).to(q.bias.dtype))  # forward runs after the cast
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_half_model_saves_and_loads(tmp_path):
    for cast in (torch.bfloat16, torch.float16):
        model = tiny_models.build("llama")
        lq.quantize(model, "absmax", progress=False)
        model.to(cast)
        lq.save(model, tmp_path / str(cast))
        loaded = lq.load(tmp_path / str(cast))
        ids = torch.randint(1, tiny_models.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
        sd, sd2 = model.state_dict(), loaded.state_dict()
        assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)  # every tensor, bit for bit
        # (the logits differ in the last bit: the cast model's rotary buffer
        # inv_freq, not saved, was cast too; the loaded one keeps it float32, as
        # transformers' from_pretrained(dtype=...) does)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=0.02, atol=0.02)


def test_in_place_weight_edit_refreshes_row_sums():
    q = _layer(act="dynamic", act_symmetric=False)
    x = torch.randn(3, 64)
    q(x)
    with torch.no_grad():
        q.qweight[:, :7] = -q.qweight[:, :7]  # edited in place, no setter called
    fresh = lq.QLinear(64, 24, act="dynamic", act_symmetric=False)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(q(x), fresh(x))
    assert torch.equal(q.w_sum, lq.ops.weight_row_sums(q.qweight))


def test_static_path_uses_fresh_row_sums():
    q = _layer(act="static", act_symmetric=False)
    q.set_static_range(-2.0, 5.0)
    x = torch.randn(4, 64)
    with torch.no_grad():
        q.qweight.fill_(3)
    ref = torch.nn.functional.linear(lq.ops.dequantize(lq.ops.quantize_static(x, q.act_scale, q.act_zero, 8, 0),
                                                       q.act_scale, q.act_zero, 8, 0, 64),
                                     q.dequantize(), q.bias)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


def test_ema_layer_survives_a_nan_batch():
    q = _layer(act="ema")
    x = torch.randn(6, 64)
    q(x)
    q(2 * x)
    state = q.ema_state.clone()
    good = q(x)
    q.ema_state.copy_(state)
    bad = x.clone()
    bad[2, 5] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or Inf.*not observed"):
        q(bad)
    assert torch.equal(q.ema_state, state) and int(q.ema_skipped) == 1
    assert torch.equal(q(x), good)  # later outputs are not poisoned
    assert torch.isfinite(q.ema_state).all()


def _linear(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64), (0, 64), (2, 3, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_outputs_are_tensors_of_their_own(shape, dtype):
    """No op output is a view of the op's intermediates: autograd refuses an
    in-place edit of such a view under grad mode (models add into a linear's
    output in place, e.g. Falcon's parallel residual)."""
    K = shape[-1]
    N = 24
    w = torch.randn(N, K)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    for layer in (lq.QLinear.from_linear(_linear(w), act=None), lq.QLinear.from_linear(_linear(w), act=None, w_bits=4,
                                                                                 w_group_size=K or -1),
                  lq.QLinear.from_linear(_linear(w), act="dynamic")):
        with torch.enable_grad():
            y = layer(x)
            assert not y._is_view(), layer
            assert y.shape == (*shape[:-1], N)
            ref = y.detach().clone()
            y += 1.0  # raises when y is a view created inside a custom op
        assert torch.equal(y.detach(), ref + 1.0)


_O = torch.ops.llmeasyquant


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_forward_is_the_op_on_the_held_tensors(scale_dtype):
    """forward reads its buffers straight from the module's buffer dict and
    passes the scales [N, G] as held (float32: no copy): the result is the
    op's on the flat float32 scales, bit for bit, and a buffer replaced by
    assignment (or by a cast, a load) is the one used next call."""
    x = torch.randn(1, 1, 64)
    q8 = _layer(act="dynamic", w_scale_dtype=scale_dtype)
    q4 = _layer(act=None, w_bits=4, w_group_size=16, w_symmetric=False, w_scale_dtype=scale_dtype)
    s8, s4 = q8.w_scale.float().view(-1), q4.w_scale.float()
    if scale_dtype == "float32":
        assert q8.scales() is q8.w_scale
    assert torch.equal(q8(x), _O.dynamic_quant_linear(x, q8.qweight, s8, lq.ops.weight_row_sums(q8.qweight),
                                                      q8.bias, True))
    assert torch.equal(q4(x), _O.weight_only_linear(x, q4.qweight, s4, q4.w_zero, 4, 16, q4.bias))
    q8.qweight = -q8.qweight  # a new tensor: its row sums are recomputed
    q8.bias = torch.zeros(24)
    assert torch.equal(q8(x), _O.dynamic_quant_linear(x, q8.qweight, s8, lq.ops.weight_row_sums(q8.qweight),
                                                      None, True))


def test_forward_still_names_bad_inputs():
    q8, q4 = _layer(act="dynamic"), _layer(act=None, w_bits=4, w_group_size=16)
    # (on AVX-512 VNNI CPUs the layer runs the op's pre-packed variant: the same words)
    with pytest.raises(ValueError, match=r"dynamic_quant_linear(_packed)?: K mismatch: x has K=63"):
        q8(torch.randn(1, 63))
    with pytest.raises(TypeError, match=r"dynamic_quant_linear(_packed)?: expected x of dtype float32, bfloat16 or float16, "
                                        r"got Double"):
        q8(torch.randn(1, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight_only_linear: K mismatch: x has K=48"):
        q4(torch.randn(2, 48))
    q8.w_scale = torch.ones(23, 1)  # a wrong buffer put in by hand is the op's to refuse
    with pytest.raises(ValueError, match=r"expected w_scale with 24 elements \(one per output channel\)"):
        q8(torch.randn(1, 64))
