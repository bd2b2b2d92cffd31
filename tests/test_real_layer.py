"""A real layer of the real default model (SmolLM2-135M) on real WikiText-2 text:
swap one MLP projection for a W8A8 dynamic QLinear and compare outputs."""

import os

import pytest
import torch

from conftest import DATA_DIR, lq

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_inputs():
    from llmeasyquant.models import load_default_model

    model, tok = load_default_model()
    path = os.path.join(DATA_DIR, "wikitext-2", "wiki.valid.tokens")
    with open(path, encoding="utf-8") as f:
        text = f.read(4000)
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    return model, ids


def _capture_input(model, module, ids):
    seen = {}
    h = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    return seen["x"], seen["y"]


@pytest.mark.parametrize("layer", ["down_proj", "up_proj"])
def test_w8a8_swap_of_real_mlp_projection(model_and_inputs, layer):
    model, ids = model_and_inputs
    mlp = model.model.layers[3].mlp
    lin = getattr(mlp, layer)
    x, y = _capture_input(model, lin, ids)
    q = lq.QLinear.from_linear(lin, act="dynamic")
    out = q(x)
    rel = ((out - y).norm() / y.norm()).item()
    # W8A8 per-channel/per-token on real activations: ~1 % relative error
    assert rel < 0.03, rel
    # the kernel against float math on the same dequantized weight
    ref = torch.nn.functional.linear(x, q.dequantize())
    assert ((out - ref).norm() / ref.norm()).item() < 0.03
    # swapping it into the model keeps the next-token distribution
    with torch.no_grad():
        base = model(ids).logits
        setattr(mlp, layer, q)
        try:
            swapped = model(ids).logits
        finally:
            setattr(mlp, layer, lin)
    agree = (base.argmax(-1) == swapped.argmax(-1)).float().mean().item()
    assert agree > 0.95, agree
