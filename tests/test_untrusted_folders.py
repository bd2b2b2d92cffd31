"""A folder from disk is never trusted: no code runs, nothing is allocated
from declared shapes before they are checked against the weights file, and
every held value is checked (issue 14, section 3)."""

import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

import tiny_models
from conftest import lq


@pytest.fixture(scope="module")
def saved_src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    m = tiny_models.build("llama")
    lq.quantize(m, "zeropoint", w_bits=4, w_group_size=16, act=None, progress=False)
    lq.save(m, d / "q", tokenizer=tiny_models.byte_tokenizer())
    return d / "q"


@pytest.fixture
def saved(saved_src, tmp_path):
    import shutil

    shutil.copytree(saved_src, tmp_path / "q")
    return tmp_path / "q"


def _read_header(p):
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(p, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    p.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _edit_meta(folder, fn):
    q = folder / "quantization.json"
    meta = json.loads(q.read_text())
    fn(meta)
    q.write_text(json.dumps(meta))


def _first_layer(meta):
    return next(iter(meta["qlinear"]))


# ---------------------------------------------------------------- remote code
def _evil_folder(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "evilmodel"
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (saved / "config.json").write_text(json.dumps(cfg))
    marker = saved.parent / "CODE_RAN"
    (saved / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                   "from transformers import LlamaConfig as EvilConfig\n"
                                   "from transformers import LlamaForCausalLM as EvilModel\n")
    return marker


def test_folder_code_never_runs_unless_trusted(saved):
    from llmeasyquant.models import load_model

    marker = _evil_folder(saved)
    with pytest.raises(ValueError):
        lq.load(saved)
    with pytest.raises(ValueError):
        load_model(saved)
    assert not marker.exists()


@pytest.mark.parametrize("cmd", [["eval", "{d}", "--memory"], ["export", "{d}", "--onnx", "{d}/x.onnx"],
                                 ["quantize", "{d}", "--method", "absmax", "--out", "{d}-out"]])
def test_cli_piped_yes_runs_no_code(saved, cmd):
    marker = _evil_folder(saved)
    argv = [a.format(d=saved) for a in cmd]
    r = subprocess.run([sys.executable, "-m", "llmeasyquant.cli", *argv], input="y\n" * 5, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert not marker.exists(), r.stdout + r.stderr


# ------------------------------------------------------- allocation before checks
def test_huge_declared_shapes_refused_before_allocating(saved):
    def claim(meta):
        for name in list(meta["qlinear"])[:6]:  # six layers claiming 2 GiB each
            meta["qlinear"][name].update(in_features=2**16, out_features=2**16, w_bits=8, w_group_size=-1,
                                         w_symmetric=True)
    _edit_meta(saved, claim)
    script = textwrap.dedent(f"""
        import llmeasyquant as lq
        try:
            lq.load({str(saved)!r})
        except ValueError as e:
            print("ERR", e)
        # VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's over exec)
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print("RSS_MB", int(hwm.split()[1]) // 1024)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    out = r.stdout
    assert "ERR" in out and "does not match" in out, out + r.stderr
    rss = int(out.split("RSS_MB")[1])
    assert rss < 3000, f"peak RSS {rss} MB: memory was allocated from the declared shapes"


def test_huge_layer_count_refused(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**7
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_hidden_layers=10000000"):
        lq.load(saved)


def test_header_claims_beyond_the_file(saved):
    p = saved / "model.safetensors"
    header, data = _read_header(p)
    name = next(k for k in header if k.endswith("qweight"))
    header[name]["data_offsets"][1] += 10**9
    _write_header(p, header, data)
    with pytest.raises(ValueError, match="outside the .*data section|truncated or corrupt"):
        lq.load(saved)
    p.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        lq.load(saved)


# --------------------------------------------------------------------- values
def _edit_tensor(saved, suffix, fn):
    from safetensors.torch import load_file, save_file

    p = saved / "model.safetensors"
    sd = load_file(p)
    key = next(k for k in sorted(sd) if k.endswith(suffix))
    sd[key] = fn(sd[key].clone())
    save_file(sd, p, metadata={"format": "pt"})


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_bad_scales_refused(saved, value):
    def poke(t):
        t.view(-1)[3] = value
        return t
    _edit_tensor(saved, "w_scale", poke)
    with pytest.raises(ValueError, match="weight scales must be finite and > 0"):
        lq.load(saved)


def test_zero_point_out_of_range_refused(saved):
    def poke(t):
        t.view(-1)[0] = 100
        return t
    _edit_tensor(saved, "w_zero", poke)
    with pytest.raises(ValueError, match=r"4-bit zero-points must lie in \[-8, 7\], got \[.*100\]"):
        lq.load(saved)


def test_nan_in_float_weights_refused(saved):
    def poke(t):
        t.view(-1)[0] = math.nan
        return t
    _edit_tensor(saved, "embed_tokens.weight", poke)
    with pytest.raises(ValueError, match="embed_tokens.weight.*NaN"):
        lq.load(saved)


@pytest.mark.parametrize("suffix,new", [("w_scale", "I32"), ("qweight", "BOOL"), ("w_zero", "U8")])
def test_dtype_relabel_in_header_refused(saved, suffix, new):
    p = saved / "model.safetensors"
    header, data = _read_header(p)
    name = next(k for k in sorted(header) if k.endswith(suffix))
    header[name]["dtype"] = new  # I32: same bytes as F32, other meaning
    _write_header(p, header, data)
    with pytest.raises(ValueError, match="does not match"):
        lq.load(saved)


@pytest.mark.parametrize("version", [0, -5, True, "2", 2.0, None])
def test_bad_format_version(saved, version):
    _edit_meta(saved, lambda m: m.update(format_version=version))
    with pytest.raises(ValueError, match="format_version must be an integer >= 1"):
        lq.load(saved)


def test_symlink_leaving_the_folder_refused(saved, tmp_path):
    outside = tmp_path / "outside.safetensors"
    os.replace(saved / "model.safetensors", outside)
    (saved / "model.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the folder"):
        lq.load(saved)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(qlinear=[1, 2]),
    lambda m: m.update(qlinear={"model.layers.0.mlp.up_proj": "x"}),
    lambda m: m["qlinear"][_first_layer(m)].update(w_bits="4"),
    lambda m: m["qlinear"][_first_layer(m)].update(in_features=True),
    lambda m: m["qlinear"][_first_layer(m)].update(surprise=1),
    lambda m: m["qlinear"][_first_layer(m)].pop("in_features"),
    lambda m: m["qlinear"][_first_layer(m)].update(act="sometimes"),
    lambda m: m["qlinear"][_first_layer(m)].update(bias_dtype="Tensor"),
    lambda m: m.update(method=5),
    lambda m: m.update(method={"method": "nonsense"}),
    lambda m: m.update(method={"w_bits": 4}),
    lambda m: m.update(kv_cache={"method": "simquant", "k_bits": "many"}),
    lambda m: m.pop("qlinear"),
])
def test_malformed_quantization_json_is_one_clear_error(saved, edit):
    _edit_meta(saved, edit)
    with pytest.raises(ValueError, match="^load: "):
        lq.load(saved)


def test_deeply_nested_json(saved):
    (saved / "quantization.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="not valid JSON|not an llmeasyquant"):
        lq.load(saved)


def test_load_state_dict_checks_values():
    layer = lq.QLinear.from_linear(torch.nn.Linear(32, 8), w_bits=4, w_group_size=16, w_symmetric=False, act=None)
    sd = layer.state_dict()
    sd["w_scale"] = sd["w_scale"].clone()
    sd["w_scale"][0, 0] = -2.0
    with pytest.raises(ValueError, match="weight scales must be finite and > 0"):
        layer.load_state_dict(sd)
    with pytest.raises(ValueError, match="finite positive scales"):
        layer.set_quantized(torch.zeros(8, 32, dtype=torch.int8), torch.full((8, 2), math.nan))
