"""GPTQ (methods/gptq.py): agreement with a slow, unblocked OBS reference written
here, error below RTN's, result layout/conventions, argument errors."""

import pytest
import torch

from llmeasyquant import _reference as R
from llmeasyquant.methods import gptq

pytestmark = pytest.mark.usefixtures("one_thread")

gptq_quantize = gptq.gptq_quantize


def _data(N, K, T, seed, dtype=torch.float64, outliers=True):
    """Weights and correlated calibration inputs with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    mix = torch.randn(K, K, generator=g, dtype=torch.float64) / K ** 0.5
    mix = torch.eye(K, dtype=torch.float64) + 0.5 * mix
    X = torch.randn(T, K, generator=g, dtype=torch.float64) @ mix
    if outliers:
        X[:, : max(1, K // 16)] *= 10
    return W.to(dtype), X.to(dtype)


def _slow_gptq(W, H, bits, group_size, symmetric, damp, act_order):
    """Textbook GPTQ/OBS in float64: one column at a time, full inverse Hessian updated
    by Gaussian elimination (paper eq. 3), no blocking, no Cholesky."""
    W = W.double().clone()
    H = H.double().clone()
    N, K = W.shape
    qmin, qmax = R.qrange(bits)
    g = K if group_size == -1 else group_size
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    def params(wg):
        if symmetric:
            s = R.scale_from_absmax(wg.abs().amax(1), bits)
            return s, torch.zeros_like(s, dtype=torch.int8)
        return R.scale_zp_from_minmax(wg.amin(1), wg.amax(1), bits)

    static = group_size == -1 or act_order
    scales = {}
    if static:
        for gi in range(K // g):
            scales[gi] = params(W[:, gi * g:(gi + 1) * g])
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(K)
    H = H + damp * torch.diagonal(H).mean() * torch.eye(K, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros(N, K, dtype=torch.int8)
    remaining = list(order.tolist())
    loss = 0.0
    for col in order.tolist():
        gi = col // g
        if not static and col % g == 0:
            scales[gi] = params(W[:, col:col + g])
        s, z = scales[gi]
        w = W[:, col].clone()
        q = (torch.round(w / s.double()) + z.double()).clamp(qmin, qmax)
        Q[:, col] = q.to(torch.int8)
        dq = (s * (q.float() - z.float())).double()
        d = Hinv[col, col]
        loss += ((w - dq) ** 2 / d).sum().item()
        remaining.remove(col)
        # optimal update of the not-yet-quantized weights: delta_F = -(w - q)/[H^-1]_qq * H^-1[q, F]
        W[:, remaining] -= ((w - dq) / d)[:, None] * Hinv[col, remaining][None, :]
        W[:, col] = dq
        Hinv = Hinv - Hinv[:, col:col + 1] @ Hinv[col:col + 1, :] / d
    return Q, loss


CASES = [  # bits, group_size, symmetric, act_order
    (4, -1, False, False), (4, -1, True, False), (4, 8, False, False), (4, 8, True, False),
    (3, 6, False, False), (4, 8, False, True), (3, 12, True, True), (2, -1, False, True),
    (8, 4, True, False),
]


@pytest.mark.parametrize("bits,group_size,symmetric,act_order", CASES)
def test_matches_slow_reference_float64(bits, group_size, symmetric, act_order):
    W, X = _data(8, 24, 64, seed=bits * 10 + (group_size % 7))
    H = X.T @ X
    Qref, loss_ref = _slow_gptq(W, H, bits, group_size, symmetric, 0.01, act_order)
    for bs in (5, 7, 128):  # blocks that split groups, do not divide K, or cover everything
        r = gptq_quantize(W, H, bits=bits, group_size=group_size, symmetric=symmetric,
                          block_size=bs, act_order=act_order)
        mism = (r.q != Qref).sum().item()
        assert mism == 0, f"{mism} of {Qref.numel()} values differ (block_size={bs})"
        assert r.loss == pytest.approx(loss_ref, rel=1e-9)


def test_loss_is_damped_output_error():
    # loss == tr(dW H_d dW^T) with H_d the damped Hessian, i.e. ||X W^T - X W_hat^T||^2 + damping
    W, X = _data(6, 32, 200, seed=3)
    H = X.T @ X
    for damp in (0.01, 0.0):
        for ao in (False, True):
            r = gptq_quantize(W, H, bits=4, group_size=8, act_order=ao, damp=damp, block_size=12)
            dW = W - r.dequantize(torch.float64)
            Hd = H + damp * torch.diagonal(H).mean() * torch.eye(32, dtype=torch.float64)
            assert r.loss == pytest.approx(torch.trace(dW @ Hd @ dW.T).item(), rel=1e-9)
    # scaling H changes only the loss
    r1 = gptq_quantize(W, H, bits=4, group_size=8)
    r2 = gptq_quantize(W, H * (2 / 200), bits=4, group_size=8)
    assert torch.equal(r1.q, r2.q) and torch.equal(r1.scale, r2.scale)
    assert r2.loss == pytest.approx(r1.loss * 2 / 200, rel=1e-9)


def test_float32_close_to_float64():
    W, X = _data(32, 64, 256, seed=4)
    r64 = gptq_quantize(W, X.T @ X, bits=4, group_size=16, block_size=16)
    r32 = gptq_quantize(W.float(), (X.T @ X).float(), bits=4, group_size=16, block_size=16)
    assert r32.q.dtype == torch.int8
    # error feedback makes rare flips cascade a little; they must stay rare
    assert (r32.q != r64.q).float().mean().item() < 0.02
    assert r32.loss == pytest.approx(r64.loss, rel=1e-3)


def _out_err(X, W, W_hat):
    return ((X @ (W - W_hat).T) ** 2).sum().item()


@pytest.mark.parametrize("bits,group_size", [(4, 8), (3, -1), (3, 16), (4, -1)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_error_below_rtn(bits, group_size, symmetric, act_order):
    W, X = _data(32, 64, 512, seed=5, dtype=torch.float32)
    r = gptq_quantize(W, X.T @ X, bits=bits, group_size=group_size, symmetric=symmetric,
                      act_order=act_order, block_size=24)
    q, s, z = R.quantize(W, bits, symmetric, group_size)
    W_rtn = R.dequantize(q, s, z, bits, group_size, 64, torch.float32)
    e_gptq, e_rtn = _out_err(X, W, r.dequantize()), _out_err(X, W, W_rtn)
    assert e_gptq < 0.8 * e_rtn, f"GPTQ {e_gptq:.4g} vs RTN {e_rtn:.4g}"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [-1, 8])
def test_layout_and_conventions(bits, symmetric, group_size):
    W, X = _data(10, 40, 80, seed=6, dtype=torch.float32)
    W[0] += 3  # a row with all-positive weights (zero-point at the range end)
    r = gptq_quantize(W, X.T @ X, bits=bits, group_size=group_size, symmetric=symmetric)
    qmin, qmax = R.qrange(bits)
    G = 1 if group_size == -1 else 40 // group_size
    assert r.q.shape == (10, 40) and r.q.dtype == torch.int8
    assert r.scale.shape == (10, G) and r.scale.dtype == torch.float32
    assert r.zero_point.shape == (10, G) and r.zero_point.dtype == torch.int8
    assert r.q.min() >= qmin and r.q.max() <= qmax
    assert (r.scale > 0).all() and torch.isfinite(r.scale).all()
    assert r.zero_point.min() >= qmin and r.zero_point.max() <= qmax
    if symmetric:
        assert (r.zero_point == 0).all()
    assert isinstance(r.loss, float) and r.loss >= 0
    # dequantize() is the reference dequantization; re-quantizing the result with the
    # returned scales gives q back (the result lives on the convention's grid)
    qs = R.pack_bits(r.q, bits)
    deq = R.dequantize(qs, r.scale, r.zero_point, bits, group_size, 40, torch.float32)
    assert torch.equal(r.dequantize(), deq)
    assert torch.equal(R.quantize_static(deq, r.scale, r.zero_point, bits, group_size), qs)
    assert r.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_static_scales_match_rtn_scales():
    # per-row scales, and act_order's static group scales, come from the original W
    W, X = _data(12, 32, 64, seed=7, dtype=torch.float32)
    H = X.T @ X
    for gs, ao in ((-1, False), (-1, True), (8, True)):
        for sym in (False, True):
            r = gptq_quantize(W, H, bits=4, group_size=gs, symmetric=sym, act_order=ao)
            _, s, z = R.quantize(W, 4, sym, gs)
            assert torch.equal(r.scale, s) and torch.equal(r.zero_point, z)


def test_dead_columns_and_determinism():
    W, X = _data(8, 16, 40, seed=8, dtype=torch.float32)
    X[:, [3, 11]] = 0  # inputs that are never active
    H = X.T @ X
    for ao in (False, True):
        r = gptq_quantize(W, H, bits=4, group_size=8, act_order=ao)
        assert (r.dequantize()[:, [3, 11]] == 0).all()
        r2 = gptq_quantize(W, H, bits=4, group_size=8, act_order=ao)
        assert torch.equal(r.q, r2.q) and torch.equal(r.scale, r2.scale) and r.loss == r2.loss
    # all-zero H: every column dead, still a valid (all-zero) result
    r = gptq_quantize(W, torch.zeros(16, 16), bits=4)
    assert (r.dequantize() == 0).all()


def test_inputs_not_modified():
    W, X = _data(4, 16, 32, seed=9, dtype=torch.float32)
    X[:, 0] = 0
    H = X.T @ X
    W0, H0 = W.clone(), H.clone()
    gptq_quantize(W, H, bits=4, group_size=4, act_order=True)
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_errors():
    W, X = _data(4, 24, 32, seed=10, dtype=torch.float32)
    H = X.T @ X
    with pytest.raises(ValueError, match=r"group_size.*K=24.*\[1, 2, 3, 4, 6, 8, 12, 24\]"):
        gptq_quantize(W, H, bits=4, group_size=5)
    for gs in (0, -2):
        with pytest.raises(ValueError, match="group_size"):
            gptq_quantize(W, H, bits=4, group_size=gs)
    with pytest.raises(ValueError, match=r"\[24, 24\].*\[4, 24\].*\[23, 23\]"):
        gptq_quantize(W, H[:23, :23], bits=4)
    with pytest.raises(ValueError, match=r"\[24, 24\]"):
        gptq_quantize(W, H[0], bits=4)
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantize(W[0], H, bits=4)
    for bad in (float("nan"), float("inf")):
        Hb = H.clone()
        Hb[1, 2] = bad
        with pytest.raises(ValueError, match="H contains NaN or Inf"):
            gptq_quantize(W, Hb, bits=4)
    Wb = W.clone()
    Wb[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(Wb, H, bits=4)
    for bits in (1, 9):
        with pytest.raises(ValueError, match="bits"):
            gptq_quantize(W, H, bits=bits)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(W, H, bits=4, block_size=0)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(W, H, bits=4, damp=-0.1)
    # indefinite H without damping
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize(W, -H - torch.eye(24), bits=4, damp=0.0)
    # block_size not dividing K is fine
    assert gptq_quantize(W, H, bits=4, group_size=8, block_size=7).q.shape == (4, 24)


def test_stacked_rows_solve_as_separate_layers():
    """Rows are independent given H: one solve of stacked weights (what the
    model driver does for linears that read the same input) gives each
    linear's codes and scales as its own solve (scales up to float rounding
    of the lazy update where group scales come from updated weights)."""
    g = torch.Generator().manual_seed(5)
    K = 96
    X = torch.randn(512, K, generator=g) * torch.rand(K, generator=g) * 3
    H = X.double().T @ X.double()
    Ws = [torch.randn(n, K, generator=g) for n in (40, 8, 8)]
    for act_order in (True, False):
        alone = [gptq_quantize(W, H, bits=4, group_size=32, act_order=act_order) for W in Ws]
        both = gptq_quantize(torch.cat(Ws), H, bits=4, group_size=32, act_order=act_order)
        assert torch.equal(both.q, torch.cat([r.q for r in alone]))
        assert torch.allclose(both.scale, torch.cat([r.scale for r in alone]), rtol=1e-6, atol=0)
        assert torch.equal(both.zero_point, torch.cat([r.zero_point for r in alone]))


def test_model_driver_solves_shared_input_linears_together():
    """On a real (tiny) Llama, q/k/v and gate/up form one unit each, o and
    down are alone, and block 0's quantized linears equal per-linear GPTQ
    solves from that block's float inputs (the driver's single Hessian per
    unit is the Hessian each of its linears would have had)."""
    import copy

    import llmeasyquant as lq
    import tiny_models
    from llmeasyquant.methods._common import quantized_from
    from llmeasyquant.methods.gptq import GPTQConfig, shared_input_units
    from llmeasyquant.models.extract import extract
    from llmeasyquant.pipeline import BlockContext
    from llmeasyquant.sharding import Shard

    model = tiny_models.build("llama", seed=3)
    spec = extract(model)
    names = list(spec.linears_of(0))
    ctx = BlockContext(index=0, key="model.layers.0", block=model.model.layers[0], names=names, shard=Shard(),
                       batches=1)
    units = shared_input_units(spec, ctx)
    assert units == [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
    assert shared_input_units(spec, BlockContext(index=0, key="model.layers.0", block=ctx.block,
                                                 names=["self_attn.k_proj", "mlp.down_proj"], shard=Shard(),
                                                 batches=1)) == [("self_attn.k_proj",), ("mlp.down_proj",)]

    calib = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    float_model = copy.deepcopy(model)
    H = {n: torch.zeros(64, 64, dtype=torch.float64) for n in names if n != "mlp.down_proj"}
    block = float_model.model.layers[0]

    def gram(n, x):
        x = x.reshape(-1, 64).double()
        H[n].add_(x.T @ x)

    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: gram(n, a[0])) for n in H]
    with torch.no_grad():
        for ids in calib:
            float_model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    lq.quantize(model, "gptq", calib=calib, progress=False, w_bits=4, w_group_size=16)
    cfg = GPTQConfig(w_bits=4, w_group_size=16)
    for n in H:
        r = gptq_quantize(block.get_submodule(n).weight.detach().float(), H[n], bits=4, group_size=16,
                          act_order=cfg.act_order)
        want = quantized_from(block.get_submodule(n), cfg, r.q, r.scale, r.zero_point)
        got = model.model.layers[0].get_submodule(n)
        assert torch.equal(got.qweight, want.qweight), n
        assert torch.equal(got.w_zero, want.w_zero), n
        assert torch.allclose(got.w_scale, want.w_scale, rtol=1e-6, atol=0), n
