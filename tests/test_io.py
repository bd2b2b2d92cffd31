"""Save / load of quantized models (llmeasyquant.save / load): logits bit for
bit after a round trip for every method and activation mode, the folder is
self-contained (config, tokenizer, safetensors, no pickle), and damaged or
incompatible folders fail with a clear error."""

import json
import os

import pytest
import torch

import tiny_models
from conftest import lq


def _calib(n=4, seq=24):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, tiny_models.VOCAB, (1, seq), generator=g) for _ in range(n)]


CASES = [
    ("llama", "absmax", {"act": "dynamic"}),
    ("llama", "zeropoint", {"w_bits": 4, "w_group_size": 16, "act": None}),
    ("llama", "zeroquant", {"w_bits": 4, "w_group_size": 16}),
    ("llama", "smoothquant", {"act": "static"}),
    ("llama", "gptq", {"w_bits": 4, "w_group_size": 16}),
    ("llama", "gptq", {"w_bits": 3, "w_group_size": 16, "w_scale_dtype": "float16"}),
    ("llama", "smoothquant", {"w_scale_dtype": "float16"}),
    ("llama", "awq", {"w_bits": 3, "w_group_size": 16}),
    ("llama", "absmax", {"act": "ema"}),
    ("llama", "simquant", {"k_bits": 4, "v_bits": 2, "residual_length": 0}),
    ("gpt2", "smoothquant", {}),
    ("opt", "zeropoint", {"w_bits": 8, "act": None}),
]


@pytest.mark.parametrize("arch,method,opts", CASES)
def test_round_trip_logits_bit_identical(tmp_path, one_thread, arch, method, opts):
    model = tiny_models.build(arch)
    lq.quantize(model, method, calib=_calib(), progress=False, **opts)
    ids = torch.randint(1, tiny_models.VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    lq.save(model, tmp_path / "q")
    loaded = lq.load(tmp_path / "q")
    with torch.no_grad():
        if method == "simquant":
            from llmeasyquant.methods.simquant import make_cache

            ref = model(ids, cache=make_cache(model), use_cache=True).logits
            out = loaded(ids, cache=make_cache(loaded), use_cache=True).logits
        else:
            ref, out = model(ids).logits, loaded(ids).logits
    assert torch.equal(ref, out)
    assert type(loaded.llmeq_config) is type(model.llmeq_config)
    assert loaded.llmeq_config.to_dict() == model.llmeq_config.to_dict()
    n_q = sum(isinstance(m, lq.QLinear) for m in model.modules())
    assert sum(isinstance(m, lq.QLinear) for m in loaded.modules()) == n_q
    files = set(os.listdir(tmp_path / "q"))
    assert {"model.safetensors", "quantization.json", "config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)  # no pickle


def test_tokenizer_saved_and_folder_replaced_atomically(tmp_path):
    model = tiny_models.build("llama")
    lq.quantize(model, "absmax", progress=False)
    tok = tiny_models.byte_tokenizer()
    out = tmp_path / "q"
    lq.save(model, out, tokenizer=tok)
    m2, tok2 = lq.load(out, with_tokenizer=True)
    assert tok2("hello world").input_ids == tok("hello world").input_ids
    # saving again over the folder replaces it; an interrupted save leaves the old one intact
    lq.save(model, out)

    class Boom:
        def save_pretrained(self, _):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lq.save(model, out, tokenizer=Boom())
    assert sorted(os.listdir(tmp_path)) == ["q"]  # no temp folders left behind
    assert lq.load(out) is not None


@pytest.fixture
def saved(tmp_path):
    model = tiny_models.build("llama")
    lq.quantize(model, "zeropoint", w_bits=4, w_group_size=16, act=None, progress=False)
    return lq.save(model, tmp_path / "q")


def test_truncated_weights_file(saved):
    p = os.path.join(saved, "model.safetensors")
    data = open(p, "rb").read()
    with open(p, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        lq.load(saved)


def test_tampered_tensor_shape(saved):
    from safetensors.torch import load_file, save_file

    p = os.path.join(saved, "model.safetensors")
    sd = load_file(p)
    key = next(k for k in sd if k.endswith("qweight"))
    sd[key] = sd[key][:, :-1].contiguous()
    save_file(sd, p, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match"):
        lq.load(saved)


def test_newer_format_and_missing_files(saved, tmp_path):
    q = os.path.join(saved, "quantization.json")
    meta = json.load(open(q))
    meta["format_version"] = 99
    json.dump(meta, open(q, "w"))
    with pytest.raises(ValueError, match="format version 99.*upgrade"):
        lq.load(saved)
    with pytest.raises(FileNotFoundError, match="not a saved llmeasyquant model"):
        lq.load(tmp_path)
    with pytest.raises(TypeError, match="expected a transformers model"):
        lq.save(torch.nn.Linear(2, 2), tmp_path / "x")


def test_load_any_takes_a_saved_folder_or_a_model(tmp_path, one_thread):
    from llmeasyquant.io import load_any

    model, tok = tiny_models.build("llama"), tiny_models.byte_tokenizer()
    model.save_pretrained(tmp_path / "float")
    tok.save_pretrained(tmp_path / "float")
    m, t = load_any(str(tmp_path / "float"))
    assert getattr(m, "llmeq_config", None) is None and t is not None
    lq.quantize(m, "absmax", act="dynamic", progress=False)
    lq.save(m, str(tmp_path / "q"), tokenizer=t)
    q, t2 = load_any(str(tmp_path / "q"))
    assert q.llmeq_config.method == "absmax" and t2 is not None
    with pytest.raises(FileNotFoundError):
        load_any(str(tmp_path / "nothing"))
