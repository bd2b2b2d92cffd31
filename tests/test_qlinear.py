"""QLinear: against nn.Linear loaded with the dequantized weights (isolates the
kernel error from the quantization error), modes, state_dict, compile."""

import copy

import pytest
import torch
from torch import nn

from conftest import R, lq

CONFIGS = [
    dict(w_bits=8, act="dynamic"),
    dict(w_bits=8, act="dynamic", act_symmetric=False),
    dict(w_bits=8, act="static"),
    dict(w_bits=8, act="ema", act_symmetric=False),
    dict(w_bits=8, act=None),
    dict(w_bits=8, act=None, w_symmetric=False, w_group_size=16),
    dict(w_bits=4, act=None, w_group_size=16),
    dict(w_bits=4, act=None, w_symmetric=False, w_group_size=-1),
    dict(w_bits=3, act=None, w_symmetric=False, w_group_size=16),
    dict(w_bits=2, act=None, w_symmetric=False, w_group_size=16),
]


def _linear(K=48, N=24, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias)


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlinear_vs_dequantized_linear(cfg, dtype):
    lin = _linear()
    q = lq.QLinear.from_linear(lin, **cfg)
    if cfg["act"] == "static":
        q.set_static_range(-3.0, 3.0)
    x = _x(2, 5, 48).to(dtype)
    ref_lin = nn.Linear(48, 24)
    with torch.no_grad():
        ref_lin.weight.copy_(q.dequantize())
        ref_lin.bias.copy_(lin.bias)
    ref = ref_lin(x.float())
    out = q(x)
    assert out.shape == (2, 5, 24) and out.dtype == dtype
    err = (out.float() - ref).abs().max().item()
    if cfg["act"] is None:
        bound = 1e-5 if dtype == torch.float32 else 0.02  # only float rounding
    else:
        # activation quantization: |x| step/2 per element times sum |w| per row
        xmax = 3.0 if cfg["act"] == "static" else x.float().abs().max().item()
        bound = xmax / 127 * ref_lin.weight.abs().sum(1).max().item() + (0.05 if dtype != torch.float32 else 0)
    assert err <= bound, f"{err} > {bound}"
    # and the quantized layer stays close to the float layer
    rel = (out.float() - lin(x.float())).norm() / lin(x.float()).norm()
    assert rel < {8: 0.03, 4: 0.15, 3: 0.3, 2: 0.6}[cfg["w_bits"]]


@pytest.mark.parametrize("act", ["dynamic", "static", "ema"])
def test_simulated_w4a8_matches_integer_math(act):
    lin = _linear(K=64, N=12)
    q = lq.QLinear.from_linear(lin, w_bits=4, w_group_size=16, w_symmetric=False, act=act, act_symmetric=False)
    assert not q.int8_gemm and "simulated" in repr(q)
    if act == "static":
        q.set_static_range(-2.0, 3.0)
    x = _x(5, 64)
    if act == "ema":
        q.ema_update = False
        q.ema_state.copy_(torch.tensor([3.0, -2.5, 3.0, 1.0]))
    # the integer computation: sum_g s_x * s_w[n,g] * sum_k (qx - zx)(qw - zw)
    if act == "dynamic":
        qx, sx, zx = R.quantize(x, 8, False, -1)
    elif act == "static":
        qx, sx, zx = R.quantize_static(x, q.act_scale, q.act_zero, 8, 0), q.act_scale, q.act_zero
    else:
        qx, sx, zx = R.ema_quantize_(x, q.ema_state.clone(), 0.9, 1e-5, 8, False, False)
    qw = R.unpack_int4(q.qweight, 64).double() - q.w_zero.double().repeat_interleave(16, 1)
    xi = qx.double() - zx.double().reshape(-1, 1)
    acc = torch.einsum("mgk,ngk->mng", xi.reshape(5, 4, 16), qw.reshape(12, 4, 16))
    ref = (acc * q.w_scale.double().unsqueeze(0)).sum(-1) * sx.double().reshape(-1, 1) + q.bias.double()
    torch.testing.assert_close(q(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_dynamic_matches_reference_exactly():
    lin = _linear(K=33, N=10)
    q = lq.QLinear.from_linear(lin)
    x = _x(7, 33)
    ref = R.dynamic_quant_linear(x, q.qweight, q.w_scale.view(-1), q.w_sum, q.bias, True)
    assert torch.equal(q(x), ref)


def test_conv1d_gpt2():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 48)  # nf=24 outputs, nx=48 inputs, weight [48, 24]
    torch.nn.init.normal_(conv.weight, std=0.1)
    q = lq.QLinear.from_linear(conv, act=None)
    assert (q.in_features, q.out_features) == (48, 24)
    x = _x(3, 48)
    torch.testing.assert_close(q(x), conv(x), rtol=0.02, atol=0.02)
    torch.testing.assert_close(q.dequantize(), conv.weight.t(), rtol=0, atol=conv.weight.abs().max().item() / 127)


def test_no_bias_and_m1():
    q = lq.QLinear.from_linear(_linear(bias=False))
    assert q.bias is None
    assert q(_x(1, 48)).shape == (1, 24)
    assert q(_x(48)).shape == (24,)


@pytest.mark.parametrize("cfg", CONFIGS[:5] + CONFIGS[6:], ids=str)
def test_state_dict_round_trip(cfg):
    q = lq.QLinear.from_linear(_linear(), **cfg)
    if cfg["act"] == "static":
        q.set_static_range(-2.0, 2.5)
    if cfg["act"] == "ema":
        q(_x(4, 48))
    sd = q.state_dict()
    assert "w_sum" not in sd  # derived, recomputed on load
    fresh = lq.QLinear(48, 24, **cfg)
    fresh.load_state_dict(sd)
    x = _x(3, 48, seed=5)
    if cfg["act"] == "ema":
        q.ema_update = fresh.ema_update = False
    assert torch.equal(fresh(x), q(x))
    assert fresh.memory_bytes() == q.memory_bytes()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_act_order_in_perm(cfg):
    """An in_perm layer computes base(x[..., perm]) and dequantizes to the weight
    in the input's order; its state round-trips; the permutation is validated."""
    base = lq.QLinear.from_linear(_linear(), **cfg)
    if cfg["act"] == "static":
        base.set_static_range(-3.0, 3.0)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(4))
    q = lq.QLinear.from_spec({**base.spec(), "in_perm": True})
    q.load_state_dict({**base.state_dict(), "in_perm": perm})
    assert q.spec()["in_perm"] is True and "act-order" in repr(q)
    if cfg["act"] == "ema":
        q.ema_update = base.ema_update = False
    x = _x(40, 3, 64)[..., 8:56]  # non-contiguous rows
    assert torch.equal(q(x), base(x[..., perm].contiguous()))
    w = q.dequantize()
    assert torch.equal(w[:, perm], base.dequantize())
    if cfg["act"] is None:
        ref = torch.nn.functional.linear(x, w, q.bias)
        assert (q(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    fresh = lq.QLinear.from_spec(q.spec())
    fresh.load_state_dict(q.state_dict())
    if cfg["act"] == "ema":
        fresh.ema_update = False
    assert torch.equal(fresh(x), q(x))
    assert q.half().in_perm.dtype == torch.int64
    bad = {**q.state_dict(), "in_perm": torch.zeros(48, dtype=torch.int64)}
    with pytest.raises(ValueError, match="in_perm must be a permutation of 0..47"):
        lq.QLinear.from_spec(q.spec()).load_state_dict(bad)
    with pytest.raises(ValueError, match="permutation"):
        q.set_in_perm(torch.arange(47))
    with pytest.raises(RuntimeError, match="in_perm=False"):
        base.set_in_perm(perm)


def test_state_dict_shape_mismatch_is_clear():
    q8 = lq.QLinear.from_linear(_linear(), act=None)
    q4 = lq.QLinear(48, 24, w_bits=4, act=None)
    with pytest.raises(ValueError, match=r"'qweight' has shape \(24, 48\), this layer expects \(24, 24\)"):
        q4.load_state_dict(q8.state_dict())


def test_memory_bytes_counts_real_storage():
    q = lq.QLinear.from_linear(_linear(K=64, N=32), w_bits=4, w_group_size=16, w_symmetric=False, act=None)
    # packed weights + fp32 scales + int8 zero-points + fp32 bias
    assert q.memory_bytes() == 32 * 32 + 32 * 4 * 4 + 32 * 4 + 32 * 4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K", [64, 67])
def test_memory_bytes_is_the_packed_size(bits, K):
    g = 16 if K % 16 == 0 else -1
    q = lq.QLinear.from_linear(_linear(K=K, N=10), w_bits=bits, w_group_size=g, w_symmetric=False, act=None)
    G = K // 16 if g > 0 else 1
    packed = {8: K, 4: (K + 1) // 2, 3: (K + 7) // 8 * 3, 2: (K + 7) // 8 * 2}[bits]
    assert q.qweight.shape == (10, packed)
    assert q.memory_bytes() == 10 * packed + 10 * G * 4 + 10 * G + 10 * 4
    assert sum(t.numel() * t.element_size() for t in q.state_dict().values()) == q.memory_bytes()


def test_ema_mode_updates_and_freezes():
    q = lq.QLinear.from_linear(_linear(), act="ema", ema_alpha=0.5)
    q(_x(2, 48) * 10)
    s1 = q.ema_state.clone()
    q(_x(2, 48, seed=7))
    assert q.ema_state[3] == 2 and not torch.equal(q.ema_state, s1)
    q.ema_update = False
    s2 = q.ema_state.clone()
    q(_x(2, 48, seed=8))
    assert torch.equal(q.ema_state, s2)


def test_extra_repr_says_what_it_holds():
    r = repr(lq.QLinear.from_linear(_linear(), w_bits=4, w_group_size=16, act=None))
    assert "w=4-bit group(16) symmetric" in r and "weight-only" in r
    r = repr(lq.QLinear.from_linear(_linear(), act="dynamic", act_symmetric=False))
    assert "w=8-bit per-channel symmetric" in r and "dynamic per-token asymmetric" in r


def test_inference_mode():
    q = lq.QLinear.from_linear(_linear())
    x = _x(4, 48)
    with torch.inference_mode():
        out = q(x)
    assert torch.equal(out, q(x))


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2], CONFIGS[3], CONFIGS[6]], ids=str)
def test_torch_compile_fullgraph(cfg):
    q = lq.QLinear.from_linear(_linear(), **cfg)
    if cfg["act"] == "static":
        q.set_static_range(-3.0, 3.0)
    x = _x(5, 48)
    eager = copy.deepcopy(q)
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    for step in range(2):
        xs = x * (step + 1)
        assert torch.equal(compiled(xs), eager(xs)), f"step {step}"
    if cfg["act"] == "ema":
        assert torch.equal(q.ema_state, eager.ema_state)  # buffer mutation survived compilation


def test_torch_compile_inductor_fullgraph():
    q = lq.QLinear.from_linear(_linear())
    x = _x(5, 48)
    compiled = torch.compile(q, fullgraph=True)
    assert torch.equal(compiled(x), q(x))


def test_replace_linear_skips_lm_head_and_filters():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(16, 32)
            self.block = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
            self.lm_head = nn.Linear(16, 10)

        def forward(self, x):
            return self.lm_head(self.block(self.up(x)))

    m = Tiny()
    x = _x(3, 16)
    ref = m(x)
    lq.replace_linear(m, filter_fn=lambda name, mod: name != "block.2")
    assert isinstance(m.up, lq.QLinear) and isinstance(m.block[0], lq.QLinear)
    assert isinstance(m.block[2], nn.Linear) and isinstance(m.lm_head, nn.Linear)
    assert (m(x) - ref).norm() / ref.norm() < 0.05
