"""llmeasyquant.demo (the `demo` command's work) on tiny models of several
architectures: the layer is found through extraction, the model is left as it
was, the report has the table of the CLI."""

import pytest
import torch

import tiny_models
from llmeasyquant.demo import VARIANTS, find_projection, format_demo, run_demo


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("demo") / "text.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    return str(p)


@pytest.mark.parametrize("arch,proj,layer_path", [
    ("llama", "up_proj", "model.layers.1.mlp.up_proj"),  # a last component, as the CLI's --proj gives it
    ("llama", "mlp.gate_proj", "model.layers.1.mlp.gate_proj"),
    ("opt", "fc1", "model.decoder.layers.1.fc1"),
    ("gpt2", "mlp.c_fc", "transformer.h.1.mlp.c_fc"),  # a Conv1D
])
def test_run_demo_on_tiny_models(arch, proj, layer_path, text_file, one_thread):
    model, tok = tiny_models.build(arch), tiny_models.byte_tokenizer()
    before = {n: type(m) for n, m in model.named_modules()}
    ids = tok(open(text_file).read(), return_tensors="pt").input_ids[:, :40]
    ref = model(ids).logits
    r = run_demo(model, tok, text_path=text_file, tokens=40, layer=1, proj=proj, reps=1)
    # the input as the layer sees it (OPT flattens the tokens before its MLP)
    assert r.layer == layer_path and r.tokens == 40 and r.input_shape in ((1, 40, 64), (40, 64))
    assert (r.in_features, r.out_features) == (64, 96 if arch != "gpt2" else 256)
    assert [row.label for row in r.rows] == [label for label, _ in VARIANTS]
    w8a16 = r.rows[1]
    assert 0 < w8a16.rel_error < 0.02 and w8a16.nbytes < r.float_weight_numel * 2
    assert all(0 <= row.top1_agree <= 1 and row.ms > 0 for row in r.rows)
    # the float layer is back in place: same modules, same logits
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert torch.equal(model(ids).logits, ref)
    text = format_demo(r)
    lines = text.splitlines()
    assert lines[0].startswith(f"layer {layer_path}: 64 -> ") and lines[0].endswith("of text.txt")
    assert lines[2].split() == ["QLinear", "rel.", "error", "top-1", "agree", "bytes", "vs", "fp16", "ms",
                                "speed-up"]
    assert lines[3].startswith("fp32 Linear") and lines[4].startswith("W8A8 dynamic")
    assert lines[-1].startswith("(rel. error:") and "median of 1 runs on 1 threads" in lines[-1]


def test_run_demo_errors(text_file, one_thread):
    model, tok = tiny_models.build("llama"), tiny_models.byte_tokenizer()
    with pytest.raises(ValueError, match=r"layer must be in \[0, 1\] \(2 decoder blocks at model.layers\), got 2"):
        run_demo(model, tok, text_path=text_file, layer=2)
    with pytest.raises(ValueError, match="'fc1' is not there in model.layers.0: expected one of its linears "
                                         "self_attn.q_proj, .*mlp.down_proj"):
        run_demo(model, tok, text_path=text_file, layer=0, proj="fc1")
    with pytest.raises(FileNotFoundError, match="text file not found"):
        run_demo(model, tok, text_path=text_file + ".missing", layer=0)


def test_find_projection():
    gpt2 = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert find_projection("c_fc", gpt2, "h.0") == "mlp.c_fc"
    assert find_projection("attn.c_proj", gpt2, "h.0") == "attn.c_proj"
    with pytest.raises(ValueError, match="'c_proj' is ambiguous in h.0"):
        find_projection("c_proj", gpt2, "h.0")
