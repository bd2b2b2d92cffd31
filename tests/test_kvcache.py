"""SimQuant KV-cache quantization: quantizers, packing, the transformers cache,
generate() integration, memory accounting and (slow) perplexity on the real
default model."""

import pytest
import torch
import transformers as tf
from transformers.cache_utils import DynamicCache

import tiny_models
from llmeasyquant import _reference as R
from llmeasyquant.kvcache import (SimQuantCache, SimQuantLayer, kv_memory_bytes, pack_bits, packed_len,
                                  quantize_keys, quantize_rows, quantize_values, rope_apply, rope_invert,
                                  unpack_bits)
from llmeasyquant.methods import simquant
from llmeasyquant.methods.simquant import SimQuantConfig, make_cache


def _kv(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype)


def _elementwise_scale(qt, x_rows):
    """Scale of every element of the row layout [..., rows, L]."""
    L = x_rows.shape[-1]
    g = L if qt.group_size == -1 else qt.group_size
    return qt.scale.repeat_interleave(g, dim=-1)


# --------------------------------------------------------------------------
# quantizers
# --------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_roundtrip_within_half_scale(bits, symmetric):
    k = _kv(2, 3, 37, 16, seed=bits)
    v = _kv(2, 3, 37, 16, seed=bits + 100)
    for x, qt, rows in ((k, quantize_keys(k, bits, symmetric), k.transpose(-1, -2)),
                        (v, quantize_values(v, bits, symmetric), v),
                        (v, quantize_values(v, bits, symmetric, group_size=4), v)):
        y = qt.dequantize()
        assert y.shape == x.shape and y.dtype == torch.float32
        err = (x - y).abs().transpose(-1, -2) if qt.transposed else (x - y).abs()
        bound = _elementwise_scale(qt, rows) / 2
        assert (err <= bound * (1 + 1e-5) + 1e-6).all(), (err - bound).max()
        assert (qt.zero_point is None) == symmetric


def test_axes_scale_shapes():
    k = _kv(2, 3, 10, 8)
    qk = quantize_keys(k, 4)
    assert qk.scale.shape == (2, 3, 8, 1)  # one per (batch, head, channel), over the 10 tokens
    qv = quantize_values(k, 4)
    assert qv.scale.shape == (2, 3, 10, 1)  # one per (batch, head, token), over head_dim
    assert quantize_values(k, 4, group_size=4).scale.shape == (2, 3, 10, 2)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_reference_quantize(bits, symmetric):
    x = _kv(3, 5, 24, seed=7)
    qt = quantize_rows(x, bits, symmetric)
    q, s, z = R.quantize(x, bits, symmetric, -1)
    assert torch.equal(qt.data, q)  # same ints, same packing (int8 / pack_int4)
    assert torch.equal(qt.scale, s)
    if not symmetric:
        assert torch.equal(qt.zero_point, z)
    assert torch.equal(qt.dequantize(), R.dequantize(q, s, z, bits, -1, 24, torch.float32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_outliers_kept_exactly_and_excluded_from_range(bits):
    x = _kv(2, 2, 64, 32, seed=3, dtype=torch.float16)
    g = torch.Generator().manual_seed(5)
    spots = torch.randint(0, x[0, 0].numel(), (10,), generator=g)
    x.view(2, 2, -1)[..., spots] = 40.0
    frac = 0.01  # round(0.01 * 64 * 32) = 20 per (batch, head)
    for qt, rows in ((quantize_values(x, bits, outlier_fraction=frac), x),
                     (quantize_keys(x, bits, outlier_fraction=frac), x.transpose(-1, -2))):
        assert qt.outlier_idx.shape == (2, 2, 20) and qt.outlier_idx.dtype == torch.int32
        assert qt.outlier_val.dtype == torch.float16
        y = qt.dequantize()  # float32: fp16 inputs and outliers are exact in it
        flat_x = rows.reshape(2, 2, -1).float()
        flat_y = (y.transpose(-1, -2) if qt.transposed else y).reshape(2, 2, -1)
        idx = qt.outlier_idx.long()
        # the chosen ones are the largest magnitudes, restored bit-exactly
        kth = flat_x.abs().float().topk(20, dim=-1).values[..., -1:]
        assert (flat_x.gather(-1, idx).abs() >= kth).all()
        assert torch.equal(flat_y.gather(-1, idx), flat_x.gather(-1, idx))
        # everything else within half a scale of a range computed without them
        mask = torch.zeros_like(flat_x, dtype=torch.bool).scatter_(-1, idx, True)
        scale = _elementwise_scale(qt, rows).reshape(2, 2, -1)
        err = (flat_x - flat_y).abs()
        assert (err[~mask] <= (scale[~mask] / 2) * (1 + 1e-5) + 1e-6).all()
        plain = quantize_values(x, bits) if not qt.transposed else quantize_keys(x, bits)
        assert qt.scale.max() < plain.scale.max()
        # overall error drops
        e_out = (y - x.float()).pow(2).mean()
        e_plain = (plain.dequantize().float() - x.float()).pow(2).mean()
        assert e_out < e_plain


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("L", [1, 3, 5, 7, 9, 13, 16, 17])
def test_pack_roundtrip_odd_sizes(bits, L):
    lo, hi = R.qrange(bits)
    q = torch.randint(lo, hi + 1, (3, 2, L), dtype=torch.int8, generator=torch.Generator().manual_seed(L))
    p = pack_bits(q, bits)
    assert p.shape == (3, 2, packed_len(L, bits))
    assert p.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert torch.equal(unpack_bits(p, bits, L), q)


def test_packing_is_dense():
    assert packed_len(16, 2) == 4 and packed_len(16, 3) == 6 and packed_len(16, 4) == 8 and packed_len(16, 8) == 16
    qt = quantize_keys(_kv(1, 1, 128, 64), 2)
    assert qt.data.numel() == 64 * 128 // 4


def test_per_channel_keys_beat_per_token_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 128, 64, generator=g)
    k[..., [3, 17, 40]] = k[..., [3, 17, 40]] * 3 + 25  # large-magnitude channels, as real keys have
    for bits, ratio in ((2, 0.6), (3, 0.2), (4, 0.15), (8, 0.15)):
        per_channel = (quantize_keys(k, bits).dequantize() - k).pow(2).mean()
        per_token = (quantize_values(k, bits).dequantize() - k).pow(2).mean()
        assert per_channel < ratio * per_token, (bits, per_channel, per_token)
    # values with outlier *tokens* favour the per-token axis
    v = torch.randn(1, 2, 128, 64, generator=g)
    v[..., [0, 50], :] *= 40
    per_token = (quantize_values(v, 4).dequantize() - v).pow(2).mean()
    per_channel = (quantize_keys(v, 4).dequantize() - v).pow(2).mean()
    assert per_token < 0.5 * per_channel, (per_token, per_channel)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_bits_outside_2_to_8_rejected(bits):
    with pytest.raises(ValueError, match="2..8"):
        quantize_keys(_kv(1, 1, 4, 4), bits)
    with pytest.raises(ValueError, match="2..8"):
        SimQuantCache(SimQuantConfig(k_bits=bits))
    with pytest.raises(ValueError, match="v_bits"):
        make_cache(tiny_models.build("llama"), SimQuantConfig(v_bits=bits))


def test_bad_config_fields_rejected():
    for bad in (dict(chunk_size=0), dict(residual_length=-1), dict(outlier_fraction=1.0), dict(v_group_size=0)):
        with pytest.raises(ValueError):
            SimQuantCache(SimQuantConfig(**bad))


def test_unsupported_architecture_rejected():
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    bert = tf.BertForMaskedLM(cfg)
    with pytest.raises(ValueError, match="supports model types llama, mistral, qwen2, qwen3, opt, gpt2"):
        simquant.apply(bert, None, SimQuantConfig(), [])
    with pytest.raises(ValueError, match="got 'bert'"):
        make_cache(bert)


# --------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------
def test_residual_window_and_chunking():
    cfg = SimQuantConfig(k_bits=3, v_bits=3, chunk_size=8, residual_length=4)
    layer = SimQuantLayer(cfg)
    ks, vs = _kv(1, 2, 40, 16, seed=1), _kv(1, 2, 40, 16, seed=2)
    steps = [5] + [1] * 20 + [15]
    pos = 0
    for n in steps:
        k_out, v_out = layer.update(ks[..., pos:pos + n, :], vs[..., pos:pos + n, :])
        pos += n
        assert layer.get_seq_length() == pos and k_out.shape[-2] == pos and v_out.shape[-2] == pos
        r = layer.keys.shape[-2]
        assert r < 4 + 8 and r >= min(pos, 4)
        committed = sum(b.n_tokens for b in layer.blocks)
        assert committed + r == pos and committed % 8 == 0
        # the residual window is exact, the rest close but quantized
        last = min(pos, 4)
        assert torch.equal(k_out[..., pos - last:, :], ks[..., pos - last:pos, :])
        assert torch.equal(v_out[..., pos - last:, :], vs[..., pos - last:pos, :])
        if pos > last:
            assert not torch.equal(k_out[..., : pos - last, :], ks[..., : pos - last, :])
            assert (k_out - ks[..., :pos, :]).abs().max() < 3


def test_residual_zero_prefill_is_fully_quantized():
    """residual_length=0: attention gets chunk-wise quantize-dequantize of every token."""
    cfg = SimQuantConfig(k_bits=4, v_bits=4, chunk_size=8, residual_length=0)
    layer = SimQuantLayer(cfg)
    k, v = _kv(1, 2, 20, 16, seed=4), _kv(1, 2, 20, 16, seed=5)
    k_out, v_out = layer.update(k, v)
    for a, b in ((0, 8), (8, 16), (16, 20)):  # two committed chunks + a pending partial one
        assert torch.equal(k_out[..., a:b, :], quantize_keys(k[..., a:b, :], 4).dequantize())
        assert torch.equal(v_out[..., a:b, :], quantize_values(v[..., a:b, :], 4).dequantize())
    assert len(layer.blocks) == 1 and layer.blocks[0].n_tokens == 16 and layer.keys.shape[-2] == 4


def test_beam_reorder_is_exact():
    cfg = SimQuantConfig(chunk_size=4, residual_length=2)
    a, b = SimQuantLayer(cfg), SimQuantLayer(cfg)
    k, v = _kv(3, 2, 11, 8, seed=6), _kv(3, 2, 11, 8, seed=7)
    idx = torch.tensor([2, 0, 0])
    a.update(k, v)
    a.reorder_cache(idx)
    b.update(k[idx], v[idx])
    k2, v2 = _kv(3, 2, 1, 8, seed=8), _kv(3, 2, 1, 8, seed=9)
    ka, va = a.update(k2, v2)
    kb, vb = b.update(k2, v2)
    assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_memory_report_4bit_under_0_3x_fp16():
    cfg = SimQuantConfig(k_bits=4, v_bits=4, chunk_size=64, residual_length=16)
    cache = SimQuantCache(cfg, num_layers=2)
    T = 2064  # 32 full chunks + the 16-token residual window
    k = _kv(1, 4, T, 64, dtype=torch.float16)
    for i in range(2):
        cache.update(k, k, i)
    m = kv_memory_bytes(cache)
    n_float = T - 64 * ((T - 16) // 64)  # pending partial chunk + residual window
    assert n_float == 16 and m["tokens"] == T and m["layers"] == 2
    assert m["residual_bytes"] == 2 * 2 * 4 * n_float * 64 * 2
    assert m["quantized_bytes"] == 2 * 2 * 4 * (T - n_float) * 64 // 2
    assert m["scales_bytes"] > 0 and m["zero_points_bytes"] > 0 and m["outliers_bytes"] == 0
    assert m["total_bytes"] == sum(m[f"{c}_bytes"] for c in ("quantized", "scales", "zero_points", "outliers",
                                                               "residual"))
    assert m["fp16_bytes"] == m["float_bytes"] == 2 * 2 * 4 * T * 64 * 2
    assert m["ratio_vs_fp16"] < 0.3, m
    two = SimQuantCache(SimQuantConfig(k_bits=2, v_bits=2, chunk_size=64, residual_length=16), num_layers=1)
    eight = SimQuantCache(SimQuantConfig(k_bits=8, v_bits=8, chunk_size=64, residual_length=16), num_layers=1)
    two.update(k, k, 0)
    eight.update(k, k, 0)
    assert kv_memory_bytes(two)["ratio_vs_fp16"] < m["ratio_vs_fp16"] < kv_memory_bytes(eight)["ratio_vs_fp16"] < 0.6


# --------------------------------------------------------------------------
# generate()
# --------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", tiny_models.ALL)
def test_generate_8bit_matches_float_greedy(model_type):
    model = tiny_models.build(model_type)
    prompt = torch.randint(1, tiny_models.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(prompt))
    ref = model.generate(prompt, **kw)
    # a small chunk and no residual window, so generation really reads quantized K/V
    cfg = SimQuantConfig(k_bits=8, v_bits=8, chunk_size=4, residual_length=0)
    simquant.apply(model, None, cfg, [])
    out = model.generate(prompt, return_dict_in_generate=True, **kw)
    assert isinstance(out.cache, SimQuantCache)  # plain generate() now uses the quantized cache
    assert out.cache.get_seq_length() == 12 + 6 - 1
    assert sum(b.n_tokens for b in out.cache.layers[0].blocks) == 16
    assert torch.equal(out.sequences, ref)
    # an explicit cache is left alone
    dyn = model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0, cache=DynamicCache(),
                         attention_mask=torch.ones_like(prompt), return_dict_in_generate=True)
    assert type(dyn.cache) is DynamicCache


def test_generate_beam_search_and_left_padding_8bit():
    model = tiny_models.build("llama")
    prompt = torch.randint(1, tiny_models.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0  # left padding
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=mask)
    ref_beam = model.generate(prompt, num_beams=3, **kw)
    ref = model.generate(prompt, **kw)
    simquant.apply(model, None, SimQuantConfig(k_bits=8, v_bits=8, chunk_size=4, residual_length=0), [])
    beam = model.generate(prompt, num_beams=3, return_dict_in_generate=True, **kw)
    assert isinstance(beam.cache, SimQuantCache)
    assert torch.equal(beam.sequences, ref_beam)
    assert torch.equal(model.generate(prompt, **kw), ref)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_generate_2bit_runs(model_type):
    model = tiny_models.build(model_type)
    simquant.apply(model, None, SimQuantConfig(k_bits=2, v_bits=2, chunk_size=4, residual_length=2,
                                               outlier_fraction=0.05), [])
    prompt = torch.randint(1, tiny_models.VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (1, 18)
    m = kv_memory_bytes(out.cache)
    assert m["tokens"] == 17 and m["outliers_bytes"] > 0 and m["residual_bytes"] > 0


@pytest.mark.parametrize("D", [16, 12])  # a Sylvester (symmetric) and a Paley (not symmetric) order
def test_hadamard_cache_stores_rotated_ints_and_returns_the_original_basis(D):
    from llmeasyquant import hadamard

    cfg = SimQuantConfig(k_bits=4, v_bits=4, chunk_size=8, residual_length=0, k_hadamard=True, v_hadamard=True)
    layer = SimQuantLayer(cfg)  # no rope table: keys as given
    k, v = _kv(1, 2, 16, D, seed=4), _kv(1, 2, 16, D, seed=5)
    k_out, v_out = layer.update(k, v)
    Q = hadamard.matrix(D, torch.float64)
    for x, out, quant, stored in ((k, k_out, quantize_keys, layer.blocks[0].keys),
                                  (v, v_out, quantize_values, layer.blocks[0].values)):
        xr = (x.double() @ Q.T).float().reshape(1, 2, 2, 8, D)
        ref = quant(xr, 4)
        assert torch.allclose(stored.scale, ref.scale, rtol=1e-5)  # the rotated coordinates were quantized
        back = (stored.dequantize().double() @ Q).float().reshape(1, 2, 16, D)
        assert torch.allclose(out, back, atol=1e-5)  # and rotated back for attention
    # 8-bit through the rotation stays close to the float cache
    layer8 = SimQuantLayer(SimQuantConfig(k_bits=8, v_bits=8, chunk_size=8, residual_length=0, k_hadamard=True,
                                          v_hadamard=True))
    k8, v8 = layer8.update(k, v)
    assert (k8 - k).abs().max() < 0.02 * k.abs().max() and (v8 - v).abs().max() < 0.02 * v.abs().max()


def test_value_hadamard_alone_leaves_the_keys_alone():
    cfg = SimQuantConfig(k_bits=4, v_bits=4, chunk_size=8, residual_length=0, v_hadamard=True)
    layer = SimQuantLayer(cfg)
    k, v = _kv(1, 2, 16, 16, seed=4), _kv(1, 2, 16, 16, seed=5)
    k_out, _ = layer.update(k, v)
    assert torch.equal(k_out, quantize_keys(k.reshape(1, 2, 2, 8, 16), 4).dequantize().reshape(1, 2, 16, 16))


def test_hadamard_cache_spreads_an_outlier_channel():
    """One huge channel: per-token values lose every other channel to its range; rotated they do not."""
    v = _kv(1, 2, 64, 16, seed=6)
    v[..., 3] *= 30.0
    errs = {}
    for had in (False, True):
        layer = SimQuantLayer(SimQuantConfig(k_bits=4, v_bits=4, chunk_size=64, residual_length=0, v_hadamard=had))
        _, v_out = layer.update(v.clone(), v.clone())
        errs[had] = (v_out - v).pow(2).mean().item()
    assert errs[True] < 0.5 * errs[False], errs


def test_hadamard_needs_a_buildable_head_dim():
    model = tiny_models.build("llama")  # head_dim 16: fine
    simquant.apply(model, None, SimQuantConfig(v_hadamard=True), [])
    model.config.head_dim = 10
    with pytest.raises(ValueError, match="order head_dim = 10"):
        simquant.apply(model, None, SimQuantConfig(k_hadamard=True), [])
    with pytest.raises(ValueError, match="v_hadamard must be true or false"):
        simquant.apply(model, None, SimQuantConfig(v_hadamard=1), [])


def test_explicit_cache_forward_matches_float_at_8bit():
    model = tiny_models.build("llama")
    ids = torch.randint(1, tiny_models.VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    ref = model(ids, use_cache=False).logits
    cache = make_cache(model, SimQuantConfig(k_bits=8, v_bits=8, chunk_size=16, residual_length=0))
    out = model(ids, cache=cache, use_cache=True).logits
    assert 0 < (out - ref).abs().max() < 1e-2 * ref.abs().max()
    assert cache.get_seq_length() == 40


def test_pre_rope_keys_quantized_before_rotation():
    """Llama-family models: the stored key ints are those of the un-rotated keys."""
    model = tiny_models.build("llama")
    ids = torch.randint(1, tiny_models.VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    dyn = DynamicCache()
    model(ids, cache=dyn, use_cache=True)
    k_post = dyn.layers[0].keys  # layer 0 sees the same inputs with either cache
    cfg = SimQuantConfig(k_bits=4, v_bits=4, chunk_size=8, residual_length=0)
    cache = make_cache(model, cfg)
    assert cache.pre_rope
    model(ids, cache=cache, use_cache=True)
    cos, sin = model.model.rotary_emb(torch.zeros((), dtype=torch.float32), torch.arange(16)[None])
    k_pre = rope_invert(k_post[..., :16, :].float(), cos[0], sin[0]).reshape(1, 2, 2, 8, 16)
    stored = cache.layers[0].blocks[0].keys
    assert torch.equal(stored.data, quantize_keys(k_pre, 4).data)
    cos, sin = model.model.rotary_emb(torch.zeros(()), torch.arange(20)[None])
    assert torch.allclose(rope_apply(rope_invert(k_post, cos[0], sin[0]), cos[0], sin[0]), k_post, atol=1e-5)
    # 8-bit pre- and post-RoPE both stay close to the float keys; no RoPE to invert for gpt2/opt
    for pre in (True, False):
        c8 = make_cache(model, SimQuantConfig(k_bits=8, v_bits=8, chunk_size=8, residual_length=0, pre_rope=pre))
        assert c8.pre_rope == pre
        k_seen, _ = c8.layers[0].update(k_post, dyn.layers[0].values)
        assert (k_seen - k_post).abs().max() < 0.02 * k_post.abs().max()
    assert not make_cache(tiny_models.build("gpt2")).pre_rope
    assert not make_cache(tiny_models.build("opt")).pre_rope


# --------------------------------------------------------------------------
# real default model (slow)
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_perplexity_and_generate():
    """SmolLM2-135M, WikiText-2 raw test, first 2 windows x 1024 tokens, one
    prefill per window with a fresh cache and residual_length=0 (every K/V seen
    quantized). Also the mean KL(float || quantized) of the next-token
    distributions, a far less noisy measure than the perplexity difference."""
    import math
    import time

    from llmeasyquant.data import DEFAULT_EVAL_FILE
    from llmeasyquant.eval.perplexity import tokenize_file
    from llmeasyquant.models import load_default_model

    t0 = time.time()
    model, tok = load_default_model()
    ids = tokenize_file(tok, DEFAULT_EVAL_FILE)
    configs = {(8, 0.0): None, (4, 0.0): None, (2, 0.0): None, (2, 0.01): None}
    nll = dict.fromkeys(["float", *configs], 0.0)
    kl = dict.fromkeys(configs, 0.0)
    W, SEQ = 2, 1024
    with torch.no_grad():
        for w in range(W):
            window = ids[w * SEQ:(w + 1) * SEQ].unsqueeze(0)
            target = window[0, 1:, None]
            lf = torch.log_softmax(model(window, use_cache=False).logits[0, :-1].float(), -1)
            nll["float"] -= lf.gather(1, target).sum().item()
            pf = lf.exp()
            for bits, frac in configs:
                cfg = SimQuantConfig(k_bits=bits, v_bits=bits, residual_length=0, outlier_fraction=frac)
                lq = torch.log_softmax(model(window, cache=make_cache(model, cfg), use_cache=True)
                                       .logits[0, :-1].float(), -1)
                nll[(bits, frac)] -= lq.gather(1, target).sum().item()
                kl[(bits, frac)] += (pf * (lf - lq)).sum(-1).mean().item() / W
    ppl = {k: math.exp(v / (W * (SEQ - 1))) for k, v in nll.items()}
    print(f"\nKV perplexity, WikiText-2 test, {W} x {SEQ} tokens, residual_length=0: float {ppl['float']:.4f}; "
          + "; ".join(f"K{b}V{b}{' +1% outliers' if f else ''} {ppl[(b, f)]:.4f} "
                      f"({100 * (ppl[(b, f)] / ppl['float'] - 1):+.2f}%, KL {kl[(b, f)]:.4f})" for b, f in configs))
    # Properties that hold on any CPU (the float math, hence the rounding of
    # each K/V, differs between ISA tiers; on 2 windows KV4 measured +1.74 %
    # on AVX-512 and +2.10 % on AVX2). The whole-file 2 % claim is measured in
    # docs/results.md (+1.83 % with 1 % outliers), not here.
    base = ppl["float"]
    inc = {k: ppl[k] / base - 1 for k in configs}
    assert 5 < base < 40
    assert all(math.isfinite(p) for p in ppl.values())
    assert abs(inc[(8, 0.0)]) <= 0.003
    assert 0 < inc[(4, 0.0)] < 0.06 and inc[(4, 0.0)] < 0.05 * inc[(2, 0.0)]
    assert inc[(4, 0.0)] < inc[(2, 0.01)] < inc[(2, 0.0)]
    assert kl[(8, 0.0)] < 0.002 < kl[(4, 0.0)] < 0.06 < kl[(2, 0.0)]
    assert kl[(2, 0.01)] < 0.7 * kl[(2, 0.0)]

    # generate(): 8-bit KV with a small chunk (generation reads quantized K/V) keeps the greedy tokens
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    ref = model.generate(prompt, max_new_tokens=8, do_sample=False)
    simquant.apply(model, None, SimQuantConfig(k_bits=8, v_bits=8, chunk_size=4, residual_length=0), [])
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, SimQuantCache) and out.cache.pre_rope
    assert torch.equal(out.sequences, ref)
    print(f"real-model KV test: {time.time() - t0:.1f} s")


def test_quantize_entry_point_sets_up_kv_cache_for_generate():
    import llmeasyquant as lq
    from tiny_models import build

    model = build("llama")
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    lq.quantize(model, "simquant", k_bits=8, v_bits=8, progress=False)
    assert model.llmeq_config.method == "simquant"
    assert not any(isinstance(m, lq.QLinear) for m in model.modules())  # weights stay float
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)


def test_perplexity_is_the_one_entry_point_for_the_quantized_cache():
    """eval.perplexity measures through the model's SimQuant cache when it has
    one (or a config passed as kv=), float with kv=False; one prefill per window."""
    import math

    from llmeasyquant.eval.perplexity import perplexity

    model = tiny_models.build("llama", seed=3)
    ids = torch.randint(0, tiny_models.VOCAB, (200,), generator=torch.Generator().manual_seed(0))
    cfg = SimQuantConfig(k_bits=2, v_bits=2, chunk_size=8, residual_length=0)
    float_ppl = perplexity(model, ids=ids, seq_len=64, progress=False)
    with_kv = perplexity(model, ids=ids, seq_len=64, progress=False, kv=cfg)
    # by hand: a fresh quantized cache per non-overlapping window
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, 200 - 64 + 1, 64):
            w = ids[s: s + 64].unsqueeze(0)
            logp = torch.log_softmax(model(w, cache=make_cache(model, cfg), use_cache=True).logits.float()[0, :-1], -1)
            nll -= logp.gather(1, w[0, 1:].unsqueeze(1)).sum().item()
            n += 63
    assert math.isclose(with_kv.ppl, math.exp(nll / n), rel_tol=1e-9)
    assert with_kv.ppl != float_ppl.ppl
    simquant.apply(model, None, cfg, [])
    assert perplexity(model, ids=ids, seq_len=64, progress=False).ppl == with_kv.ppl  # the attached cache
    assert perplexity(model, ids=ids, seq_len=64, progress=False, kv=False).ppl == float_ppl.ppl
    with pytest.raises(ValueError, match="non-overlapping windows"):
        perplexity(model, ids=ids, seq_len=64, stride=32, progress=False)
