"""Export formats (llmeasyquant.save(format=...)) and foreign loads: a model
saved as compressed-tensors or GPTQ loads back into QLinear with the same
integers, scales and zero-points, so the same logits bit for bit; the bit
layouts agree with unpackers written here from the formats' descriptions;
what a format cannot say is a ValueError before anything is written; a
foreign folder is untrusted like a native one; with compressed-tensors
installed, plain transformers reads our output and we read compressed-tensors'
own (a peer's) output. Tiny random models only, nothing downloaded."""

import json
import os
import struct

import pytest
import torch

import tiny_models
from conftest import lq
from llmeasyquant import quant_format
from llmeasyquant.checkpoint_checks import FolderError

try:
    import compressed_tensors  # noqa: F401
    HAS_CT = True
except ImportError:  # the interop tests need it; the format tests do not
    HAS_CT = False
needs_ct = pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed")


def _calib(n=2, seq=24):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, tiny_models.VOCAB, (1, seq), generator=g) for _ in range(n)]


IDS = torch.randint(1, tiny_models.VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))

W4G32A = ("zeropoint", {"w_bits": 4, "w_group_size": 32, "act": None})
W4G64A = ("zeropoint", {"w_bits": 4, "w_group_size": 64, "act": None})
W4G32S = ("absmax", {"w_bits": 4, "w_group_size": 32, "act": None})
W4G64S = ("absmax", {"w_bits": 4, "w_group_size": 64, "act": None})
W8CH = ("absmax", {"w_bits": 8, "act": None})
W8CHA = ("zeropoint", {"w_bits": 8, "act": None})
W8A8 = ("absmax", {"act": "dynamic"})
W8A8ASYM = ("absmax", {"act": "dynamic", "act_symmetric": False})
GPTQ4 = ("gptq", {"w_bits": 4, "w_group_size": 32})
AWQ4 = ("awq", {"w_bits": 4, "w_group_size": 32})
GPTQ4F16 = ("gptq", {"w_bits": 4, "w_group_size": 32, "w_scale_dtype": "float16"})  # F16 scales kept as F16

SQ_STATIC = ("smoothquant", {"act": "static"})
STATIC_ASYM = ("absmax", {"act": "static", "act_symmetric": False})
W2G32A = ("zeropoint", {"w_bits": 2, "w_group_size": 32, "act": None})
W2G32S = ("absmax", {"w_bits": 2, "w_group_size": 32, "act": None})
CASES = [("compressed-tensors", c) for c in (W4G32A, W4G64A, W4G32S, W4G64S, W8CH, W8CHA, W8A8, W8A8ASYM, GPTQ4,
                                             GPTQ4F16, W2G32A, SQ_STATIC, STATIC_ASYM)] + \
        [("gptq", c) for c in (W4G32A, W4G64A, W4G32S, W4G64S, W8CH, W8CHA, GPTQ4, GPTQ4F16, W2G32S)] + \
        [("awq", c) for c in (W4G32A, W4G64A, W4G32S, AWQ4, GPTQ4F16)]


def _llama(seed=0):
    """tiny_models' llama with an MLP width of 128, so that group size 64 divides every layer."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=tiny_models.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq"])
def test_opt_biases_tied_embeddings_and_native_resave(tmp_path, one_thread, fmt):
    """OPT: biases on every linear and a tied lm_head; a loaded foreign folder
    saved natively reads back the same (without the foreign config)."""
    model = _quantized(W4G32S, arch="opt")
    assert model.config.tie_word_embeddings and model.model.decoder.layers[0].fc1.bias is not None
    back = lq.load(lq.save(model, tmp_path / "f", format=fmt))
    assert back.lm_head.weight is back.model.decoder.embed_tokens.weight
    native = lq.load(lq.save(back, tmp_path / "n"))
    assert "quantization_config" not in json.load(open(tmp_path / "n" / "config.json"))
    with torch.no_grad():
        ref = model(IDS).logits
        assert torch.equal(ref, back(IDS).logits) and torch.equal(ref, native(IDS).logits)


def _quantized(case, arch="llama", **extra):
    method, opts = case
    model = _llama() if arch == "llama" else tiny_models.build(arch)
    lq.quantize(model, method, calib=_calib(), progress=False, **{**opts, **extra})
    return model


def _qlinears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lq.QLinear)}


def _read(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("fmt,case", CASES, ids=[f"{f}-{c[0]}-{'-'.join(f'{k}{v}' for k, v in c[1].items())}"
                                                 for f, c in CASES])
def test_round_trip_bit_exact(tmp_path, one_thread, fmt, case):
    model = _quantized(case)
    out = lq.save(model, tmp_path / "m", tokenizer=tiny_models.byte_tokenizer(), format=fmt)
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert cfg["quant_method"] == fmt
    assert not os.path.exists(os.path.join(out, "quantization.json"))  # not a native folder
    back, tok = lq.load(out, with_tokenizer=True)
    assert tok is not None
    ours, theirs = _qlinears(model), _qlinears(back)
    assert ours.keys() == theirs.keys() and ours
    for name, a in ours.items():
        b = theirs[name]
        for attr in ("w_bits", "w_group_size", "act", "in_features", "out_features"):
            assert getattr(a, attr) == getattr(b, attr), (name, attr)
        if a.act is not None:
            assert a.act_symmetric == b.act_symmetric
        if a.act == "static":
            assert torch.equal(a.act_scale, b.act_scale) and torch.equal(a.act_zero, b.act_zero), name
        assert torch.equal(a.qweight, b.qweight), name
        assert a.w_scale.dtype == b.w_scale.dtype and torch.equal(a.w_scale, b.w_scale), name
        # an asymmetric layer may come back symmetric only where every zero-point is 0
        za = a.w_zero if a.w_zero is not None else torch.zeros_like(a.w_scale, dtype=torch.int8)
        zb = b.w_zero if b.w_zero is not None else torch.zeros_like(b.w_scale, dtype=torch.int8)
        assert torch.equal(za, zb), name
        assert torch.equal(a.dequantize(), b.dequantize()), name
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, back(IDS).logits)


# ----------------------------------------------------------- bit layouts
def _words(t):
    """int32 tensor -> nested lists of Python ints as unsigned 32-bit words."""
    return [[v & 0xFFFFFFFF for v in row] for row in t.tolist()]


def _nibbles_of_word(w, bits):
    return [(w >> (bits * j)) & ((1 << bits) - 1) for j in range(32 // bits)]


def _signed(layer):
    return quant_format.unpack_bits(layer.qweight, layer.w_bits, layer.in_features).to(torch.int64)


@pytest.mark.parametrize("case", [W4G32A, W4G32S, W8CHA], ids=["w4-asym", "w4-sym", "w8-asym"])
def test_gptq_layout_by_hand(tmp_path, one_thread, case):
    model = _quantized(case)
    out = lq.save(model, tmp_path / "m", format="gptq")
    t = _read(out)
    name, layer = "model.layers.0.mlp.down_proj", _qlinears(model)["model.layers.0.mlp.down_proj"]
    b, K, N = layer.w_bits, layer.in_features, layer.out_features
    per, mid = 32 // b, 1 << (b - 1)
    q = _signed(layer)
    # qweight [K/per, N]: word r of column n holds k = r*per .. r*per+per-1, LSB first, unsigned q + 2^(b-1)
    qw = _words(t[f"{name}.qweight"])
    assert len(qw) == K // per and len(qw[0]) == N
    for r in (0, len(qw) - 1):
        for n in (0, 5, N - 1):
            assert _nibbles_of_word(qw[r][n], b) == [int(q[n, r * per + j]) + mid for j in range(per)]
    # qzeros [G, N/per] along N, v1: stored = unsigned zero-point - 1
    zp = layer.w_zero.to(torch.int64) if layer.w_zero is not None else torch.zeros_like(layer.w_scale, dtype=torch.int64)
    qz = _words(t[f"{name}.qzeros"])
    G = layer.w_scale.shape[1]
    assert len(qz) == G and len(qz[0]) == N // per
    for g in range(G):
        for c in (0, len(qz[0]) - 1):
            assert _nibbles_of_word(qz[g][c], b) == [int(zp[c * per + j, g]) + mid - 1 for j in range(per)]
    if layer.w_zero is None:  # symmetric: the classic 0x77777777 (4-bit) / 0x7f7f7f7f (8-bit)
        assert qz[0][0] == {4: 0x77777777, 8: 0x7F7F7F7F}[b]
    assert torch.equal(t[f"{name}.scales"], layer.w_scale.t())
    gsize = K if layer.w_group_size == -1 else layer.w_group_size
    assert t[f"{name}.g_idx"].tolist() == [k // gsize for k in range(K)]
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["bits"] == b and qc["group_size"] == layer.w_group_size and qc["desc_act"] is False
    assert qc["sym"] == (layer.w_zero is None) and qc["checkpoint_format"] == "gptq"


@pytest.mark.parametrize("case", [W4G32A, W4G32S, W8CHA, W8A8], ids=["w4-asym", "w4-sym", "w8-asym", "w8a8"])
def test_compressed_tensors_layout_by_hand(tmp_path, one_thread, case):
    model = _quantized(case)
    out = lq.save(model, tmp_path / "m", format="compressed-tensors")
    t = _read(out)
    name, layer = "model.layers.1.self_attn.o_proj", _qlinears(model)["model.layers.1.self_attn.o_proj"]
    b, K, N = layer.w_bits, layer.in_features, layer.out_features
    q = _signed(layer)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    scheme = qc["config_groups"]["group_0"]
    assert scheme["targets"] == ["Linear"] and "lm_head" in qc["ignore"]
    assert torch.equal(t[f"{name}.weight_scale"], layer.w_scale)
    if layer.act == "dynamic":
        # int-quantized: the signed values as int8, no packing, no offset
        assert scheme["format"] == "int-quantized" == qc["format"]
        assert scheme["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                                               "strategy": "token", "group_size": None}
        assert t[f"{name}.weight"].dtype == torch.int8 and torch.equal(t[f"{name}.weight"].to(torch.int64), q)
        assert f"{name}.weight_zero_point" not in t
        return
    assert scheme["format"] == "pack-quantized" and scheme["input_activations"] is None
    assert scheme["weights"]["strategy"] == ("channel" if layer.w_group_size == -1 else "group")
    # pack_to_int32: unsigned q + 2^(b-1), 32/b per word along K, LSB first
    per, off = 32 // b, 1 << (b - 1)
    wp = _words(t[f"{name}.weight_packed"])
    assert len(wp) == N and len(wp[0]) == K // per
    for n in (0, 7, N - 1):
        for c in (0, len(wp[0]) - 1):
            assert _nibbles_of_word(wp[n][c], b) == [int(q[n, c * per + j]) + off for j in range(per)]
    assert t[f"{name}.weight_shape"].tolist() == [N, K]
    if layer.w_zero is None:
        assert f"{name}.weight_zero_point" not in t
    else:
        # zero-points packed along N (packed_dim=0) with the same offset
        zp = _words(t[f"{name}.weight_zero_point"])
        assert len(zp) == N // per
        for r in range(len(zp)):
            for g in range(layer.w_scale.shape[1]):
                assert [(zp[r][g] >> (b * j)) & ((1 << b) - 1) for j in range(per)] == \
                    [int(layer.w_zero[r * per + j, g]) + off for j in range(per)]


@pytest.mark.parametrize("case", [W4G32A, W4G32S], ids=["w4-asym", "w4-sym"])
def test_awq_layout_by_hand(tmp_path, one_thread, case):
    model = _quantized(case)
    out = lq.save(model, tmp_path / "m", format="awq")
    t = _read(out)
    name, layer = "model.layers.0.mlp.gate_proj", _qlinears(model)["model.layers.0.mlp.gate_proj"]
    K, N = layer.in_features, layer.out_features
    q = _signed(layer)
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order: nibble j holds column 8c + order[j]
    qw = _words(t[f"{name}.qweight"])
    assert len(qw) == K and len(qw[0]) == N // 8
    for k in (0, 31, K - 1):
        for c in (0, N // 8 - 1):
            assert _nibbles_of_word(qw[k][c], 4) == [int(q[8 * c + order[j], k]) + 8 for j in range(8)]
    zp = layer.w_zero.to(torch.int64) if layer.w_zero is not None else torch.zeros_like(layer.w_scale, dtype=torch.int64)
    qz = _words(t[f"{name}.qzeros"])
    for g in range(layer.w_scale.shape[1]):
        assert _nibbles_of_word(qz[g][1], 4) == [int(zp[8 + order[j], g]) + 8 for j in range(8)]  # no "- 1"
    assert torch.equal(t[f"{name}.scales"], layer.w_scale.t())
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["version"], qc["zero_point"]) == (4, 32, "gemm", True)


@needs_ct
def test_awq_matches_compressed_tensors_converter(tmp_path, one_thread):
    """compressed-tensors' own AutoAWQ converter (an independent reading of
    the GEMM layout) turns our AWQ tensors into our signed integers."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    model = _quantized(W4G32A)
    t = _read(lq.save(model, tmp_path / "m", format="awq"))
    conv = AutoAWQConverter(bits=4, group_size=32, zero_point=True).process(dict(t))
    for name, layer in _qlinears(model).items():
        N, K = layer.out_features, layer.in_features
        q = unpack_from_int32(conv[f"{name}.weight_packed"], 4, torch.Size([N, K]))
        assert torch.equal(q, _signed(layer).to(torch.int8)), name
        zp = unpack_from_int32(conv[f"{name}.weight_zero_point"], 4, torch.Size([N, K // 32]), packed_dim=0)
        assert torch.equal(zp, layer.w_zero), name
        assert torch.equal(conv[f"{name}.weight_scale"], layer.w_scale), name


# ------------------------------------------------------ what a format cannot say
def _refused(tmp_path, model, fmt, match):
    dest = tmp_path / "refused"
    with pytest.raises(ValueError, match=match):
        lq.save(model, dest, format=fmt)
    assert not dest.exists() and not any(p.name.startswith(".refused") for p in tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_three_bit_refused(tmp_path, one_thread, fmt):
    _refused(tmp_path, _quantized(("zeropoint", {"w_bits": 3, "w_group_size": 32, "act": None})), fmt,
             "3-bit weights")


def test_awq_refusals(tmp_path, one_thread):
    _refused(tmp_path, _quantized(W8CH), "awq", "4-bit weights only")
    _refused(tmp_path, _quantized(("absmax", {"w_bits": 4, "act": None})), "awq", "per channel")
    _refused(tmp_path, _quantized(("zeroquant", {"w_bits": 4, "w_group_size": 32})), "awq", "weight-only")


def test_activation_modes_refused(tmp_path, one_thread):
    _refused(tmp_path, _quantized(("absmax", {"act": "ema"})), "compressed-tensors", "not EMA activation")
    _refused(tmp_path, _quantized(SQ_STATIC), "gptq", "weight-only")
    _refused(tmp_path, _quantized(W8A8), "gptq", "weight-only")


def test_gptq_mixed_layers_refused(tmp_path, one_thread):
    model = _quantized(W4G32A)
    lin = torch.nn.Linear(64, 64, bias=False)
    model.model.layers[0].self_attn.q_proj = lq.QLinear.from_linear(lin, w_bits=8, act=None)
    _refused(tmp_path, model, "gptq", "one bits / group_size / sym")
    # compressed-tensors says it with two config groups naming their layers
    out = lq.save(model, tmp_path / "ct", format="compressed-tensors")
    groups = json.load(open(os.path.join(out, "config.json")))["quantization_config"]["config_groups"]
    assert sorted(len(g["targets"]) for g in groups.values()) == [1, 13]
    back = lq.load(out)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, back(IDS).logits)


def test_gptq_v1_zero_point_of_qmin_refused(tmp_path, one_thread):
    model = _quantized(W4G32A)
    layer = model.model.layers[0].mlp.up_proj
    w = layer.dequantize()
    w[3, :32] = w[3, :32].abs() + 0.01  # a group entirely above 0: zero-point qmin (unsigned 0)
    layer.set_weight(w)
    assert int(layer.w_zero[3, 0]) == -8
    _refused(tmp_path, model, "gptq", "cannot be stored in GPTQ v1")
    back = lq.load(lq.save(model, tmp_path / "ct", format="compressed-tensors"))  # no such limit there
    assert torch.equal(back.model.layers[0].mlp.up_proj.w_zero, layer.w_zero)


def test_other_refusals(tmp_path, one_thread):
    _refused(tmp_path, _quantized(W8CH, arch="gpt2"), "compressed-tensors", "Conv1D")
    _refused(tmp_path, _quantized(W8CH), "onnx", "expected format one of native, compressed-tensors, gptq, awq")
    _refused(tmp_path, _llama(), "gptq", "no QLinear")
    sim = _llama()
    lq.quantize(sim, "simquant", calib=_calib(), progress=False)
    lq.quantize(sim, "absmax", calib=_calib(), progress=False, act=None)
    _refused(tmp_path, sim, "compressed-tensors", "KV cache")


def test_destination_rules(tmp_path, one_thread):
    model = _quantized(W4G32S)
    other = tmp_path / "theirs"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not an llmeasyquant output"):
        lq.save(model, other, format="gptq")
    assert (other / "notes.txt").read_text() == "keep"
    out = lq.save(model, tmp_path / "m", format="gptq")
    lq.save(model, out, format="compressed-tensors")  # our export: replaced without overwrite
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"]["quant_method"] == \
        "compressed-tensors"
    assert not os.path.exists(os.path.join(out, "quantization.json"))
    lq.save(model, out)  # and back to native
    assert os.path.exists(os.path.join(out, "quantization.json"))


# ------------------------------------------------------------- act order (g_idx)
@pytest.mark.parametrize("case", [W4G32A, W4G32S], ids=["w4-asym", "w4-sym"])
def test_gptq_act_order_round_trip_and_layout(tmp_path, one_thread, case):
    model = tiny_models.make_act_order(_quantized(case))
    with torch.no_grad():
        ref = model(IDS).logits
    out = lq.save(model, tmp_path / "m", format="gptq")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["desc_act"] is True
    # the file by GPTQ's own rule, w[k, n] = scales[g_idx[k], n] * (qw_u[k, n] - zp_u[g_idx[k], n]),
    # is the weight the layer multiplies with (in the input's column order)
    t = _read(out)
    name = "model.layers.1.mlp.up_proj"
    layer = _qlinears(model)[name]
    b, K, N = layer.w_bits, layer.in_features, layer.out_features
    from llmeasyquant.formats import int32_pack

    qw_u = int32_pack.unpack(t[f"{name}.qweight"], b, K, dim=0).to(torch.float32)  # [K, N]
    zp_u = int32_pack.unpack(t[f"{name}.qzeros"], b, N, dim=1).to(torch.float32) + 1  # v1: stored - 1
    gi = t[f"{name}.g_idx"].to(torch.int64)
    assert sorted(torch.bincount(gi).tolist()) == [32] * (K // 32)
    assert not torch.equal(gi, torch.arange(K) // 32)  # really permuted
    w = t[f"{name}.scales"].float()[gi] * (qw_u - zp_u[gi])
    assert torch.equal(w.t(), layer.dequantize())
    back = lq.load(out)
    assert torch.equal(_qlinears(back)[name].in_perm, layer.in_perm)
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, ref)
    for n, m in _qlinears(back).items():
        assert all(torch.equal(v, _qlinears(model)[n].state_dict()[k]) for k, v in m.state_dict().items()), n


def test_act_order_native_round_trip_and_refusals(tmp_path, one_thread):
    model = tiny_models.make_act_order(_quantized(W4G32A))
    with torch.no_grad():
        ref = model(IDS).logits
    native = lq.save(model, tmp_path / "native")
    with torch.no_grad():
        assert torch.equal(lq.load(native)(IDS).logits, ref)
    for fmt, match in (("compressed-tensors", "act-order.*no g_idx"), ("awq", "act-order.*no g_idx")):
        with pytest.raises(ValueError, match=match):
            lq.save(model, tmp_path / fmt, format=fmt)
    # a peer compressed-tensors file claiming the removed g_idx ordering is refused, never read unordered
    ct = lq.save(_quantized(W4G32A), tmp_path / "ct", format="compressed-tensors")
    _edit_config(ct, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
        actorder="group"))
    with pytest.raises(FolderError, match="actorder 'group'"):
        lq.load(ct)


# ------------------------------------------------------------- untrusted folders
def _edit_config(path, fn):
    p = os.path.join(path, "config.json")
    cfg = json.load(open(p))
    fn(cfg)
    json.dump(cfg, open(p, "w"))


def _rewrite_tensors(path, fn):
    from safetensors.torch import save_file

    t = _read(path)
    fn(t)
    save_file(t, os.path.join(path, "model.safetensors"))


def test_untrusted_foreign_folders(tmp_path, one_thread):
    model = _quantized(W4G32A)
    ct = lq.save(model, tmp_path / "ct", format="compressed-tensors")
    gq = lq.save(model, tmp_path / "gq", format="gptq")
    name = "model.layers.0.self_attn.q_proj"

    def fails(path, match):
        with pytest.raises(FolderError, match=match):
            lq.load(path)

    import shutil

    def copy(src, tag):
        dst = tmp_path / tag
        shutil.copytree(src, dst)
        return dst

    d = copy(ct, "shape")
    _rewrite_tensors(d, lambda t: t.update({f"{name}.weight_shape": torch.tensor([64, 32])}))
    fails(d, "weight_shape")
    d = copy(ct, "packed")
    _rewrite_tensors(d, lambda t: t.update({f"{name}.weight_packed": torch.zeros(64, 4, dtype=torch.int32)}))
    fails(d, "does not match|expected int32")
    d = copy(ct, "kv")
    _edit_config(d, lambda c: c["quantization_config"].update(kv_cache_scheme={"num_bits": 8, "type": "float"}))
    fails(d, "kv_cache_scheme")
    d = copy(ct, "float")
    _edit_config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(type="float"))
    fails(d, "float weights")
    d = copy(gq, "gidx")  # groups of unequal sizes: no act order gives that
    _rewrite_tensors(d, lambda t: t.update({f"{name}.g_idx": (torch.arange(64) >= 48).to(torch.int32)}))
    fails(d, "g_idx does not give every group exactly 32")
    d = copy(gq, "gidx-range")
    _rewrite_tensors(d, lambda t: t.update({f"{name}.g_idx": torch.full((64,), 7, dtype=torch.int32)}))
    fails(d, "outside")
    d = copy(gq, "bits")
    _edit_config(d, lambda c: c["quantization_config"].update(bits=3))
    fails(d, "expected bits in")
    d = copy(gq, "missing")
    _rewrite_tensors(d, lambda t: t.pop(f"{name}.qzeros"))
    fails(d, "lacks tensor")
    # a header claiming more bytes than the file holds
    d = copy(gq, "truncated")
    p = d / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 64])
    fails(d, "truncated or corrupt")
    # a header whose length field points past the end
    d = copy(ct, "hdr")
    p = d / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    fails(d, "header length")
    # a link leaving the folder
    d = copy(ct, "link")
    os.replace(d / "model.safetensors", tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", d / "model.safetensors")
    fails(d, "outside the folder")
    # a shard index naming a path outside the folder
    d = copy(ct, "index")
    json.dump({"weight_map": {f"{name}.weight_scale": "../outside.safetensors"}},
              open(d / "model.safetensors.index.json", "w"))
    fails(d, "plain .safetensors names")


def test_remote_code_never_runs(tmp_path, one_thread):
    out = lq.save(_quantized(W4G32S), tmp_path / "m", format="gptq")
    sentinel = tmp_path / "ran"
    (tmp_path / "m" / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n"
                                            "from transformers import LlamaConfig as EvilConfig\n")
    _edit_config(out, lambda c: c.update(auto_map={"AutoConfig": "evil.EvilConfig"}))
    try:
        lq.load(out)
    except ValueError:
        pass  # refusing is fine too; running the code is not
    assert not sentinel.exists()


def test_sharded_peer_folder(tmp_path, one_thread):
    """A folder split into shards with an index (as large checkpoints are)."""
    from safetensors.torch import save_file

    model = _quantized(W4G32A)
    out = lq.save(model, tmp_path / "m", format="gptq")
    t = _read(out)
    keys = sorted(t)
    half = len(keys) // 2
    parts = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for f, ks in parts.items():
        save_file({k: t[k] for k in ks}, os.path.join(out, f))
    os.remove(os.path.join(out, "model.safetensors"))
    json.dump({"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}},
              open(os.path.join(out, "model.safetensors.index.json"), "w"))
    back = lq.load(out)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, back(IDS).logits)


@pytest.mark.parametrize("fmt,legacy", [("gptq", "quantize_config.json"), ("awq", "quant_config.json")])
def test_legacy_config_file(tmp_path, one_thread, fmt, legacy):
    """Older AutoGPTQ / AutoAWQ folders keep the config in a file of its own."""
    model = _quantized(W4G32A)
    out = lq.save(model, tmp_path / "m", format=fmt)
    cfg = json.load(open(os.path.join(out, "config.json")))
    qc = cfg.pop("quantization_config")
    qc.pop("quant_method")
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    json.dump(qc, open(os.path.join(out, legacy), "w"))
    from llmeasyquant.io import is_quantized_folder

    assert is_quantized_folder(out)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, lq.load(out)(IDS).logits)


# --------------------------------------------------- transformers and peers
def _tf_load(path, **kw):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()


@needs_ct
@pytest.mark.parametrize("case", [W4G32S, W4G64S, W8CH], ids=["w4g32-sym", "w4g64-sym", "w8-channel"])
def test_transformers_reads_our_weight_only(tmp_path, one_thread, case):
    model = _quantized(case)
    out = lq.save(model, tmp_path / "m", format="compressed-tensors")
    theirs = _tf_load(out)
    with torch.no_grad():
        a, b = lq.load(out)(IDS).logits, theirs(IDS).logits
    # same integers and scales; only the matmul's float summation order differs
    assert (a - b).abs().max() < 1e-5


@needs_ct
def test_transformers_reads_our_asymmetric_dequantized(tmp_path, one_thread):
    # compressed-tensors 0.20.1's default (compressed) load path sizes the
    # packed zero-points of an asymmetric pack-quantized model wrongly on the
    # meta device (transformers 5.24 then stops on the size mismatch, for
    # compressed-tensors' own checkpoints as for ours); dequantize=True reads them.
    from transformers import CompressedTensorsConfig

    model = _quantized(W4G32A)
    out = lq.save(model, tmp_path / "m", format="compressed-tensors")
    theirs = _tf_load(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, layer in _qlinears(model).items():
        assert torch.equal(layer.dequantize(), theirs.get_submodule(name).weight), name
    with torch.no_grad():
        assert (model(IDS).logits - theirs(IDS).logits).abs().max() < 1e-5


def _ct_rule_reference(model):
    """Our loaded W8A8 model with compressed-tensors' per-token rule: scale =
    absmax / 127.5 (calculate_qparams: max / (bit_range / 2) with bit_range =
    127 - (-128) = 255), q = clamp(round(x / scale), -128, 127), then the
    float product with the dequantized weight."""
    import copy

    ref = copy.deepcopy(model)

    class CtRule(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.w, self.b = layer.dequantize(), layer.bias

        def forward(self, x):
            amax = torch.maximum(x.amin(-1, keepdim=True).abs(), x.amax(-1, keepdim=True).abs())
            s = amax / 127.5
            s = torch.where(s == 0, torch.finfo(s.dtype).eps, s)
            xq = torch.clamp(torch.round(x / s), -128, 127) * s
            return torch.nn.functional.linear(xq, self.w, self.b)

    for name, layer in _qlinears(ref).items():
        ref.set_submodule(name, CtRule(layer))
    return ref


@needs_ct
def test_transformers_reads_our_w8a8(tmp_path, one_thread):
    model = _quantized(W8A8)
    out = lq.save(model, tmp_path / "m", format="compressed-tensors")
    theirs = _tf_load(out)
    ours = lq.load(out)
    with torch.no_grad():
        a, b, ref = ours(IDS).logits, theirs(IDS).logits, _ct_rule_reference(ours)(IDS).logits
    # transformers runs compressed-tensors' fake quantization: the same weights,
    # activations rounded per token with absmax/127.5 where we (and vLLM's int8
    # kernels) use absmax/127. With that one rule swapped our model gives
    # transformers' logits to float rounding ...
    assert (ref - b).abs().max() < 1e-4
    # ... and the two rules differ by activation rounding only: well inside
    # the quantization error itself (measured ~5e-3 on logits of ~0.3)
    float_model = _llama()
    with torch.no_grad():
        q_err = (float_model(IDS).logits - a).abs().max()
    assert (a - b).abs().max() < max(2 * q_err, 1e-2)


@needs_ct
def test_transformers_reads_our_static_w8a8(tmp_path, one_thread):
    """SmoothQuant W8A8 with a static per-tensor scale: symmetric, so both
    rounding rules give the same integers; only float summation order differs."""
    model = _quantized(SQ_STATIC)
    out = lq.save(model, tmp_path / "m", format="compressed-tensors")
    t = _read(out)
    name = "model.layers.0.mlp.up_proj"
    assert torch.equal(t[f"{name}.input_scale"], model.get_submodule(name).act_scale)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"]["strategy"] == "tensor"
    with torch.no_grad():
        a, b = lq.load(out)(IDS).logits, _tf_load(out)(IDS).logits
    assert (a - b).abs().max() < 1e-4


def _peer_folder(path, bits, group_size, symmetric, act=False):
    """A checkpoint written by compressed-tensors itself (no llmcompressor):
    its quantization applied to a tiny model, qparams from its own
    calculate_qparams, compressed and saved by its ModelCompressor."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = _llama(seed=5)
    wargs = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group" if group_size else "channel",
                             group_size=group_size)
    iargs = QuantizationArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True) if act else None
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=wargs,
                                                                         input_activations=iargs)},
                            ignore=["lm_head"])
    apply_quantization_config(model, qc)
    for _, m in model.named_modules():
        if hasattr(m, "weight_scale"):
            w = m.weight.detach()
            g = w.reshape(w.shape[0], -1, group_size) if group_size else w.unsqueeze(1)
            s, z = calculate_qparams(g.amin(-1), g.amax(-1), wargs)
            m.weight_scale.data.copy_(s.reshape(m.weight_scale.shape))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data.copy_(z.reshape(m.weight_zero_point.shape))
            m.quantization_status = QuantizationStatus.FROZEN
    comp = ModelCompressor.from_pretrained_model(model, None)
    comp.compress_model(model)
    model.save_pretrained(str(path))
    comp.update_config(str(path))
    comp.decompress_model(model)  # compressed-tensors' own reading of what it wrote
    return model


@needs_ct
@pytest.mark.parametrize("bits,group_size,symmetric,act", [(4, 32, False, False), (4, 64, True, False),
                                                           (8, None, True, False), (8, None, True, True)],
                         ids=["w4g32-asym", "w4g64-sym", "w8-channel", "w8a8"])
def test_peer_compressed_tensors_checkpoint(tmp_path, one_thread, bits, group_size, symmetric, act):
    peer = _peer_folder(tmp_path / "peer", bits, group_size, symmetric, act)
    fmt = json.load(open(tmp_path / "peer" / "config.json"))["quantization_config"]["format"]
    assert fmt == ("int-quantized" if act else "pack-quantized")
    ours = lq.load(tmp_path / "peer")
    layers = _qlinears(ours)
    assert len(layers) == 14
    for name, layer in layers.items():
        assert (layer.w_bits, layer.w_group_size, layer.act) == (bits, group_size or -1, "dynamic" if act else None)
        assert torch.equal(layer.dequantize(), peer.get_submodule(name).weight.detach()), name
    if not act:
        with torch.no_grad():  # same weights: the float product differs only in summation order
            assert (ours(IDS).logits - peer(IDS).logits).abs().max() < 1e-5


# ----------------------------------------------------------------------- CLI
def test_cli_export_format(tmp_path, one_thread, capsys):
    from llmeasyquant.cli import main

    model = _quantized(W4G32A)
    src = lq.save(model, tmp_path / "native", tokenizer=tiny_models.byte_tokenizer())
    assert main(["export", src, "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    assert "gptq" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, lq.load(tmp_path / "g")(IDS).logits)
    assert main(["export", str(tmp_path / "g"), "--format", "compressed-tensors", "--out",
                 str(tmp_path / "c")]) == 0
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, lq.load(tmp_path / "c")(IDS).logits)
    with pytest.raises(SystemExit):
        main(["export", src])  # neither --onnx nor --format
    assert main(["export", src, "--format", "gptq"]) == 2  # --format needs --out
    assert "needs --out" in capsys.readouterr().err
