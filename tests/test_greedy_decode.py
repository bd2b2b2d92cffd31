"""eval.speed.greedy_decode (the decode loop that throughput times) generates
exactly what greedy HF ``generate`` does: float, quantized and SimQuant-cache
models, batch 1 and 2; models whose generation config asks for more are
decoded through ``generate``."""

import pytest
import torch

import tiny_models
from conftest import lq
from llmeasyquant.eval import throughput
from llmeasyquant.eval.speed import greedy_decode, lean_decode_unsupported


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _generate(model, prompt, n):
    return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))


def _prompt(batch, length=12, seed=0):
    return torch.randint(0, tiny_models.VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# llama/qwen3 (RoPE, GQA), gpt2 and opt (learned positions, opt's from the mask),
# gemma2 (sliding-window layers, logit soft-capping)
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "opt", "gemma2"])
@pytest.mark.parametrize("batch", [1, 2])
def test_same_tokens_as_generate(arch, batch):
    model = tiny_models.build(arch)
    assert lean_decode_unsupported(model) is None
    prompt = _prompt(batch)
    with torch.no_grad():
        assert torch.equal(greedy_decode(model, prompt, 9), _generate(model, prompt, 9))


@pytest.mark.parametrize("method,kw", [("smoothquant", {}), ("absmax", dict(w_bits=4, w_group_size=16, act=None))])
def test_same_tokens_as_generate_quantized(method, kw):
    model = tiny_models.build("llama", seed=1)
    calib = [_prompt(1, 32, seed=s)[0] for s in range(2)]
    lq.quantize(model, method, calib=calib, progress=False, **kw)
    assert any(isinstance(m, lq.QLinear) for m in model.modules())
    prompt = _prompt(2, seed=4)
    with torch.no_grad():
        assert torch.equal(greedy_decode(model, prompt, 7), _generate(model, prompt, 7))


def test_uses_the_simquant_cache_generate_uses():
    model = tiny_models.build("llama", seed=3)
    prompt = _prompt(1, 20, seed=5)
    with torch.no_grad():
        float_tokens = _generate(model, prompt, 12)
        lq.quantize(model, "simquant", k_bits=2, v_bits=2, chunk_size=4, residual_length=0, progress=False)
        want = _generate(model, prompt, 12)
        assert not torch.equal(want, float_tokens)  # the 2-bit cache changes the tokens: the check below can fail
        assert torch.equal(greedy_decode(model, prompt, 12), want)


def test_generation_configs_that_change_greedy_go_through_generate():
    model = tiny_models.build("llama")
    model.generation_config.repetition_penalty = 1.3
    why = lean_decode_unsupported(model)
    assert why is not None and "repetition_penalty=1.3" in why
    with pytest.raises(ValueError, match="repetition_penalty=1.3; use model.generate"):
        greedy_decode(model, _prompt(1), 3)
    ids = torch.randint(0, tiny_models.VOCAB, (200,), generator=torch.Generator().manual_seed(0))
    sp = throughput(model, ids, prefill_tokens=16, decode_tokens=3, reps=1, warmup=False)
    assert sp.decode_loop == "generate"
    short = ids[:64].reshape(1, 64)
    with torch.no_grad():
        assert sp.generated == _generate(model, short, 4)[:, 64:].tolist()  # the penalty applied
    with pytest.raises(ValueError, match="decode_loop='lean' cannot decode this model: its generation config sets"):
        throughput(model, ids, prefill_tokens=16, decode_tokens=3, reps=1, decode_loop="lean")
    with pytest.raises(ValueError, match="decode_loop='fast' cannot decode this model: its generation config sets"):
        throughput(model, ids, prefill_tokens=16, decode_tokens=3, reps=1, decode_loop="fast")
    with pytest.raises(ValueError, match="decode_loop must be 'auto', 'fast', 'lean' or 'generate', got 'quick'"):
        throughput(model, ids, prefill_tokens=16, decode_tokens=3, decode_loop="quick")


def test_throughput_times_the_lean_loop_where_no_fast_one_exists():
    model = tiny_models.build("gpt2")  # not LLaMA-form: no fast_decode (tests/test_fast_decode.py)
    ids = torch.randint(0, tiny_models.VOCAB, (200,), generator=torch.Generator().manual_seed(1))
    lean = throughput(model, ids, prefill_tokens=16, decode_tokens=3, reps=1, warmup=False)
    gen = throughput(model, ids, prefill_tokens=16, decode_tokens=3, reps=1, warmup=False, decode_loop="generate")
    assert (lean.decode_loop, gen.decode_loop) == ("lean", "generate")
    assert lean.generated == gen.generated and lean.to_dict()["decode_loop"] == "lean"


def test_lm_head_w8_option():
    """quantize(..., lm_head="w8"): after the method, the float head becomes
    QLinear.from_linear(head, w_bits=8, w_group_size=64, act=None) (RTN
    W8A16 in groups of 64; per channel where 64 does not divide K), the tied input
    embedding stays as it was; opt-in, and refused when the method quantizes
    the head itself."""
    model = tiny_models.build("llama", seed=2)
    head = torch.nn.Linear(64, tiny_models.VOCAB, bias=False)
    head.weight.data.copy_(model.lm_head.weight)
    emb = model.get_input_embeddings().weight.detach().clone()
    lq.quantize(model, "absmax", act="dynamic", lm_head="w8", progress=False)
    assert isinstance(model.lm_head, lq.QLinear) and model.lm_head.act is None and model.lm_head.w_bits == 8
    assert model.lm_head.w_group_size == 64
    assert torch.equal(model.get_input_embeddings().weight, emb)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(model.lm_head(x), lq.QLinear.from_linear(head, w_bits=8, w_group_size=64, act=None)(x))
    assert "lm_head W8A16" in model.llmeq_config.describe()
    narrow = lq.quantize(tiny_models.build("mixtral"), "absmax", act="dynamic", lm_head="w8", progress=False)
    assert narrow.lm_head.in_features == 32 and narrow.lm_head.w_group_size == -1  # 64 does not divide 32
    assert lq.config_for("smoothquant").lm_head is None  # the default: the head stays float
    with pytest.raises(ValueError, match=r"keep 'lm_head' in exclude \(got exclude=\[\]\)"):
        lq.config_for("absmax", lm_head="w8", exclude=())
    with pytest.raises(ValueError, match=r"lm_head must be one of \(None, 'w8'\), got 'w4'"):
        lq.config_for("absmax", lm_head="w4")
