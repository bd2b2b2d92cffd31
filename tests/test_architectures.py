"""Architectures beyond the original six (declared ArchSpecs) and the generic
fallback for undeclared ones, on tiny random-weight models built locally.

Thresholds are relative (to the float logits), never numbers measured on one
machine. Forward passes run under no_grad, as inference does (generate,
perplexity): see test_falcon_weight_only_forward_with_grad for why."""

import copy
import logging
import types

import pytest
import torch
from torch import nn

from conftest import lq
from llmeasyquant.methods._common import fold_scales
from llmeasyquant.methods.simquant import SimQuantConfig, make_cache
from llmeasyquant.models.archs import ScaleGroup
from llmeasyquant.plots import pick_layer
from llmeasyquant.models.describe import describe, format_report
from llmeasyquant.models.discover import discover_groups
from llmeasyquant.models.extract import extract
from tiny_models import ALL, DENSE, VOCAB, awq_save_load, build, calib_batches, max_rel, token_ids

# keys quantized before RoPE (one rotate-half RoPE over the whole head_dim)?
PRE_ROPE = {"gemma": True, "gemma2": True, "gemma3_text": False,  # per-layer-type RoPE tables
            "phi3": True, "gpt_neox": False,  # partial rotary
            "falcon": True, "falcon-new-arch": True, "falcon-sequential": True, "falcon-alibi": False,
            "cohere": False,  # interleaved RoPE
            "olmo2": True, "granite": True, "starcoder2": True}

W8_METHODS = [("absmax", {}), ("zeroquant", {"w_bits": 8}), ("smoothquant", {"alpha_grid": (0.4, 0.6)}),
              ("awq", {"w_bits": 8, "w_group_size": 16, "grid": 5}), ("gptq", {"w_bits": 8, "w_group_size": 16})]


def _ids(T=20, seed=9):
    return token_ids(1, T, seed)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _model_type(name: str) -> str:
    return name.split("-")[0]





def _width(block, group) -> int:
    m = block.get_submodule(group.linears[0])
    return m.weight.shape[0] if type(m).__name__ == "Conv1D" else m.weight.shape[1]


def _fold_random(model, spec, groups, seed=3):
    g = torch.Generator().manual_seed(seed)
    for block in spec.blocks:
        for grp in groups:
            s = torch.rand(_width(block, grp), generator=g, dtype=torch.float64) * 4 + 0.25
            fold_scales(block, grp, s)


def _norm_groups(groups):
    return {(g.prev, frozenset(g.linears), g.weight_offset) for g in groups if g.prev_kind == "norm"}


# --------------------------------------------------------------------------
# declared architectures
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", DENSE)
def test_declared_spec_matches_the_model_and_discovery(name):
    model = build(name)
    spec = extract(model)
    assert spec.declared and spec.model_type == _model_type(name) and len(spec.blocks) == 2
    for p in spec.linear_paths():
        assert lq.nn.is_quantizable(model.get_submodule(p))
    assert spec.extra_linears == ["lm_head"]
    for p in spec.arch.final:
        model.get_submodule(p)
    # the fallback's discovery, run on the declared model, finds exactly the
    # declared norm groups (Gemma's x*(1+w) included): the two agree
    found = discover_groups(model, spec.blocks, spec.block_linears)
    assert _norm_groups(found.groups) == _norm_groups(spec.groups) and not found.skipped
    assert pick_layer(model) == f"{spec.arch.layers_path}.1.{spec.arch.representative}"


def test_declared_groups_per_architecture():
    """What the issue asks of each architecture's groups, spelled out."""
    def groups(name):
        return {(g.prev, g.linears, g.weight_offset, g.prev_part) for g in extract(build(name)).groups}

    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert ("input_layernorm", qkv, 1.0, None) in groups("gemma")
    # Gemma 2/3: the MLP reads pre_feedforward_layernorm; the post_* norms feed no linear
    for name in ("gemma2", "gemma3_text"):
        g = groups(name)
        assert ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), 1.0, None) in g
        assert not any(p.startswith("post_") for p, *_ in g)
    assert groups("phi3") == {("input_layernorm", ("self_attn.qkv_proj",), 0.0, None),
                              ("post_attention_layernorm", ("mlp.gate_up_proj",), 0.0, None),
                              ("mlp.gate_up_proj", ("mlp.down_proj",), 0.0, (1, 2)),  # the up half only
                              ("self_attn.qkv_proj", ("self_attn.o_proj",), 0.0, (2, 3))}  # v (MHA tiny config)
    assert groups("gpt_neox") == {("input_layernorm", ("attention.query_key_value",), 0.0, None),
                                  ("post_attention_layernorm", ("mlp.dense_h_to_4h",), 0.0, None)}
    assert groups("falcon") == {("input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h"),
                                 0.0, None)}
    assert {g[0] for g in groups("falcon-new-arch")} == {"ln_attn", "ln_mlp"}
    assert {g[0] for g in groups("falcon-sequential")} == {"input_layernorm", "post_attention_layernorm"}
    assert ("input_layernorm", qkv + ("mlp.gate_proj", "mlp.up_proj"), 0.0, None) in groups("cohere")
    # OLMo-2: post-norms only, no norm group; v -> o (MHA) and up -> down
    assert {g[0] for g in groups("olmo2")} == {"self_attn.v_proj", "mlp.up_proj"}
    assert "self_attn.v_proj" not in {g[0] for g in groups("granite")}  # GQA tiny config
    spec = extract(build("phi3"))
    assert [f.path for f in spec.arch.fused] == ["self_attn.qkv_proj", "mlp.gate_up_proj"]


@pytest.mark.parametrize("name", DENSE)
def test_folding_is_exact_before_quantization(name):
    model = build(name).double()
    ids = _ids()
    ref = model(ids).logits
    spec = extract(model)
    _fold_random(model, spec, spec.groups)
    # Gemma's and Cohere's norms compute in float32 whatever the model's dtype:
    # float32 rounding, far below what a wrong fold does (test below: > 1e-3)
    assert max_rel(model(ids).logits, ref) < 1e-5


def test_a_wrong_fold_is_detected():
    """The exactness check is sensitive: the gate half of Phi-3's gate_up_proj,
    or Gemma's norm folded as x*w, change the logits."""
    for name, wrong in (("phi3", ScaleGroup("mlp.gate_up_proj", "linear", ("mlp.down_proj",), prev_part=(0, 2))),
                        ("gemma", ScaleGroup("input_layernorm", "norm",
                                             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")))):
        model = build(name).double()
        ids = _ids()
        ref = model(ids).logits
        _fold_random(model, extract(model), [wrong])
        assert max_rel(model(ids).logits, ref) > 1e-3, name


@pytest.fixture(scope="module")
def float_models():
    return {name: build(name) for name in DENSE}


@pytest.mark.parametrize("method,opts", W8_METHODS, ids=[m for m, _ in W8_METHODS])
@pytest.mark.parametrize("name", DENSE)
def test_methods_at_w8_stay_close_to_float(float_models, name, method, opts):
    model = copy.deepcopy(float_models[name])
    ids = _ids()
    ref = model(ids).logits
    lq.quantize(model, method, calib=calib_batches(), progress=False, **opts)
    spec = extract(model)
    assert sum(isinstance(m, lq.QLinear) for m in model.modules()) == len(spec.linear_paths())
    out = model(ids).logits
    assert torch.isfinite(out).all()
    assert max_rel(out, ref) < 0.05, (name, method, max_rel(out, ref))


@pytest.mark.parametrize("name", DENSE)
def test_simquant_kv_cache(float_models, name):
    model = copy.deepcopy(float_models[name])
    ids = _ids(T=20)
    ref = model(ids).logits
    cfg = SimQuantConfig(k_bits=8, v_bits=8, chunk_size=4, residual_length=0)
    cache = make_cache(model, cfg)
    assert cache.pre_rope == PRE_ROPE[name]
    out = model(ids, cache=cache, use_cache=True).logits
    assert max_rel(out, ref) < 0.05
    # plain generate() goes through the quantized cache, past the sliding window (8) of Gemma 2/3
    lq.quantize(model, "simquant", k_bits=8, v_bits=8, chunk_size=4, residual_length=64, progress=False)
    gen = model.generate(ids[:, :4], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         return_dict_in_generate=True)
    assert type(gen.cache).__name__ == "SimQuantCache" and gen.sequences.shape[1] == 16


@pytest.mark.parametrize("name", DENSE)
def test_save_load_bit_identical(float_models, name, tmp_path):
    # AWQ W4 g16: scales folded into the norms (changed float weights) and
    # packed 4-bit weights with zero-points, in one run
    ref, _, out = awq_save_load(copy.deepcopy(float_models[name]), _ids(), tmp_path / "q")
    assert torch.equal(out, ref), name


def test_falcon_weight_only_forward_with_grad():
    """Falcon adds attention into the MLP output in place; under grad mode
    that needs QLinear's output to be a tensor of its own, not a view."""
    model = build("falcon")
    lq.quantize(model, "absmax", progress=False)  # weight-only by default
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    with torch.enable_grad():
        out = model(ids).logits
    assert torch.equal(out.detach(), ref)


def test_tensor_parallel_layouts_come_from_the_spec():
    from llmeasyquant.distributed import tensor_parallel as tp
    from llmeasyquant.models.archs import tp_model_types

    assert set(tp_model_types()) == {"llama", "mistral", "qwen2", "qwen3", "opt"}
    with pytest.raises(ValueError, match="no layout for model type 'gemma'; supported: llama, mistral, opt"):
        tp.shard_block(nn.Module(), "gemma", 0, 2)


def test_info_arch_cli(tmp_path, capsys):
    from llmeasyquant import cli
    from tiny_models import byte_tokenizer

    build("gemma2").save_pretrained(tmp_path / "g2")
    byte_tokenizer().save_pretrained(tmp_path / "g2")
    logger = logging.getLogger("llmeasyquant")
    handlers, level = list(logger.handlers), logger.level
    try:
        assert cli.main(["info", "--arch", str(tmp_path / "g2")]) == 0
    finally:  # main() logs to the captured stderr: do not leave that handler behind
        logger.handlers[:], logger.level = handlers, level
    out = capsys.readouterr().out
    assert "model type gemma2: declared" in out and "decoder blocks: 2 at model.layers" in out
    assert "pre_feedforward_layernorm (x*(1+w)) -> mlp.gate_proj, mlp.up_proj" in out


# --------------------------------------------------------------------------
# the generic fallback: a decoder no ArchSpec declares
# --------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class _Block(nn.Module):
    def __init__(self, d, heads, norm_residual=False):
        super().__init__()
        self.ln_attn, self.ln_mlp = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        # True: the residual adds the *normed* input, so folding ln_attn is not exact
        self.norm_residual = norm_residual

    def forward(self, x):
        h = self.ln_attn(x)
        x = (h if self.norm_residual else x) + self.attn(h)
        return x + self.mlp(self.ln_mlp(x))


class MyDecoder(nn.Module):
    """Embedding, identical blocks, final norm, head; ``config.model_type``
    is one llmeasyquant has never heard of."""

    def __init__(self, d=64, heads=4, layers=2, norm_residual=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = types.SimpleNamespace(model_type="my_decoder", vocab_size=VOCAB)
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(_Block(d, heads, norm_residual) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.add_(0.2 * torch.randn_like(m.weight))
                    m.bias.add_(0.1 * torch.randn_like(m.bias))

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, use_cache=False, **kwargs):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return types.SimpleNamespace(logits=self.lm_head(self.norm(h)))


_MINE = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.0", "mlp.2")


def test_fallback_finds_blocks_linears_and_groups(caplog):
    model = MyDecoder().eval()
    spec = extract(model)
    assert not spec.declared and spec.arch.layers_path == "blocks" and len(spec.blocks) == 2
    assert spec.block_linears == _MINE and spec.extra_linears == ["lm_head"]
    assert spec.arch.final == ("norm",)
    with caplog.at_level(logging.INFO, logger="llmeasyquant"):
        groups = spec.groups
    assert set(groups) == {ScaleGroup("ln_attn", "norm", ("attn.q", "attn.k", "attn.v")),
                           ScaleGroup("ln_mlp", "norm", ("mlp.0",))}
    assert "discovered scale groups" in caplog.text
    report = describe(model)
    assert report.source == "generic fallback" and report.declared_groups is None
    assert "scale groups (discovered, verified by exact folding, used)" in format_report(report)
    assert pick_layer(model) == "blocks.1.mlp.2"


@pytest.mark.parametrize("method,opts", W8_METHODS, ids=[m for m, _ in W8_METHODS])
def test_fallback_quantizes(method, opts):
    model = MyDecoder().eval()
    ids = _ids()
    ref = model(ids).logits
    ln = model.blocks[0].ln_attn.weight.clone()
    lq.quantize(model, method, calib=calib_batches(), progress=False, **opts)
    assert sum(isinstance(m, lq.QLinear) for m in model.modules()) == 2 * len(_MINE)
    out = model(ids).logits
    assert torch.isfinite(out).all() and max_rel(out, ref) < 0.05, max_rel(out, ref)
    # SmoothQuant / AWQ folded into the discovered norm
    assert (not torch.equal(model.blocks[0].ln_attn.weight, ln)) == (method in ("smoothquant", "awq"))


def test_fallback_folding_is_exact():
    model = MyDecoder().double().eval()
    ids = _ids()
    ref = model(ids).logits
    spec = extract(model)
    _fold_random(model, spec, spec.groups)
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-9, atol=1e-9)


def test_fallback_skips_a_group_that_does_not_fold_exactly(caplog):
    model = MyDecoder(norm_residual=True).eval()
    ids = _ids()
    ref = model(ids).logits
    with caplog.at_level(logging.WARNING, logger="llmeasyquant"):
        spec = extract(model)
        groups = spec.groups
    # ln_attn feeds q/k/v *and* the residual: a candidate, refused by the check
    assert [g.prev for g in groups] == ["ln_mlp"]
    assert spec.discovery.skipped[0][0] == "ln_attn -> attn.q, attn.k, attn.v"
    assert "skipped the discovered scale group ln_attn" in caplog.text
    w = model.blocks[0].ln_attn.weight.clone()
    lq.quantize(model, "smoothquant", calib=calib_batches(), progress=False)
    assert torch.equal(model.blocks[0].ln_attn.weight, w)  # never folded
    assert max_rel(model(ids).logits, ref) < 0.05


def test_fallback_without_groups_still_runs_smoothquant_and_awq(caplog):
    model = MyDecoder(norm_residual=True).eval()
    for block in model.blocks:  # no norm feeds the MLP any more
        block.ln_mlp = nn.Identity()
    with caplog.at_level(logging.WARNING, logger="llmeasyquant"):
        lq.quantize(model, "awq", calib=calib_batches(), progress=False, w_bits=8, w_group_size=16, grid=5)
    assert "found no foldable scale group" in caplog.text
    assert sum(isinstance(m, lq.QLinear) for m in model.modules()) == 2 * len(_MINE)


def test_fallback_refuses_clearly():
    model = MyDecoder()
    model.blocks[1].mlp[2] = nn.Identity()
    with pytest.raises(ValueError, match=r"needs identical blocks: expected blocks.1 to have the linears of block 0"):
        extract(model)
    with pytest.raises(ValueError, match="SimQuant KV-cache quantization supports model types .*got 'my_decoder'"):
        lq.quantize(MyDecoder(), "simquant", progress=False)


def test_fallback_prefers_no_split_modules():
    """transformers' own marker of a decoder layer wins over a longer list."""
    model = MyDecoder(layers=2)
    model.extra = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))
    assert extract(model).arch.layers_path == "extra"
    model._no_split_modules = ["_Block"]
    assert extract(model).arch.layers_path == "blocks"
    # without the marker, a longer list *inside* a block (experts, ...) is not the stack of blocks
    del model.extra, model._no_split_modules
    for block in model.blocks:
        block.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))
    assert extract(model).arch.layers_path == "blocks"


def test_declared_type_without_a_declared_layout_is_refused():
    model = build("falcon")
    del model.transformer.h[0].input_layernorm
    with pytest.raises(ValueError, match="falcon model: expected its decoder block to have one of the declared "
                                         "layouts"):
        extract(model)


@pytest.mark.parametrize("name", ALL)
def test_original_six_unchanged(name):
    """The declared six keep their groups; discovery agrees with their norm groups."""
    model = build(name)
    spec = extract(model)
    found = discover_groups(model, spec.blocks, spec.block_linears)
    assert _norm_groups(found.groups) == _norm_groups(spec.groups) and not found.skipped
    assert all(g.weight_offset == 0.0 and g.prev_part is None for g in spec.groups)
