"""ONNX export (llmeasyquant.export_onnx) run in real ONNX Runtime: tiny random
LLaMA / GPT-2 / Qwen2 configs, W8A8 dynamic (symmetric and asymmetric
activations) and weight-only W8 / W4 (INT4 initializers), dynamic and fixed
sequence length; logits must match our PyTorch model."""

import os

import numpy as np
import pytest
import torch

import tiny_models
from conftest import lq
from llmeasyquant.onnx_export import export_onnx, ort_session

onnx = pytest.importorskip("onnx")

CASES = [
    ("llama", "absmax", {"act": "dynamic"}),
    ("qwen2", "absmax", {"act": "dynamic", "act_symmetric": False}),
    ("llama", "zeropoint", {"w_bits": 4, "w_group_size": 16, "act": None}),
    ("llama", "zeropoint", {"w_bits": 4, "w_group_size": 16, "act": None, "w_scale_dtype": "float16"}),
    ("llama", "absmax", {"act": "dynamic", "w_scale_dtype": "float16"}),
    ("gpt2", "absmax", {"w_bits": 4, "act": None}),
    ("gpt2", "smoothquant", {}),
]


def _calib():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(1, tiny_models.VOCAB, (1, 24), generator=g) for _ in range(3)]


# architectures beyond the six (tests/test_architectures.py covers them all in
# PyTorch); one of each kind of block: Gemma's x * (1 + w) norm, Phi-3's fused
# qkv / gate_up, GPT-NeoX's parallel residual with partial rotary, Cohere's
# one LayerNorm for attention and MLP, OLMo-2's norms after attention and MLP.
# (Falcon with ALiBi exports, but ONNX Runtime has no kernel for one of its
# Mul nodes: docs/architecture.md.)
DENSE_ONNX = ("gemma", "phi3", "gpt_neox", "cohere", "olmo2")


@pytest.mark.parametrize("arch", DENSE_ONNX)
def test_other_architectures_export_and_match(tmp_path, one_thread, arch):
    model = tiny_models.build(arch)
    lq.quantize(model, "absmax", progress=False, act=None)
    sess = ort_session(export_onnx(model, str(tmp_path / "m.onnx")))
    for shape in ((2, 9), (1, 17)):
        ids = torch.randint(1, tiny_models.VOCAB, shape, generator=torch.Generator().manual_seed(shape[1]))
        out = sess.run(None, {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            ref = model(ids).logits.numpy()
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


ACT_ORDER = ("llama", "zeropoint", {"w_bits": 4, "w_group_size": 16, "act": None, "act_order": True})


@pytest.mark.parametrize("arch,method,opts", CASES + [ACT_ORDER])
def test_exported_logits_match_in_onnxruntime(tmp_path, one_thread, arch, method, opts):
    model = tiny_models.build(arch)
    opts = dict(opts)
    act_order = opts.pop("act_order", False)
    lq.quantize(model, method, calib=_calib(), progress=False, **opts)
    if act_order:  # permuted input columns (QLinear.in_perm): a Gather before each product
        tiny_models.make_act_order(model)
    path = export_onnx(model, str(tmp_path / "m.onnx"))
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    sess = ort_session(path)
    for shape in ((2, 16), (1, 37)):  # dynamic batch and sequence length
        ids = torch.randint(1, tiny_models.VOCAB, shape, generator=torch.Generator().manual_seed(shape[1]))
        out = sess.run(None, {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            ref = model(ids).logits.numpy()
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    ops = {n.op_type for n in proto.graph.node}
    inits = {t.name: t for t in proto.graph.initializer}
    qw = [t for n, t in inits.items() if n.endswith(".qweight")]
    assert qw and all(t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4) for t in qw)
    if opts.get("act") == "dynamic" or method == "smoothquant":
        assert {"QuantizeLinear", "MatMulInteger"} <= ops
    else:
        assert "DequantizeLinear" in ops
        if opts.get("w_bits") == 4:
            assert all(t.data_type == onnx.TensorProto.INT4 for t in qw)
    assert any(p.key == "llmeasyquant.layers" for p in proto.metadata_props)


def test_fixed_length_export_and_size(tmp_path, one_thread):
    model = tiny_models.build("llama")
    ref_path = tmp_path / "float.onnx"
    export_onnx(model, str(ref_path), seq_len=12)  # no QLinear at all: plain float export
    lq.quantize(model, "zeropoint", w_bits=4, w_group_size=16, act=None, progress=False)
    path = export_onnx(model, str(tmp_path / "w4.onnx"), seq_len=12)
    sess = ort_session(path)
    ids = torch.randint(1, tiny_models.VOCAB, (3, 12))
    np.testing.assert_allclose(sess.run(None, {"input_ids": ids.numpy()})[0], model(ids).logits.detach().numpy(),
                               rtol=0, atol=1e-5)
    with pytest.raises(Exception):
        sess.run(None, {"input_ids": torch.randint(1, 9, (1, 13)).numpy()})  # the length is fixed
    # the decoder linears shrink ~8x; embeddings (the bulk of this tiny model) stay fp32
    assert os.path.getsize(path) < os.path.getsize(ref_path)
    assert not list(tmp_path.glob("*.tmp*"))


def test_unsupported_activation_modes_are_refused(tmp_path):
    model = tiny_models.build("llama")
    lq.quantize(model, "absmax", act="static", calib=_calib(), progress=False)
    with pytest.raises(ValueError, match="act='static'.*supports W8A8 with dynamic"):
        export_onnx(model, str(tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()


def test_cli_quantize_then_export(tmp_path, capsys, one_thread):
    from llmeasyquant import cli

    model, tok = tiny_models.build("llama"), tiny_models.byte_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert cli.main(["quantize", str(tmp_path / "m"), "--method", "zeropoint", "--w-bits", "4", "--w-group-size",
                     "16", "--act", "none", "--quiet", "--out", str(tmp_path / "q")]) == 0
    assert "saved to" in capsys.readouterr().out
    q = lq.load(str(tmp_path / "q"))
    assert q.llmeq_config.w_bits == 4 and q.llmeq_config.act is None
    assert cli.main(["eval", str(tmp_path / "q"), "--ppl", "--memory", "--max-windows", "1", "--seq-len", "64",
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "zeropoint W4 g16" in out and "perplexity" in out and "memory: linear layers" in out
    assert cli.main(["export", str(tmp_path / "q"), "--onnx", str(tmp_path / "q.onnx")]) == 0
    out = capsys.readouterr().out
    diff = float(out.rsplit("=", 1)[1])
    assert diff < 1e-4, out
    assert cli.main(["export", str(tmp_path / "m"), "--onnx", str(tmp_path / "x.onnx")]) == 2  # not quantized
    assert "not a saved llmeasyquant model" in capsys.readouterr().err


def test_check_against_torch(tmp_path, one_thread):
    from llmeasyquant.onnx_export import check_against_torch

    model, tok = tiny_models.build("llama"), tiny_models.byte_tokenizer()
    lq.quantize(model, "absmax", act="dynamic", progress=False)
    path = export_onnx(model, str(tmp_path / "m.onnx"), seq_len=12)
    check = check_against_torch(model, tok, path, seq_len=12)
    assert check.tokens == 12 and 0 <= check.max_abs_diff < 1e-4
    with pytest.raises(ValueError, match="expected text of at least seq_len=12 tokens, got 3"):
        check_against_torch(model, tok, path, seq_len=12, text="abc")
