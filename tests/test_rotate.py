"""Hadamard rotations: the matrices, the residual-stream rotation (exact in
float on every declared architecture), the online rotation before down_proj
(what observers see, carried through quantization, save and load), and what
refuses it."""

import math

import pytest
import torch

import llmeasyquant as lq
from llmeasyquant import hadamard
from llmeasyquant.models.rotate import rotate, rotated
from llmeasyquant.nn import input_rotation

from tiny_models import _perturb_norms, build, calib_batches, max_rel, token_ids

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "granite")
REFUSED = ("opt", "gpt2", "gemma2", "gemma3_text", "gpt_neox", "falcon", "cohere", "olmo2", "starcoder2", "mixtral")

# widths of real models: SmolLM2 (576, 1536, head 64), Qwen2 (896, 4864),
# Llama-3 (4096, 14336), Qwen2.5-7B (18944), small ones
ORDERS = (1, 2, 4, 8, 12, 20, 28, 36, 64, 96, 128, 576, 768, 896, 1536, 2560, 3072, 4864)


@pytest.mark.parametrize("n", ORDERS)
def test_matrix_is_orthonormal_hadamard(n):
    Q = hadamard.matrix(n, torch.float64)
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    H = Q * math.sqrt(n)  # entries +-1
    assert torch.equal(H.abs().round(), torch.ones_like(H)) and (H.abs() - 1).abs().max() < 1e-12


@pytest.mark.parametrize("n", (8960, 14336, 18944))
def test_large_orders_factor_and_are_orthogonal(n):
    m, p = hadamard.factor(n)
    assert m * p == n and p & (p - 1) == 0
    Hm = hadamard.small_matrix(n, torch.float64)
    assert torch.equal(Hm @ Hm.T, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("n", (3, 6, 10, 0))
def test_unbuildable_orders_are_refused(n):
    assert hadamard.factor(n) is None
    with pytest.raises(ValueError, match=f"order {n}"):
        hadamard.matrix(n)


@pytest.mark.parametrize("n", (1, 12, 64, 96, 576, 1536))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_transform_is_the_dense_product(n, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 5, n, generator=g).to(dtype)
    y = hadamard.transform(x, hadamard.small_matrix(n))
    ref = x.double() @ hadamard.matrix(n, torch.float64).T
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
    # orthonormal: applying Q^T undoes it
    back = y.double() @ hadamard.matrix(n, torch.float64)
    assert (back - x.double()).abs().max() <= 10 * tol * x.double().abs().max()


def test_random_signs_follow_the_seed():
    a, b = hadamard.random_signs(64, 1), hadamard.random_signs(64, 1)
    assert torch.equal(a, b) and set(a.tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, hadamard.random_signs(64, 2))


@pytest.mark.parametrize("arch", ROTATABLE)
def test_rotation_is_exact_in_float(arch):
    model = build(arch)
    _perturb_norms(model)  # norms away from 1: the fold into the readers is exercised
    ids = token_ids(batch=2)
    with torch.no_grad():
        ref = model(ids).logits
        done = rotate(model, seed=3)
        out = model(ids).logits
    assert max_rel(out, ref) < 1e-5
    assert rotated(model) == done and done["seed"] == 3
    # weights really moved (not a no-op): the embedding is no longer the original
    assert input_rotation.rotated_inputs(model)  # down_proj of every block rotates online
    assert set(input_rotation.rotated_inputs(model).values()) == {model.config.intermediate_size}
    with pytest.raises(ValueError, match="already rotated"):
        rotate(model)


def test_rotation_unties_a_tied_head_and_resets_norms():
    model = build("gemma")  # ties its embedding; RMSNorm computes x * (1 + w)
    _perturb_norms(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rotate(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.model.norm.weight, torch.zeros_like(model.model.norm.weight))
    assert torch.equal(model.model.layers[0].input_layernorm.weight,
                       torch.zeros_like(model.model.layers[0].input_layernorm.weight))


def test_rotation_without_online_part_is_exact_and_plain():
    model = build("llama")
    ids = token_ids()
    with torch.no_grad():
        ref = model(ids).logits
        rotate(model, online=False)
        assert max_rel(model(ids).logits, ref) < 1e-5
    assert input_rotation.rotated_inputs(model) == {}


@pytest.mark.parametrize("arch", REFUSED)
def test_architectures_without_rotation_facts_are_refused(arch):
    model = build(arch)
    with pytest.raises(ValueError, match="no rotation is declared for model type"):
        rotate(model)


def test_quantize_refuses_an_unknown_rotation():
    with pytest.raises(ValueError, match="rotate must be one of"):
        lq.config_for("absmax", rotate="givens")


def test_observers_see_the_rotated_input():
    lin = torch.nn.Linear(96, 8)
    input_rotation.attach(lin, 96)
    seen = {}
    lin.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))  # like calibration's observers
    x = torch.randn(4, 96)
    lin(x)
    assert torch.allclose(seen["x"], hadamard.transform(x, hadamard.small_matrix(96)))
    with pytest.raises(ValueError, match="input width 64, got 96"):
        input_rotation.attach(torch.nn.Linear(64, 8), 96)


def test_rotation_drops_the_up_down_fold():
    from llmeasyquant.models.extract import extract

    model = build("llama")
    before = {g.prev for g in extract(model).groups}
    rotate(model)
    after = {g.prev for g in extract(model).groups}
    assert "mlp.up_proj" in before and "mlp.up_proj" not in after
    assert {"input_layernorm", "post_attention_layernorm"} <= after


def _outlier_llama():
    """A tiny llama with what real LLMs have and random inits lack: a few huge
    channels in the residual stream and a few outlier input columns in the
    weights (the case rotations exist for)."""
    model = build("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :3] *= 40.0
        for b in model.model.layers:
            for lin in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj, b.mlp.gate_proj, b.mlp.up_proj):
                lin.weight[:, 5:8] *= 10.0
            b.mlp.down_proj.weight[:, 10:12] *= 10.0
    return model


@pytest.mark.parametrize("options", [dict(method="absmax", act="dynamic"),
                                     dict(method="zeroquant", w_bits=4, w_group_size=16)])
def test_rotation_lowers_quantization_error_with_outlier_channels(options):
    ids = token_ids(batch=2)
    errs = {}
    for rot in (None, "hadamard"):
        model = _outlier_llama()
        with torch.no_grad():
            ref = model(ids).logits
        lq.quantize(model, options["method"], progress=False, rotate=rot,
                    **{k: v for k, v in options.items() if k != "method"})
        with torch.no_grad():
            errs[rot] = max_rel(model(ids).logits, ref)
    # measured 0.34x (W8A8) and 0.22x (W4A8); across seeds 0-3 at most 0.54x
    assert errs["hadamard"] < 0.7 * errs[None], errs


def test_gptq_on_a_rotated_model_saves_and_loads_bit_exact(tmp_path):
    model = _outlier_llama()
    ids = token_ids()
    lq.quantize(model, "gptq", calib=calib_batches(), w_bits=4, w_group_size=16, rotate="hadamard",
                progress=False)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, lq.QLinear) and input_rotation.size_of(down) == 96
    assert "+hadamard" in model.llmeq_config.describe()
    with torch.no_grad():
        out = model(ids).logits
    lq.save(model, tmp_path / "m")
    meta = __import__("json").loads((tmp_path / "m" / "quantization.json").read_text())
    assert meta["format_version"] == 3 and meta["input_rotation"] == {
        "model.layers.0.mlp.down_proj": 96, "model.layers.1.mlp.down_proj": 96}
    back = lq.load(tmp_path / "m")
    assert input_rotation.rotated_inputs(back) == meta["input_rotation"]
    assert rotated(back) == rotated(model)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, out)


def test_quantize_does_not_rotate_a_rotated_model_again():
    model = build("llama")
    rotate(model, seed=5)
    lq.quantize(model, "absmax", rotate="hadamard", rotate_seed=1, progress=False)
    assert rotated(model)["seed"] == 5


def test_unrotated_save_stays_version_2(tmp_path):
    model = build("llama")
    lq.quantize(model, "absmax", progress=False)
    lq.save(model, tmp_path / "m")
    assert __import__("json").loads((tmp_path / "m" / "quantization.json").read_text())["format_version"] == 2


@pytest.mark.parametrize("bad, match", [({"model.layers.0.mlp.down_proj": 64}, "input width 96"),
                                        ({"model.nope": 96}, "does not have"),
                                        ({"model.layers.0.mlp.down_proj": "96"}, "integer order")])
def test_load_checks_the_rotation_record(tmp_path, bad, match):
    model = build("llama")
    lq.quantize(model, "absmax", rotate="hadamard", progress=False)
    lq.save(model, tmp_path / "m")
    q = tmp_path / "m" / "quantization.json"
    meta = __import__("json").loads(q.read_text())
    meta["input_rotation"] = bad
    q.write_text(__import__("json").dumps(meta))
    with pytest.raises(ValueError, match=match):
        lq.load(tmp_path / "m")


@pytest.mark.parametrize("fmt", ("compressed-tensors", "gptq"))
def test_foreign_formats_refuse_online_rotation(tmp_path, fmt):
    model = build("llama")
    lq.quantize(model, "absmax", act=None, rotate="hadamard", progress=False)
    with pytest.raises(ValueError, match="rotate their input online"):
        lq.save(model, tmp_path / "x", format=fmt)
    assert not (tmp_path / "x").exists()


def test_offline_rotation_exports_and_loads_in_transformers(tmp_path):
    import transformers

    model = build("llama")
    lq.quantize(model, "absmax", act=None, w_bits=8, rotate="hadamard", rotate_online=False, progress=False)
    ids = token_ids()
    with torch.no_grad():
        ours = model(ids).logits
    lq.save(model, tmp_path / "ct", format="compressed-tensors")
    pytest.importorskip("compressed_tensors")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), local_files_only=True).eval()
    with torch.no_grad():
        assert max_rel(theirs(ids).logits, ours) < 1e-4


def test_rotated_model_exports_to_onnx_with_its_online_rotation(tmp_path):
    pytest.importorskip("onnxruntime")
    from llmeasyquant.onnx_export import check_against_torch, export_onnx
    from tiny_models import byte_tokenizer

    model = build("llama")
    lq.quantize(model, "absmax", act=None, rotate="hadamard", progress=False)
    path = export_onnx(model, str(tmp_path / "m.onnx"), seq_len=12)
    check = check_against_torch(model, byte_tokenizer(), path, seq_len=12)
    assert 0 <= check.max_abs_diff < 1e-4
    # the online rotation is in the graph: without it the logits would differ
    for name in input_rotation.rotated_inputs(model):
        input_rotation.detach(model.get_submodule(name))
    assert check_against_torch(model, byte_tokenizer(), path, seq_len=12).max_abs_diff > 1e-3


@pytest.mark.parametrize("base", ["rtn", "gptq"])
def test_search_on_a_rotated_model_keeps_the_online_rotation(base):
    from llmeasyquant.search import search

    model = _outlier_llama()
    lq.rotate(model)
    w_rot = model.model.layers[1].mlp.down_proj.weight.detach().clone()  # W Q^T, the float rotated weight
    res = search(model, calib=calib_batches(4, 32), budget_bits=6.0, group_size=16, base=base, max_evals=6,
                 progress=False, rotate="hadamard")  # already rotated: not again
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, lq.QLinear) and input_rotation.size_of(down) == 96
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(2))
    wq = down.dequantize()
    with torch.no_grad():  # it runs on the rotated input ...
        ref = torch.nn.functional.linear(hadamard.transform(x, hadamard.small_matrix(96)), wq)
        assert max_rel(down(x), ref) < 1e-5
    # ... with integers quantized from the rotated weight, not from the original one
    w_orig = w_rot @ hadamard.matrix(96)
    assert (wq - w_rot).norm() < 0.5 * (wq - w_orig).norm()
    # the recorded config reproduces it from the float model
    assert model.llmeq_config.rotate == "hadamard"
    again = _outlier_llama()
    lq.quantize(again, "mixed", calib=calib_batches(4, 32), bitmap=res.assignment, base=base, w_group_size=16,
                w_scale_dtype="float16", rotate="hadamard", progress=False)
    ids = token_ids()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)


def test_rotated_tied_model_saves_and_loads_untied(tmp_path):
    model = build("gemma")  # tied embedding: rotation unties it, the saved config must say so
    _perturb_norms(model)
    ids = token_ids()
    lq.quantize(model, "absmax", act=None, rotate="hadamard", progress=False)
    with torch.no_grad():
        out = model(ids).logits
    lq.save(model, tmp_path / "m")
    back = lq.load(tmp_path / "m")
    assert back.config.tie_word_embeddings is False
    assert back.lm_head.weight.data_ptr() != back.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, out)
