"""eval.fast_decode (the LLaMA-form decode loop throughput times by default)
computes what the Hugging Face forward computes and generates what greedy
``generate`` does: float, quantized and rotated models, batch 1 and 2;
everything else is refused with the reason and decoded by the lean loop."""

import pytest
import torch

import tiny_models
from conftest import lq
from llmeasyquant.eval import fast_decode, throughput
from llmeasyquant.eval.speed import greedy_decode

FORMS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _prompt(batch, length=12, seed=0):
    return torch.randint(0, tiny_models.VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, prompt, n):
    return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))


@pytest.mark.parametrize("arch", FORMS)
@pytest.mark.parametrize("batch", [1, 2])
def test_logits_match_the_hf_forward_at_every_step(arch, batch):
    model = tiny_models.build(arch, seed=2)
    prompt = _prompt(batch, seed=batch)
    dec = fast_decode.FastDecoder(model, batch, 20)
    ids = prompt
    with torch.no_grad():
        got = dec.forward(prompt)
        for step in range(5):
            want = model(ids, logits_to_keep=1).logits[:, -1]
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            nxt = got.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            got = dec.forward(nxt)
    assert dec.pos == prompt.shape[1] + 5


@pytest.mark.parametrize("arch", FORMS)
@pytest.mark.parametrize("batch", [1, 2])
def test_same_tokens_as_generate(arch, batch):
    model = tiny_models.build(arch)
    prompt = _prompt(batch)
    with torch.no_grad():
        assert torch.equal(fast_decode.greedy(model, prompt, 9), _generate(model, prompt, 9))


@pytest.mark.parametrize("method,kw", [("smoothquant", {}), ("absmax", dict(w_bits=4, w_group_size=16, act=None)),
                                       ("gptq", dict(w_bits=4, w_group_size=16, rotate="hadamard"))])
def test_same_tokens_as_the_lean_loop_quantized_and_rotated(method, kw):
    model = tiny_models.build("llama", seed=1)
    calib = [_prompt(1, 32, seed=s)[0] for s in range(2)]
    lq.quantize(model, method, calib=calib, progress=False, **kw)
    assert any(isinstance(m, lq.QLinear) for m in model.modules())
    prompt = _prompt(2, seed=4)
    with torch.no_grad():
        want = greedy_decode(model, prompt, 7)
        assert torch.equal(fast_decode.greedy(model, prompt, 7), want)
        assert torch.equal(_generate(model, prompt, 7), want)


def test_eos_is_masked_as_min_new_tokens_does():
    model = tiny_models.build("llama", seed=5)
    prompt = _prompt(1, seed=6)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        free = fast_decode.greedy(model, prompt, 8)
        first = int(free[0, prompt.shape[1]])
        model.generation_config.eos_token_id = first
        masked = fast_decode.greedy(model, prompt, 8)
        assert torch.equal(masked, _generate(model, prompt, 8))
    assert first not in masked[0, prompt.shape[1]:].tolist()  # can fail: the token was chosen unmasked


def test_unsupported_models_are_named_and_decoded_by_the_lean_loop():
    gpt2 = tiny_models.build("gpt2")
    assert "'gpt2' is not one of the LLaMA-form types" in fast_decode.unsupported(gpt2)
    with pytest.raises(ValueError, match="FastDecoder: model type 'gpt2'"):
        fast_decode.FastDecoder(gpt2, 1, 8)
    ids = torch.randint(0, tiny_models.VOCAB, (200,), generator=torch.Generator().manual_seed(0))
    assert throughput(gpt2, ids, prefill_tokens=16, decode_tokens=3, reps=1, warmup=False).decode_loop == "lean"
    with pytest.raises(ValueError, match="decode_loop='fast' cannot decode this model: model type 'gpt2'"):
        throughput(gpt2, ids, prefill_tokens=16, decode_tokens=3, reps=1, decode_loop="fast")

    mistral = tiny_models.build("mistral")
    mistral.config.sliding_window = 16
    assert "sliding window of 16 tokens" in fast_decode.unsupported(mistral, 40)
    assert fast_decode.unsupported(mistral, 16) is None

    llama = tiny_models.build("llama")
    llama.config.rope_parameters = dict(llama.config.rope_parameters, rope_type="dynamic", factor=2.0)
    assert "RoPE type 'dynamic'" in fast_decode.unsupported(llama)

    cached = tiny_models.build("llama", seed=3)
    lq.quantize(cached, "simquant", k_bits=4, v_bits=4, chunk_size=4, residual_length=0, progress=False)
    assert "quantized KV cache" in fast_decode.unsupported(cached)


def test_throughput_decodes_fast_by_default_and_agrees_with_the_other_loops():
    model = tiny_models.build("qwen3", seed=7)
    ids = torch.randint(0, tiny_models.VOCAB, (200,), generator=torch.Generator().manual_seed(1))
    runs = {loop: throughput(model, ids, prefill_tokens=16, decode_tokens=4, reps=1, warmup=False, batch=2,
                             decode_loop=loop) for loop in ("auto", "fast", "lean", "generate")}
    assert runs["auto"].decode_loop == "fast"
    assert {r.decode_loop for r in runs.values()} == {"fast", "lean", "generate"}
    assert all(r.generated == runs["generate"].generated for r in runs.values())
    model.generation_config.repetition_penalty = 1.3  # greedy generate does more: no fast or lean loop
    assert throughput(model, ids, prefill_tokens=16, decode_tokens=2, reps=1, warmup=False).decode_loop == "generate"


def test_bad_calls_say_what_was_expected():
    model = tiny_models.build("llama")
    dec = fast_decode.FastDecoder(model, 2, 10)
    with pytest.raises(ValueError, match="expected 2 rows, got 1"):
        dec.forward(_prompt(1))
    with pytest.raises(ValueError, match="12 positions exceed max_tokens=10"):
        dec.forward(_prompt(2))
    dec.forward(_prompt(2, 4))
    with pytest.raises(ValueError, match="several tokens at once only as the first call"):
        dec.forward(_prompt(2, 2))
    with pytest.raises(ValueError, match="batch and max_tokens must be >= 1, got 0, 10"):
        fast_decode.FastDecoder(model, 0, 10)
    with pytest.raises(ValueError, match="new_tokens must be >= 1, got 0"):
        fast_decode.greedy(model, _prompt(1), 0)


@pytest.mark.parametrize("method,kw", [("smoothquant", {}), ("absmax", dict(w_bits=4, w_group_size=16, act=None))])
def test_joined_projections_give_the_separate_logits_bit_for_bit(method, kw, monkeypatch):
    model = tiny_models.build("qwen2", seed=8)  # q/k/v with biases
    lq.quantize(model, method, calib=[_prompt(1, 32, seed=s)[0] for s in range(2)], progress=False, **kw)
    built = []
    real = fast_decode.concat.concat
    monkeypatch.setattr(fast_decode.concat, "concat", lambda parts: built.append(len(parts)) or real(parts))
    prompt = _prompt(2, seed=9)
    joined, separate = fast_decode.FastDecoder(model, 2, 20), fast_decode.FastDecoder(model, 2, 20, join=False)
    assert built == [3, 2] * model.config.num_hidden_layers  # q/k/v and gate/up of every block, and only there
    with torch.no_grad():
        a, b = joined.forward(prompt), separate.forward(prompt)
        for _ in range(4):
            assert torch.equal(a, b)
            nxt = a.argmax(-1, keepdim=True)
            a, b = joined.forward(nxt), separate.forward(nxt)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_glue_stays_within_rounding_of_the_plain_loop(arch, dtype, monkeypatch):
    # the fused ops are CPU kernels with their own sum orders: close to HF's
    # op-by-op arithmetic, not bit-equal; the default on the CPU
    model = tiny_models.build(arch, seed=3).to(dtype)
    prompt = _prompt(2, seed=4)
    calls = []
    real = lq.ops.decode_attention_
    monkeypatch.setattr(lq.ops, "decode_attention_", lambda *a: calls.append(1) or real(*a))
    plain, fused = fast_decode.FastDecoder(model, 2, 20, fused=False), fast_decode.FastDecoder(model, 2, 20)
    assert fused.fused and not plain.fused
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    with torch.no_grad():
        a, b = plain.forward(prompt), fused.forward(prompt)
        for _ in range(4):
            torch.testing.assert_close(b, a, **tol)
            nxt = a.argmax(-1, keepdim=True)
            a, b = plain.forward(nxt), fused.forward(nxt)
    assert len(calls) == 4 * len(model.model.layers)  # every decode step of every block took the fused op


def test_projections_run_bound_unless_hooked_and_hooks_still_run():
    # un-hooked QLinear / nn.Linear layers are called through bound kernels
    # (QLinear.bound_forward, F.linear); a layer with a hook keeps its module
    # call, so the hook runs at every step, and the logits are those of the
    # HF forward (which calls every module) either way
    model = tiny_models.build("llama", seed=5)
    lq.quantize(model, "smoothquant", calib=[_prompt(1, 32, seed=s)[0] for s in range(2)], progress=False)
    seen = []
    o0 = model.model.layers[0].self_attn.o_proj
    o0.register_forward_hook(lambda mod, inp, out: seen.append(1) or out * 1.5)
    dec = fast_decode.FastDecoder(model, 1, 20, fused=False)
    blk0, blk1 = dec.blocks[0], dec.blocks[1]
    assert blk0.o is o0 and blk1.o is not model.model.layers[1].self_attn.o_proj
    assert blk1.o.__name__ == "<lambda>" and dec.lm_head.__name__ == "<lambda>"  # bound kernel / F.linear
    prompt = _prompt(1, seed=6)
    ids = prompt
    with torch.no_grad():
        got = dec.forward(prompt)
        for _ in range(3):
            torch.testing.assert_close(got, model(ids, logits_to_keep=1).logits[:, -1], rtol=1e-5, atol=1e-5)
            nxt = got.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            got = dec.forward(nxt)
    assert len(seen) == 4 + 3  # the decoder's 4 calls, then the HF forward's 3
