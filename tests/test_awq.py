"""AWQ (methods/awq.py): scale search never worse than RTN and better on outlier
activations, scale folding is exact before quantization, clip search never worse
than no clipping, argument errors, determinism."""

import pytest
import torch

from llmeasyquant import _reference as R
from llmeasyquant.methods import awq

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(Ns, K, T, seed, outlier_mult=(20.0, 35.0, 50.0)):
    """Weights [N_i, K] and activations whose first channels are 20-50x larger."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, K, generator=g) * 0.05 for n in Ns]
    x = torch.randn(T, K, generator=g)
    for j, m in enumerate(outlier_mult):
        x[:, 3 * j + 1] *= m
    return ws, x


def _rtn(W, bits, gs, sym):
    q, s, z = R.quantize(W, bits, sym, gs)
    return R.dequantize(q, s, z, bits, gs, W.shape[1], torch.float32)


def _mse(x, ws, ws_hat):
    W, Wh = torch.cat(ws), torch.cat(ws_hat)
    return ((x.double() @ (W - Wh).double().T) ** 2).mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("gs", [-1, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_fake_quantize_rtn_is_reference(bits, gs, sym):
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(bits)) * 3
    W[0] = W[0].abs()
    assert torch.equal(awq.fake_quantize_rtn(W, bits, gs, sym), _rtn(W, bits, gs, sym))


@pytest.mark.parametrize("bits,gs,sym", [(4, 16, False), (4, 16, True), (3, -1, False), (4, -1, True)])
def test_scale_search_beats_rtn_on_outliers(bits, gs, sym):
    ws, x = _data([24, 8, 8], 64, 256, seed=1)  # q/k/v-like: three linears, one input
    res = awq.awq_search_scale(ws, x, bits=bits, group_size=gs, symmetric=sym)
    s = res.scale
    assert s.shape == (64,) and s.dtype == torch.float32 and (s > 0).all()
    assert len(res.losses) == len(res.ratios) == 20 and res.ratios[0] == 0.0
    assert res.ratio in res.ratios and res.losses[res.ratios.index(res.ratio)] == min(res.losses)
    # independent recomputation: losses[0] is plain RTN, the chosen scale beats it
    e_rtn = _mse(x, ws, [_rtn(W, bits, gs, sym) for W in ws])
    e_awq = _mse(x, ws, [_rtn(awq.apply_scale_to_linear_weight(W, s), bits, gs, sym) / s for W in ws])
    assert res.losses[0] == pytest.approx(e_rtn, rel=1e-4)
    assert min(res.losses) == pytest.approx(e_awq, rel=1e-4)
    assert e_awq < 0.9 * e_rtn, f"AWQ {e_awq:.4g} vs RTN {e_rtn:.4g}"
    # the same through the deployment path: x / s feeds the quantized W * s
    deployed = torch.cat([(x / s) @ _rtn(W * s, bits, gs, sym).T for W in ws], dim=1)
    ref = torch.cat([x @ W.T for W in ws], dim=1)
    assert ((deployed - ref) ** 2).mean().item() == pytest.approx(e_awq, rel=1e-3)


def test_never_worse_than_rtn_without_outliers():
    ws, x = _data([16], 32, 100, seed=2, outlier_mult=())
    res = awq.awq_search_scale(ws, x, bits=4, group_size=8)
    assert min(res.losses) <= res.losses[0]
    s = res.scale
    e_awq = _mse(x, ws, [_rtn(ws[0] * s, 4, 8, False) / s])
    assert e_awq <= _mse(x, ws, [_rtn(ws[0], 4, 8, False)]) * (1 + 1e-5)


def test_scale_folding_is_exact_before_quantization():
    ws, x = _data([20], 48, 64, seed=3)
    s = awq.awq_search_scale(ws, x, bits=4, group_size=16).scale
    W = ws[0]
    out = (x / s) @ awq.apply_scale_to_linear_weight(W, s).T
    torch.testing.assert_close(out, x @ W.T, rtol=1e-5, atol=1e-5)
    assert awq.apply_scale_to_linear_weight(W.bfloat16(), s).dtype == torch.bfloat16


def test_gram_and_direct_losses_agree():
    # duplicating every token keeps each mean loss and switches the loss route (T > K)
    ws, x = _data([8], 48, 40, seed=4)
    a = awq.awq_search_scale(ws, x, bits=4, group_size=8)
    b = awq.awq_search_scale(ws, torch.cat([x, x]), bits=4, group_size=8)
    assert a.losses == pytest.approx(b.losses, rel=1e-4) and a.ratio == b.ratio


def test_custom_forward():
    ws, x = _data([8, 8], 32, 64, seed=5)
    lin = lambda w, xx: torch.cat([xx @ wi.T for wi in w], dim=1)  # noqa: E731
    a = awq.awq_search_scale(ws, x, bits=4, group_size=8)
    b = awq.awq_search_scale(ws, x, bits=4, group_size=8, forward=lin)
    assert a.losses == pytest.approx(b.losses, rel=1e-4) and a.ratio == b.ratio
    # a gated block (SiLU(x Wg^T) * x Wu^T), as used for gate/up
    mlp = lambda w, xx: torch.nn.functional.silu(xx @ w[0].T) * (xx @ w[1].T)  # noqa: E731
    c = awq.awq_search_scale(ws, x, bits=4, group_size=8, forward=mlp)
    assert min(c.losses) <= c.losses[0] and c.scale.shape == (32,)


@pytest.mark.parametrize("gs,sym", [(16, False), (16, True), (-1, False), (8, True)])
def test_clip_never_increases_group_error(gs, sym):
    ws, x = _data([12], 64, 300, seed=6)
    W = ws[0]
    W[0, :16] += 0.3  # an all-positive group (asymmetric clipping of one side)
    n_sample = 64
    clip = awq.awq_search_clip(W, x, bits=4, group_size=gs, symmetric=sym, n_sample_tokens=n_sample)
    G = 1 if gs == -1 else 64 // gs
    g = 64 // G
    assert clip.shape == (12, G) and clip.dtype == torch.float32
    absmax = W.reshape(12, G, g).abs().amax(-1)
    assert (clip <= absmax).all() and (clip >= 0.5 * absmax * (1 - 1e-6)).all()
    Wc = awq.apply_clip(W, clip)
    assert Wc.shape == W.shape and (Wc.reshape(12, G, g).abs() <= clip[..., None]).all()
    xs = x[:: max(1, 300 // n_sample)].double()  # the tokens the search uses

    def group_err(Wq):
        d = (Wq - W).double().reshape(12, G, g)
        xg = xs.reshape(-1, G, g)
        return (torch.einsum("tgj,ngj->tng", xg, d) ** 2).mean(0)  # [N, G]

    e_clip = group_err(_rtn(Wc, 4, gs, sym))
    e_none = group_err(_rtn(W, 4, gs, sym))
    assert (e_clip <= e_none * (1 + 1e-5) + 1e-12).all()
    assert (clip < absmax).any(), "expected some group to be clipped"
    assert e_clip.sum() < e_none.sum()
    # deterministic
    assert torch.equal(clip, awq.awq_search_clip(W, x, bits=4, group_size=gs, symmetric=sym,
                                                 n_sample_tokens=n_sample))


def test_clip_gram_and_direct_agree():
    # T <= g uses the direct error, T > g the per-group Gram matrix; same choice
    ws, x = _data([10], 32, 16, seed=7)
    a = awq.awq_search_clip(ws[0], x, bits=3, group_size=16)
    b = awq.awq_search_clip(ws[0], torch.cat([x, x]), bits=3, group_size=16)
    assert torch.equal(a, b)


def test_deterministic_and_inputs_untouched():
    ws, x = _data([8, 4], 32, 50, seed=8)
    w0, x0 = [w.clone() for w in ws], x.clone()
    a = awq.awq_search_scale(ws, x, bits=4, group_size=8)
    b = awq.awq_search_scale(ws, x, bits=4, group_size=8)
    assert torch.equal(a.scale, b.scale) and a.losses == b.losses
    assert all(torch.equal(u, v) for u, v in zip(ws, w0)) and torch.equal(x, x0)


def test_errors():
    ws, x = _data([4], 24, 10, seed=9)
    W = ws[0]
    with pytest.raises(ValueError, match=r"group_size.*K=24.*\[1, 2, 3, 4, 6, 8, 12, 24\]"):
        awq.awq_search_scale([W], x, bits=4, group_size=5)
    with pytest.raises(ValueError, match=r"group_size.*K=24"):
        awq.awq_search_clip(W, x, bits=4, group_size=7)
    with pytest.raises(ValueError, match="group_size"):
        awq.awq_search_scale([W], x, bits=4, group_size=0)
    with pytest.raises(ValueError, match=r"weights\[1\].*\[4, 20\]"):
        awq.awq_search_scale([W, W[:, :20]], x, bits=4, group_size=4)
    with pytest.raises(ValueError, match=r"K=24.*\[10, 20\]"):
        awq.awq_search_scale([W], x[:, :20], bits=4, group_size=4)
    with pytest.raises(ValueError, match="non-empty list"):
        awq.awq_search_scale(W, x, bits=4, group_size=4)
    with pytest.raises(ValueError, match="bits"):
        awq.awq_search_scale([W], x, bits=1, group_size=4)
    xb = x.clone()
    xb[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        awq.awq_search_scale([W], xb, bits=4, group_size=4)
    with pytest.raises(ValueError, match="max_shrink"):
        awq.awq_search_clip(W, x, bits=4, group_size=4, max_shrink=1.0)
    with pytest.raises(ValueError, match=r"clip \[N, G\]"):
        awq.apply_clip(W, torch.ones(4, 5))
    with pytest.raises(ValueError, match=r"s \[K\]"):
        awq.apply_scale_to_linear_weight(W, torch.ones(23))
