"""Methods on tiny random-weight models of every supported architecture
(wiring, equivalence, errors); accuracy orderings on the real model live in
test_methods_real.py."""

import copy
import json

import pytest
import torch

from conftest import lq
from llmeasyquant.methods._common import fold_scales
from llmeasyquant.methods.base import config_for, config_from_json
from llmeasyquant.models.extract import extract
from tiny_models import ALL, build


def _calib(n=4, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, T), generator=g) for _ in range(n)]


def _ids(seed=9):
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


def _qlinears(model):
    return [m for m in model.modules() if isinstance(m, lq.QLinear)]


@pytest.mark.parametrize("model_type", ALL)
@pytest.mark.parametrize("method,opts", [
    ("absmax", {}), ("zeropoint", {"act": "static"}), ("zeroquant", {"w_bits": 4, "w_group_size": 16}),
    ("smoothquant", {}), ("smoothquant", {"alpha_grid": ()}), ("smoothquant", {"act": "static", "alpha_grid": (0.3, 0.5, 0.7)}),
])
def test_methods_run_on_every_architecture(model_type, method, opts):
    model = build(model_type)
    ids = _ids()
    ref = model(ids).logits
    lq.quantize(model, method, calib=_calib(), progress=False, **opts)
    spec = extract(model)
    assert len(_qlinears(model)) == len(spec.linear_paths())  # lm_head excluded
    assert not isinstance(model.lm_head, lq.QLinear)
    out = model(ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (0.15 if opts.get("w_bits") == 4 else 0.05), rel
    assert model.llmeq_config.method == method


@pytest.mark.parametrize("model_type", ALL)
def test_smoothquant_folding_is_exact_before_quantization(model_type):
    model = build(model_type).double()
    ids = _ids()
    ref = model(ids).logits
    spec = extract(model)
    g = torch.Generator().manual_seed(3)
    for block in spec.blocks:
        for grp in spec.groups:
            K = block.get_submodule(grp.linears[0]).weight.shape[1 if model_type != "gpt2" else 0]
            fold_scales(block, grp, (torch.rand(K, generator=g, dtype=torch.float64) * 4 + 0.25))
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-9, atol=1e-9)


def test_config_json_round_trip_and_errors():
    c = config_for("smoothquant", alpha=0.6, act="static", alpha_grid=[0.4, 0.6])
    c2 = config_from_json(c.to_json())
    assert c2 == c and json.loads(c.to_json())["method"] == "smoothquant"
    with pytest.raises(ValueError, match="unknown method 'foo'; available: .*absmax.*smoothquant"):
        config_for("foo")
    with pytest.raises(ValueError, match=r"smoothquant: unknown option\(s\) \['beta'\]"):
        config_for("smoothquant", beta=1)


def test_quantize_errors():
    model = build("llama")
    with pytest.raises(ValueError, match="needs calibration data"):
        lq.quantize(model, "smoothquant")
    with pytest.raises(ValueError, match="calibration set is empty"):
        lq.quantize(model, "smoothquant", calib=[])
    with pytest.raises(ValueError, match="w_group_size=7 does not divide in_features=64"):
        lq.quantize(build("llama"), "zeroquant", w_bits=4, w_group_size=7)
    with pytest.raises(FileNotFoundError, match="text file not found"):
        from llmeasyquant.calibration import calibration_batches
        calibration_batches(None, "/nonexistent.txt")


def test_unknown_architecture_error_from_quantize():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="unknown model architecture 'Weird'"):
        lq.quantize(Weird(), "absmax")
