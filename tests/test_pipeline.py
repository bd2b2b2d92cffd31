"""The method registry and the blockwise driver (llmeasyquant.pipeline): a new
method added by one module (here: this file), the driver's order and inputs,
memory held, statistics equal to a whole-model pass."""

import gc
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import transformers as tf

import llmeasyquant as lq
from llmeasyquant.calibration import observe_model
from llmeasyquant.methods import QuantConfig, config_for, method_for, register_method, unregister_method
from llmeasyquant.methods._common import quantize_owned, swap, target_paths, to_qlinear
from llmeasyquant.models.extract import extract
from llmeasyquant.pipeline import BlockHooks, observe_blocks, run_blocks
from llmeasyquant.sharding import Shard

from tiny_models import build


def _batches(n=3, T=32, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, T), generator=g) for _ in range(n)]


# ---------------------------------------------------------------- a new method
@dataclass
class _ClippedRTNConfig(QuantConfig):
    """Test method: per block, clip each linear's weights to the largest
    magnitude its inputs make worthwhile (here: a fixed quantile), then RTN."""

    method: ClassVar[str] = "test_clipped_rtn"
    w_bits: int = 8
    quantile: float = 0.999


class _ClippedRTN(BlockHooks):
    desc = "test method"

    def __init__(self, config, log):
        self.config, self.log = config, log

    def observe(self, ctx):
        self.log.append(("observe", ctx.index, tuple(ctx.names)))
        self.seen = {n: [] for n in ctx.names}
        return {n: self.seen[n].append for n in ctx.names}

    def quantize(self, ctx):
        self.log.append(("quantize", ctx.index, sum(len(v) for v in self.seen.values())))
        for n in ctx.names:
            mod = ctx.module(n)
            lim = mod.weight.abs().flatten().quantile(self.config.quantile)
            mod.weight.clamp_(-lim, lim)
            swap(ctx.block, n, to_qlinear(mod, self.config))


_LOG: list = []


@pytest.fixture
def clipped_rtn():
    @register_method(_ClippedRTNConfig, calibrates=True)
    def apply(model, spec, config, calib, *, progress=True, shard=None, device=None):
        wanted = set(target_paths(model, spec, config.exclude))
        report = run_blocks(model, spec, calib, _ClippedRTN(config, _LOG), targets=wanted, shard=shard,
                            progress=progress, device=device)
        quantize_owned(model, [p for p in spec.extra_linears if p in wanted], config, shard or Shard())
        return report

    _LOG.clear()
    yield apply
    unregister_method("test_clipped_rtn")


def test_a_method_registered_from_a_test_file_runs_saves_and_loads(clipped_rtn, tmp_path):
    assert "test_clipped_rtn" in lq.available_methods()
    assert method_for("test_clipped_rtn").module == __name__
    model = build("llama")
    ids = _batches(1, 24, seed=5)[0]
    with torch.no_grad():
        ref = model(ids).logits
    lq.quantize(model, "test_clipped_rtn", calib=_batches(), progress=False, quantile=0.99)
    spec = extract(model)
    assert all(isinstance(model.get_submodule(p), lq.QLinear) for p in spec.linear_paths())
    # the driver called observe then quantize, block after block, each with every calibration batch
    assert [e[:2] for e in _LOG] == [("observe", 0), ("quantize", 0), ("observe", 1), ("quantize", 1)]
    assert _LOG[1][2] == 3 * len(spec.block_linears)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    lq.save(model, tmp_path / "m")
    back = lq.load(tmp_path / "m")
    assert back.llmeq_config == config_for("test_clipped_rtn", quantile=0.99)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, out)
    assert model.llmeq_report.pipeline.blocks == 2


def test_registry_refuses_what_it_cannot_run():
    with pytest.raises(TypeError, match="QuantConfig subclass"):
        register_method(dict)
    with pytest.raises(ValueError, match="already registered"):
        register_method(method_for("gptq").config)(lambda *a, **k: None)
    with pytest.raises(ValueError, match="unknown method 'nope'; available: .*gptq"):
        config_for("nope")
    # each built-in method says whether it needs calibration, from its own config
    assert method_for("gptq").needs_calibration(config_for("gptq"))
    assert not method_for("absmax").needs_calibration(config_for("absmax"))
    assert method_for("absmax").needs_calibration(config_for("absmax", act="static"))
    assert method_for("mixed").needs_calibration(config_for("mixed", base="gptq"))


# ----------------------------------------------------------------- the driver
class _Record(BlockHooks):
    def __init__(self, sequential):
        self.sequential = sequential
        self.first_inputs = {}

    def observe(self, ctx):
        name = ctx.names[0]
        return {name: lambda x, i=ctx.index: self.first_inputs.setdefault(i, []).append(x.clone())}

    def quantize(self, ctx):
        for n in ctx.names:
            swap(ctx.block, n, to_qlinear(ctx.module(n), config_for("absmax", w_bits=4, w_group_size=16)))


@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_blocks_see_the_quantized_blocks_before_them(sequential):
    """Sequential: block 1's inputs are what quantized block 0 produces.
    Not sequential: the float model's (the observation pass was the forward)."""
    model = build("llama", seed=1)
    spec = extract(model)
    batches = _batches(2, 16, seed=2)
    first = f"{spec.arch.layers_path}.1.{spec.block_linears[0]}"
    float_inputs = []
    observe_model(model, [first], batches, lambda p, x: float_inputs.append(x.reshape(-1, x.shape[-1]).clone()),
                  progress=False)
    hooks = _Record(sequential)
    run_blocks(model, spec, batches, hooks, targets=set(spec.linear_paths()), progress=False)
    seen = hooks.first_inputs[1]
    same = all(torch.equal(a, b) for a, b in zip(seen, float_inputs))
    assert same is (not sequential)
    if sequential:  # and exactly what the quantized block 0 gives
        q_inputs = []
        observe_model(model, [first], batches, lambda p, x: q_inputs.append(x.reshape(-1, x.shape[-1]).clone()),
                      progress=False)
        assert all(torch.equal(a, b) for a, b in zip(seen, q_inputs))


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_blockwise_statistics_equal_a_whole_model_pass(arch):
    model = build(arch, seed=3)
    spec = extract(model)
    batches = _batches(3, 20, seed=4)
    paths = spec.linear_paths()
    a, b = {}, {}
    observe_model(model, paths, batches, lambda p, x: a.setdefault(p, []).append(x.reshape(-1, x.shape[-1])),
                  progress=False)
    observe_blocks(model, spec, batches, paths, lambda p, x: b.setdefault(p, []).append(x), progress=False)
    assert a.keys() == b.keys()
    for p in paths:
        assert all(torch.equal(x, y) for x, y in zip(a[p], b[p])), p


def _deep_llama(layers=12, hidden=64):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 3 // 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).eval()


class _CountHidden(BlockHooks):
    """Counts the live hidden-state tensors (shape [1, T, hidden]) while a block is processed."""

    def __init__(self, shape):
        self.shape, self.live = shape, []

    def quantize(self, ctx):
        gc.collect()
        self.live.append(sum(1 for o in gc.get_objects()
                             if type(o) is torch.Tensor and tuple(o.shape) == self.shape))


def test_one_block_of_activations_at_a_time():
    """12 blocks x 8 batches x 128 tokens: all blocks' hidden states at once
    would be 12x one block's; the driver holds one block's inputs and the
    outputs being built, whichever method runs (GPTQ here, and a counter)."""
    layers, n, T, hidden = 12, 8, 128, 64
    model = _deep_llama(layers, hidden)
    batches = _batches(n, T, seed=6)
    one_block = n * T * hidden * 4
    limit = 3 * one_block  # inputs + outputs + masks / rotary tables, with room
    assert layers * one_block > limit  # holding every block's activations would break the limit
    lq.quantize(model, "gptq", calib=batches, progress=False, w_bits=4, w_group_size=32)
    rep = model.llmeq_report
    assert rep.pipeline.blocks == layers and rep.pipeline.batches == n
    assert one_block <= rep.pipeline.peak_activation_bytes <= limit
    assert rep.memory.rss_peak_bytes is None or rep.memory.rss_peak_bytes > 0
    assert "MiB" in rep.summary()
    # independently of the driver's own accounting: live tensors of that shape
    counter = _CountHidden((1, T, hidden))
    model = _deep_llama(layers, hidden)
    run_blocks(model, extract(model), batches, counter, targets=set(), progress=False)
    assert max(counter.live) <= 2 * n + 4, counter.live


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device placement of blocks)")
def test_model_on_cpu_quantized_block_by_block_on_cuda():
    model = _deep_llama(12, 512)
    ref = _deep_llama(12, 512)
    batches = _batches(4, 64, seed=7)
    lq.quantize(ref, "gptq", calib=batches, progress=False)
    weights = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    lq.quantize(model, "gptq", calib=batches, progress=False, device="cuda")
    assert next(model.parameters()).device.type == "cpu"  # the model stays home
    assert model.llmeq_report.pipeline.device.startswith("cuda")
    # one block on the GPU at a time: its peak is far below the blocks' weights + activations
    assert model.llmeq_report.memory.cuda_peak_bytes < weights / 2
    for p in extract(model).linear_paths():
        a, b = model.get_submodule(p), ref.get_submodule(p)
        # float64 Hessians on another device: the same integers up to rare rounding ties
        assert (a.qweight != b.qweight).float().mean() < 0.01, p
