"""Mixture-of-experts architectures (Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss,
DeepSeek-V3) on tiny random-weight models built locally: the fused 3-D
experts unfused into per-expert linears with the same function, every method
calibrating each expert on its own routed tokens, experts that saw no token
reported, save -> load, and the clear refusals.

Thresholds are relative to the float logits. Forward passes run under no_grad."""

import copy
import logging

import pytest
import torch

from conftest import lq
from llmeasyquant.methods._common import fold_scales
from llmeasyquant.methods.simquant import SimQuantConfig, make_cache
from llmeasyquant.models.experts import ExpertMLP, UnfusedExperts
from llmeasyquant.models.extract import extract
from tiny_models import MOE, N_EXPERTS, TOP_K, awq_save_load, build, calib_batches, max_rel, token_ids

W8_METHODS = [("absmax", {}), ("zeroquant", {"w_bits": 8, "w_group_size": 16}),
              ("smoothquant", {"alpha_grid": (0.4, 0.6)}), ("awq", {"w_bits": 8, "w_group_size": 16, "grid": 5}),
              ("gptq", {"w_bits": 8, "w_group_size": 16})]
# blocks holding experts in the tiny configs (the others are dense)
MOE_BLOCKS = {"mixtral": (0, 1), "qwen2_moe": (0, 1), "qwen3_moe": (1,), "gpt_oss": (0, 1), "deepseek_v3": (1,),
              "deepseek_v3-q": (1,)}
KV_SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")


def _ids(T=20, seed=9):
    return token_ids(2, T, seed)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield





def _routed(model, ids):
    """Logits [B*T, V] and, per token, its experts in every MoE block (sorted)."""
    seen = []
    spec = extract(model)
    hooks = [spec.blocks[i].get_submodule(spec.arch.moe.router).register_forward_hook(
        lambda m, a, o: seen.append(o[2].sort(dim=-1).values)) for i in range(len(spec.blocks)) if spec.experts_of(i)]
    try:
        logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits.reshape(-1, logits.shape[-1]), torch.cat(seen, dim=-1)


def _close_where_routing_held(out, ref, routes, ref_routes, tol=0.05, max_flips=0.1):
    """A token whose experts changed (a near-tie of the router, flipped by the
    perturbation upstream) jumps discretely: that is routing, not
    quantization error. Such tokens must be rare; every other token's logits
    must be close (relative to the float logits' scale)."""
    flipped = (routes != ref_routes).any(dim=-1)
    assert flipped.float().mean().item() <= max_flips, f"{int(flipped.sum())} of {flipped.numel()} tokens rerouted"
    keep = ~flipped
    err = ((out[keep] - ref[keep]).abs().max() / ref.abs().max()).item()
    assert err < tol, err


@pytest.fixture(scope="module")
def float_models():
    return {name: build(name) for name in MOE}


@pytest.mark.parametrize("name", MOE)
def test_unfusing_keeps_the_function(name):
    """The logits of transformers' eager experts loop up to one elementwise
    rounding (and of its default grouped_mm within fp32 rounding), in fp32 and
    bf16. Not bit for bit on every CPU: eager applies SiLU to the strided
    halves of its fused gate_up product, the unfused experts to the contiguous
    outputs of two linears (the linears themselves agree exactly), and
    PyTorch's vectorized and strided elementwise loops may round differently:
    identical on AVX2 CPUs, 3-7e-8 relative in fp32 on an AVX-512 EPYC
    (2026-12-02; bf16 identical)."""
    for dtype in (torch.float32, torch.bfloat16):
        model = build(name).to(dtype)
        ids = _ids()
        default = model(ids).logits
        model.set_experts_implementation("eager")
        ref = model(ids).logits
        spec = extract(model)
        blocks = [i for i in range(2) if spec.experts_of(i)]
        assert tuple(blocks) == MOE_BLOCKS[name]
        assert all(isinstance(spec.blocks[i].mlp.experts, UnfusedExperts) for i in blocks)
        out = model(ids).logits
        assert max_rel(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2), (name, dtype, max_rel(out, ref))
        # grouped_mm sums in another order: its rounding, relative to the logits' scale
        assert max_rel(out, default) < (1e-5 if dtype == torch.float32 else 2e-2), (name, dtype)
        assert not any(n.endswith("gate_up_proj") for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", [n for n in MOE if n != "gpt_oss"])  # gpt-oss interleaves gate / up, with biases
def test_unfused_linears_are_the_fused_products_bit_for_bit(name):
    """What is exact on every CPU: each expert's gate / up / down linears give
    the fused gate_up / down products bit for bit (the weights are the fused
    slices, copied)."""
    model = build(name)
    fused = {i: copy.deepcopy(layer.mlp.experts) for i, layer in enumerate(model.model.layers)
             if i in MOE_BLOCKS[name]}
    spec = extract(model)
    x = torch.randn(13, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for i, f in fused.items():
        unfused = spec.blocks[i].mlp.experts
        for e, expert in enumerate(unfused):
            gate, up = torch.nn.functional.linear(x, f.gate_up_proj[e]).chunk(2, dim=-1)
            assert torch.equal(expert.gate_proj(x), gate) and torch.equal(expert.up_proj(x), up), (name, i, e)
            h = torch.randn(13, f.down_proj.shape[-1], generator=torch.Generator().manual_seed(e))
            assert torch.equal(expert.down_proj(h), torch.nn.functional.linear(h, f.down_proj[e])), (name, i, e)


@pytest.mark.parametrize("name", MOE)
def test_spec_linears_groups_router(name):
    model = build(name)
    spec = extract(model)
    assert spec.declared and len(spec.blocks) == 2 and spec.extra_linears == ["lm_head"]
    moe = spec.arch.moe
    for i in range(2):
        linears = spec.linears_of(i)
        for n in linears:
            assert isinstance(spec.blocks[i].get_submodule(n), torch.nn.Linear), (i, n)
        experts = spec.experts_of(i)
        if i in MOE_BLOCKS[name]:
            assert experts == tuple(f"mlp.experts.{e}" for e in range(N_EXPERTS))
            assert all(f"mlp.experts.{e}.{p}" in linears for e in range(N_EXPERTS)
                       for p in ("gate_proj", "up_proj", "down_proj"))
            assert set(moe.shared) <= set(linears)
        else:
            assert experts == () and set(moe.dense) <= set(linears)
        # the router and the float gates are no target
        assert not any(n.startswith(moe.router + ".") or n == moe.router for n in linears)
        assert not set(moe.float_linears) & set(linears)
    if name == "qwen2_moe":
        assert moe.float_linears == ("mlp.shared_expert_gate",)
        model.get_submodule(f"model.layers.0.{moe.float_linears[0]}")  # exists, and is kept float
    # gpt-oss keeps its expert biases
    if name == "gpt_oss":
        e = spec.blocks[0].mlp.experts[0]
        assert isinstance(e, ExpertMLP) and e.down_proj.bias is not None and e.gate_proj.bias is not None


@pytest.mark.parametrize("name", MOE)
def test_folding_is_exact_before_quantization(name):
    model = build(name).double()
    ids = _ids()
    spec = extract(model)
    ref = model(ids).logits
    g = torch.Generator().manual_seed(3)
    n = 0
    for i, block in enumerate(spec.blocks):
        for grp in spec.groups_of(i):
            m = block.get_submodule(grp.linears[0])
            s = torch.rand(m.weight.shape[1], generator=g, dtype=torch.float64) * 4 + 0.25
            fold_scales(block, grp, s)
            n += 1
    assert n >= 2
    # RMSNorms compute in float32 whatever the model's dtype
    assert max_rel(model(ids).logits, ref) < 1e-5


@pytest.mark.parametrize("method,opts", W8_METHODS, ids=[m for m, _ in W8_METHODS])
@pytest.mark.parametrize("name", MOE)
def test_methods_at_w8_stay_close_to_float(float_models, name, method, opts):
    model = copy.deepcopy(float_models[name])
    ids = _ids()
    ref, ref_routes = _routed(model, ids)
    lq.quantize(model, method, calib=calib_batches(), progress=False, **opts)
    spec = extract(model)
    assert sum(isinstance(m, lq.QLinear) for m in model.modules()) == len(spec.linear_paths())
    for p in spec.linear_paths():
        assert isinstance(model.get_submodule(p), lq.QLinear), p
    out, routes = _routed(model, ids)
    assert torch.isfinite(out).all()
    _close_where_routing_held(out, ref, routes, ref_routes)


@pytest.mark.parametrize("name", KV_SUPPORTED)
def test_simquant_kv_cache(float_models, name):
    model = copy.deepcopy(float_models[name])
    ids = _ids(T=20)[:1]
    ref = model(ids).logits
    cache = make_cache(model, SimQuantConfig(k_bits=8, v_bits=8, chunk_size=4, residual_length=0))
    out = model(ids, cache=cache, use_cache=True).logits
    assert max_rel(out, ref) < 0.05
    lq.quantize(model, "simquant", k_bits=8, v_bits=8, chunk_size=4, residual_length=64, progress=False)
    gen = model.generate(ids[:, :4], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         return_dict_in_generate=True)
    assert type(gen.cache).__name__ == "SimQuantCache" and gen.sequences.shape[1] == 16


def test_simquant_refuses_deepseek_mla():
    with pytest.raises(ValueError, match="got 'deepseek_v3', whose attention it cannot hook: DeepSeek-V3's "
                                         "multi-head latent attention caches the compressed latent"):
        lq.quantize(build("deepseek_v3"), "simquant", progress=False)


@pytest.mark.parametrize("name", MOE)
def test_save_load_bit_identical(float_models, name, tmp_path):
    # AWQ W4 g16: folded per-expert scales, packed weights, zero-points
    ref, back, out = awq_save_load(copy.deepcopy(float_models[name]), _ids(), tmp_path / "q")
    assert isinstance(back.model.layers[MOE_BLOCKS[name][0]].mlp.experts, UnfusedExperts)
    assert torch.equal(out, ref), name


def test_save_load_simquant_only_moe(float_models, tmp_path):
    """Weights float, experts unfused by extraction: load rebuilds that too."""
    model = copy.deepcopy(float_models["mixtral"])
    lq.quantize(model, "simquant", k_bits=8, v_bits=8, progress=False)
    ids = _ids()[:1]
    ref = model(ids).logits
    lq.save(model, tmp_path / "s")
    assert torch.equal(lq.load(tmp_path / "s")(ids).logits, ref)


# --------------------------------------------------------------------------
# experts no calibration token was routed to
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts", [m for m in W8_METHODS if m[0] in ("smoothquant", "awq", "gptq")],
                         ids=["smoothquant", "awq", "gptq"])
@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_unrouted_experts_are_reported_and_rtn(float_models, name, method, opts, caplog):
    """One calibration token: each MoE block routes it to exactly TOP_K of its
    N_EXPERTS experts, so the others saw nothing. They are reported, and
    quantized round-to-nearest from their float weights (GPTQ does not run
    on an all-zero Hessian, AWQ / SmoothQuant fold no scale into them)."""
    model = copy.deepcopy(float_models[name])
    floats = copy.deepcopy(model)
    extract(floats)
    with caplog.at_level(logging.WARNING, logger="llmeasyquant"):
        lq.quantize(model, method, calib=[torch.tensor([[7]])], progress=False, **opts)
    unrouted = model.llmeq_report.pipeline.unrouted_experts
    assert len(unrouted) == len(MOE_BLOCKS[name]) * (N_EXPERTS - TOP_K), unrouted
    assert "experts saw no calibration token" in caplog.text and unrouted[0] in caplog.text
    assert "experts saw no calibration token" in model.llmeq_report.summary()
    cfg = model.llmeq_config
    for path in unrouted:
        for p in ("gate_proj", "up_proj", "down_proj"):
            q = model.get_submodule(f"{path}.{p}")
            rtn = lq.QLinear.from_linear(floats.get_submodule(f"{path}.{p}"), **cfg.qlinear_kwargs())
            assert torch.equal(q.qweight, rtn.qweight) and torch.equal(q.w_scale, rtn.w_scale), (path, p)
    # the routed experts were calibrated: GPTQ / AWQ differ from RTN somewhere
    routed = [f"model.layers.{i}.mlp.experts.{e}" for i in MOE_BLOCKS[name] for e in range(N_EXPERTS)
              if f"model.layers.{i}.mlp.experts.{e}" not in unrouted]
    assert len(routed) == len(MOE_BLOCKS[name]) * TOP_K
    assert any(not torch.equal(model.get_submodule(f"{r}.down_proj").qweight,
                               lq.QLinear.from_linear(floats.get_submodule(f"{r}.down_proj"),
                                                      **cfg.qlinear_kwargs()).qweight) for r in routed)
    out = model(_ids()).logits
    assert torch.isfinite(out).all()


def test_static_activations_refuse_an_unrouted_expert(float_models):
    model = copy.deepcopy(float_models["mixtral"])
    with pytest.raises(ValueError, match=r"static activations need a calibrated range for every layer, and "
                                         r"model\.layers\.0\.mlp\.experts\.\d\.\w+ saw no calibration token"):
        lq.quantize(model, "absmax", act="static", calib=[torch.tensor([[7]])], progress=False)


# --------------------------------------------------------------------------
# what cannot work raises, naming the architecture and the reason
# --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq"])
def test_foreign_formats_refuse_moe(float_models, fmt, tmp_path):
    model = copy.deepcopy(float_models["qwen3_moe"])
    lq.quantize(model, "gptq", calib=calib_batches(n=1), progress=False, w_bits=4, w_group_size=16)
    with pytest.raises(ValueError, match=rf"save\(format='{fmt}'\): qwen3_moe is a mixture-of-experts model"):
        lq.save(model, tmp_path / "x", format=fmt)
    assert not (tmp_path / "x").exists()


def test_onnx_export_refuses_moe(float_models, tmp_path):
    from llmeasyquant.onnx_export import export_onnx

    with pytest.raises(ValueError, match="export_onnx: mixtral is a mixture-of-experts model"):
        export_onnx(copy.deepcopy(float_models["mixtral"]), str(tmp_path / "m.onnx"))


def test_tensor_parallel_refuses_moe():
    from llmeasyquant.distributed import tensor_parallel as tp

    with pytest.raises(ValueError, match="'gpt_oss' is a mixture-of-experts model; splitting its per-expert "
                                         "linears over ranks"):
        tp.shard_block(torch.nn.Module(), "gpt_oss", 0, 2)


def test_info_arch_reports_experts(float_models):
    from llmeasyquant.models.describe import describe, format_report

    text = format_report(describe(copy.deepcopy(float_models["qwen2_moe"])))
    assert "model type qwen2_moe: declared" in text
    assert f"experts: {N_EXPERTS} per MoE block in blocks 0, 1 at mlp.experts (router mlp.gate, float)" in text
    assert "kept float: mlp.gate, mlp.shared_expert_gate" in text


def test_mixed_gptq_rtn_for_an_unrouted_expert():
    """The search's GPTQ candidates (methods.mixed) on an all-zero Hessian (an
    expert no calibration token reached): round-to-nearest, never the zeroed
    columns GPTQ gives dead inputs."""
    from llmeasyquant.methods.mixed import Layout, quantize_layer

    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    lay = Layout(bits=4, group_size=16, symmetric=False, scale_dtype="float32")
    q = quantize_layer(lin, lay, "gptq", torch.zeros(32, 32, dtype=torch.float64))
    rtn = quantize_layer(lin, lay, "rtn")
    assert torch.equal(q.qweight, rtn.qweight) and torch.equal(q.w_scale, rtn.w_scale)
    # a real Hessian does run GPTQ (the check above is not vacuous)
    x = torch.randn(64, 32, dtype=torch.float64)
    assert not torch.equal(quantize_layer(lin, lay, "gptq", x.T @ x).qweight, rtn.qweight)
