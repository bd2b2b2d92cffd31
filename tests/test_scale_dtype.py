"""float16 weight scales: the scale is rounded before the integers are chosen,
so the (scale, q) pair a layer holds is exactly what the quantizer picked; the
memory report counts 2 bytes per scale; GPTQ compensates against the rounded
scales; bad settings get clear errors."""

import pytest
import torch

from conftest import lq
from llmeasyquant import _reference as R
from llmeasyquant.methods.base import config_for, config_from_json
from llmeasyquant.methods.gptq import gptq_quantize


def _fits_fp16(t: torch.Tensor) -> bool:
    return torch.equal(t.float().half().float(), t.float())


def test_storable_scale_rounds_raises_tiny_and_refuses_huge():
    s = torch.tensor([1e-9, 3e-5, 0.0123456789, 1.0, 60000.0])
    out = R.storable_scale(s, torch.float16)
    assert _fits_fp16(out)
    assert (out >= 2.0 ** -14).all()  # no subnormal or zero scale
    assert out[2] != s[2] and abs(out[2] - s[2]) / s[2] < 2 ** -10
    assert torch.equal(R.storable_scale(s, torch.float32), s)
    with pytest.raises(ValueError, match="does not fit float16"):
        R.storable_scale(torch.tensor([1e5]), torch.float16)
    with pytest.raises(ValueError, match="scale dtype must be one of"):
        R.scale_dtype_of("bfloat16")


@pytest.mark.parametrize("bits,group,sym", [(2, 16, False), (3, 16, False), (4, 8, False), (4, -1, True),
                                            (8, -1, True), (8, 16, False)])
def test_fp16_layer_holds_exactly_what_the_reference_quantizer_chose(bits, group, sym):
    g = torch.Generator().manual_seed(bits * 10 + group)
    lin = torch.nn.Linear(48, 7)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(7, 48, generator=g) * 0.05)
        lin.weight[0, :16] *= 1e-4  # a group whose float32 scale is below float16's normal range
    q16 = lq.QLinear.from_linear(lin, w_bits=bits, w_group_size=group, w_symmetric=sym, act=None,
                                 w_scale_dtype="float16")
    assert q16.w_scale.dtype == torch.float16
    qr, sr, zr = R.quantize(lin.weight.detach(), bits, sym, group, torch.float16)
    assert torch.equal(q16.qweight, qr)
    assert torch.equal(q16.w_scale.float(), sr.reshape(q16.w_scale.shape))
    want = R.dequantize(qr, sr, zr, bits, group, 48, torch.float32)
    assert torch.equal(q16.dequantize(), want)
    x = torch.randn(3, 48, generator=g)
    torch.testing.assert_close(q16(x), x @ want.T + lin.bias.detach(), rtol=1e-5, atol=1e-6)
    # memory: the fp32 layer holds 2 more bytes per scale, nothing else differs
    q32 = lq.QLinear.from_linear(lin, w_bits=bits, w_group_size=group, w_symmetric=sym, act=None)
    assert q32.memory_bytes() - q16.memory_bytes() == 2 * q16.w_scale.numel()
    assert q16.memory_bytes() == sum(t.numel() * t.element_size() for t in q16.state_dict().values())
    assert "fp16 scales" in repr(q16)


def test_set_quantized_never_stores_a_zero_scale():
    ql = lq.QLinear(16, 2, False, w_bits=4, w_group_size=8, w_symmetric=False, act=None, w_scale_dtype="float16")
    q = torch.zeros(2, 16, dtype=torch.int8)
    ql.set_quantized(q, torch.full((2, 2), 1e-9), torch.zeros(2, 2, dtype=torch.int8))
    assert (ql.w_scale.float() > 0).all() and torch.isfinite(ql.w_scale.float()).all()


def test_w8a8_int8_gemm_with_fp16_scales_matches_its_dequantized_weight():
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(64, 24)
    ql = lq.QLinear.from_linear(lin, w_bits=8, act="dynamic", w_scale_dtype="float16")
    assert ql.int8_gemm and _fits_fp16(ql.w_scale)
    x = torch.randn(5, 64, generator=g)
    ref = lq.QLinear.from_linear(lin, w_bits=8, act="dynamic")
    ref.w_scale.copy_(ql.w_scale.float())
    ref.qweight.copy_(ql.qweight)
    ref._refresh_w_sum()
    assert torch.equal(ql(x), ref(x))  # the same kernel on the same (widened) scales


def test_gptq_rounds_scales_before_compensating():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(12, 64, generator=g) * 0.02
    X = torch.randn(256, 64, generator=g)
    H = (X.T @ X).double()
    r16 = gptq_quantize(W, H, bits=4, group_size=16, scale_dtype=torch.float16)
    r32 = gptq_quantize(W, H, bits=4, group_size=16)
    assert _fits_fp16(r16.scale) and not _fits_fp16(r32.scale)
    # the objective is the same problem up to a 2^-11 relative change of the grid
    assert r16.loss == pytest.approx(r32.loss, rel=0.05)
    # its own loss is measured with the rounded scales: recompute it
    err16 = ((W - r16.dequantize()).double() @ X.T.double()).pow(2).sum()
    err32 = ((W - r32.dequantize()).double() @ X.T.double()).pow(2).sum()
    assert float(err16) == pytest.approx(float(err32), rel=0.05)


def test_config_validates_and_round_trips_scale_dtype():
    cfg = config_for("gptq", w_scale_dtype="float16")
    assert config_from_json(cfg.to_json()).w_scale_dtype == "float16"
    assert "fp16-scales" in cfg.describe()
    assert config_for("mixed").w_scale_dtype == "float16"  # as the search's candidates
    with pytest.raises(ValueError, match="w_scale_dtype must be"):
        config_for("absmax", w_scale_dtype="bf16")
    with pytest.raises(ValueError, match="scale dtype must be one of"):
        lq.QLinear(8, 2, w_scale_dtype="int8")


@pytest.mark.parametrize("bits,group,act", [(4, 16, None), (3, 16, None), (8, -1, "dynamic")])
def test_fp16_scales_on_every_device(device, bits, group, act):
    # the CUDA kernels take float32 scales: the layer widens its float16 ones per call
    g = torch.Generator().manual_seed(11)
    lin = torch.nn.Linear(64, 40)
    q = lq.QLinear.from_linear(lin, w_bits=bits, w_group_size=group, w_symmetric=bits == 8, act=act,
                               w_scale_dtype="float16").to(device)
    ref = lq.QLinear.from_linear(lin, w_bits=bits, w_group_size=group, w_symmetric=bits == 8, act=act,
                                 w_scale_dtype="float16")
    assert q.w_scale.dtype == torch.float16 and q.w_scale.device.type == device.type
    x = torch.randn(5, 64, generator=g)
    out = q(x.to(device)).cpu()
    torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-4)
