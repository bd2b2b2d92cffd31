"""The ops own their device fallbacks (_fallback.py): the PyTorch kernels are
registered only where a device has no compiled kernel, compute what the CPU
kernels compute, and carry 2/3-bit values where a device's kernels take 4 and
8 bits (CUDA). Exercised on the CPU: the fallback functions are called
directly, and ops.py's routing is driven by a CPU that pretends its kernels
take 4 and 8 bits only, as CUDA's do. QLinear holds no device branch: on the
meta device it builds and runs through the fakes with its packed weight."""

import ast
import copy
import pathlib

import pytest
import torch
from torch import nn

from conftest import R, assert_close_to_reference, lq
from llmeasyquant import _checks, _fallback

_o = torch.ops.llmeasyquant
PKG = pathlib.Path(lq.__file__).parent
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _x(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g) * 4
    if shape[-1]:
        x[..., 0] += 3.0  # an outlier channel, as in real activations
    return x.to(dtype)


def _groups(K):
    return [0, -1] + [g for g in (4, 16, 5) if K % g == 0 and g < K]


def _table(op: str) -> dict:
    rows = torch._C._dispatch_dump_table(f"llmeasyquant::{op}").splitlines()
    return {r.split(":")[0]: r for r in rows if ":" in r}


# ---- registration: only where no compiled kernel is ----------------------
@pytest.mark.parametrize("op", sorted(_fallback.KERNELS))
def test_fallback_is_the_kernel_only_of_devices_without_one(op):
    t = _table(op)
    if op == "weight_only_linear_panel":  # a CUDA layout: its PyTorch kernel is the CPU's kernel, by design
        assert "_fallback.py" in t["CPU"] and "register_cpu.cpp" not in t["CPU"]
    else:
        assert "register_cpu.cpp" in t["CPU"] and "_fallback.py" not in t["CPU"]
    assert "_fallback.py" not in t["Meta"]  # the fakes still trace
    for dev in ("MPS", "XPU", "PrivateUse1"):
        assert "_fallback.py" in t[dev] and "default backend kernel" in t[dev], t[dev]
    # W4A8 and the decode glue: CPU kernels only, so far
    if lq.build_info()["cuda"] and op not in ("w4a8_linear", "add_rms_norm", "silu_mul", "decode_attention_"):
        assert "register_cuda.cpp" in t["CUDA"]
    else:
        assert "_fallback.py" in t["CUDA"]


def test_the_other_ops_have_compiled_kernels_only():
    for op in ("channel_stats_", "ema_quantize_", "int8_gemm", "scaled_int8_gemm", "dynamic_quant_linear",
               "dynamic_quant_linear_packed", "w4a8_linear_packed"):
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"llmeasyquant::{op}", "CompositeExplicitAutograd")


# ---- the registered kernels compute what the CPU kernels compute ----------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 7), (3, 64), (17, 100), (2, 5, 48), (4, 0)])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fallback_kernels_match_the_cpu_kernels_bit_for_bit(dtype, shape, bits, symmetric):
    x = _x(shape, dtype, seed=bits)
    K = shape[-1]
    for g in _groups(K) if K else [-1]:
        got = _fallback.KERNELS["quantize"](x, bits, symmetric, g)
        want = _o.quantize(x, bits, symmetric, g)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), f"group_size={g}"
        q, s, z = want
        assert torch.equal(_fallback.KERNELS["quantize_static"](x, s, z, bits, g), _o.quantize_static(x, s, z, bits, g))
        assert torch.equal(_fallback.KERNELS["dequantize"](q, s, z, bits, g, K, dtype),
                           _o.dequantize(q, s, z, bits, g, K, dtype))


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("gs,sym", [(-1, True), (16, False), (24, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_weight_only_linear_matches_the_cpu_kernel(bits, gs, sym, dtype):
    g = torch.Generator().manual_seed(bits)
    w, x = torch.randn(40, 48, generator=g), torch.randn(2, 3, 48, generator=g).to(dtype)
    bias = torch.randn(40, generator=g).to(dtype)
    qw, s, z = _o.quantize(w, bits, sym, gs)
    zp = None if sym else z
    ref = _o.weight_only_linear(x, qw, s, zp, bits, gs, bias)
    ref64 = x.double() @ R.dequantize(qw, s, z, bits, gs, 48, torch.float64).T + bias.double()
    assert_close_to_reference(_fallback.KERNELS["weight_only_linear"](x, qw, s, zp, bits, gs, bias), ref, ref64)
    if bits < 4:  # the route for devices whose kernels take 8 bits: unpack, then the 8-bit kernel
        assert_close_to_reference(_fallback.weight_only_linear_as_int8(x, qw, s, zp, bits, gs, bias), ref, ref64)


@pytest.mark.parametrize("bits", [3, 2])
@pytest.mark.parametrize("dtype", FLOATS)
def test_dequantize_through_the_8bit_kernel_is_bit_exact(bits, dtype):
    x = _x((9, 40), torch.float32, seed=3)
    for g in (-1, 8, 0):
        for sym in (True, False):
            q, s, z = _o.quantize(x, bits, sym, g)
            assert torch.equal(_fallback.dequantize_as_int8(q, s, z, bits, g, 40, dtype),
                               _o.dequantize(q, s, z, bits, g, 40, dtype))


def test_fallback_kernels_check_like_the_kernels():
    # a device without kernels must fail as its fake does (same checker, same message)
    for bad in [lambda k: k(torch.randn(2, 8), 5, True, -1), lambda k: k(torch.randn(2, 8), 4, True, 3)]:
        with pytest.raises(ValueError) as want:
            bad(_o.quantize)
        with pytest.raises(ValueError) as got:
            bad(_fallback.KERNELS["quantize"])
        assert str(got.value).splitlines()[0] == str(want.value).splitlines()[0]
    with pytest.raises(ValueError, match=r"scales must be finite and > 0, got scale\[0\] = 0"):
        _fallback.KERNELS["quantize_static"](torch.randn(2, 8), torch.zeros(1), torch.zeros(1, dtype=torch.int8), 8, 0)


# ---- ops.py routes 2/3-bit values where the kernels take 4 and 8 ----------
class _Recorder:
    """torch.ops.llmeasyquant, noting the bit width each kernel call gets."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        op = getattr(_o, name)

        def call(*args):
            bits = next((a for a in args[1:] if isinstance(a, int) and not isinstance(a, bool)), None)
            self.calls.append((name, bits))
            return op(*args)

        return call


@pytest.fixture
def kernels_take_4_and_8(monkeypatch):
    """This CPU's kernels pretend to take 4 and 8 bits only (as CUDA's do)."""
    monkeypatch.setattr(_checks, "kernel_bits", lambda dev: _checks.CUDA_KERNEL_BITS)
    rec = _Recorder()
    monkeypatch.setattr(lq.ops, "_ops", rec)
    monkeypatch.setattr(_fallback, "_ops", rec)
    return rec


@pytest.mark.parametrize("bits", [3, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ops_run_2_3_bit_values_without_a_2_3_bit_kernel(kernels_take_4_and_8, bits, symmetric):
    x = _x((6, 48), torch.bfloat16, seed=bits)
    for g in (-1, 16, 0):
        want = _o.quantize(x, bits, symmetric, g)
        got = lq.ops.quantize(x, bits, symmetric, g)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), f"group_size={g}"
        q, s, z = want
        assert torch.equal(lq.ops.quantize_static(x, s, z, bits, g), _o.quantize_static(x, s, z, bits, g))
        assert torch.equal(lq.ops.dequantize(q, s, z, bits, g, 48), _o.dequantize(q, s, z, bits, g, 48, torch.float32))
    qw, s, z = _o.quantize(_x((24, 48), seed=7), bits, symmetric, 16)
    zp = None if symmetric else z
    ref = _o.weight_only_linear(x, qw, s, zp, bits, 16, None)
    ref64 = x.double() @ R.dequantize(qw, s, z, bits, 16, 48, torch.float64).T
    assert_close_to_reference(lq.ops.weight_only_linear(x, qw, s, zp, bits, 16, None), ref, ref64)
    assert kernels_take_4_and_8.calls and all(b == 8 for _, b in kernels_take_4_and_8.calls), \
        kernels_take_4_and_8.calls  # only 8-bit kernels were asked (dequantize, weight_only_linear)
    with pytest.raises(ValueError, match=r"unsupported bits=5; supported: 2, 3, 4, 8"):
        lq.ops.quantize(x, 5)


@pytest.mark.parametrize("bits", [3, 2])
@pytest.mark.parametrize("act", [None, "dynamic", "static", "ema"])
def test_qlinear_2_3_bit_without_a_2_3_bit_kernel(monkeypatch, bits, act):
    lin = nn.Linear(48, 24)
    cfg = dict(w_bits=bits, w_group_size=16, w_symmetric=False, act=act)
    want = lq.QLinear.from_linear(lin, **cfg)
    rec = _Recorder()
    monkeypatch.setattr(_checks, "kernel_bits", lambda dev: _checks.CUDA_KERNEL_BITS)
    monkeypatch.setattr(lq.ops, "_ops", rec)
    monkeypatch.setattr(_fallback, "_ops", rec)
    got = lq.QLinear.from_linear(lin, **cfg)
    if act == "static":
        want.set_static_range(-3.0, 3.0)
        got.set_static_range(-3.0, 3.0)
    for k, v in want.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    x = _x((5, 48), seed=2)
    assert torch.equal(got.dequantize(), want.dequantize())
    torch.testing.assert_close(got(x), want(x), rtol=1e-5, atol=1e-5)  # 8- vs 2/3-bit kernel: summation order
    # set_weight with given scales goes through quantize_static
    got.set_weight(lin.weight, want.w_scale, want.w_zero)
    assert torch.equal(got.qweight, want.qweight)
    assert all(b not in (2, 3) for _, b in rec.calls), rec.calls


# ---- float16 scales: a mode of ops.quantize --------------------------------
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_float16_scale_mode_matches_the_reference(device, bits, symmetric):
    x = _x((12, 64), seed=5)
    x[0] *= 1e-4  # scales under float16's smallest normal: raised to it before the integers are chosen
    for g in (-1, 16, 0):
        q, s, z = lq.ops.quantize(x.to(device), bits, symmetric, g, scale_dtype=torch.float16)
        rq, rs, rz = R.quantize(x, bits, symmetric, g, torch.float16)
        assert s.dtype == torch.float32 and torch.equal(s.cpu(), rs) and torch.equal(s.cpu().half().float(), rs)
        assert torch.equal(z.cpu(), rz) and torch.equal(q.cpu(), rq), f"group_size={g}"
    assert all(torch.equal(a, b) for a, b in zip(lq.ops.quantize(x, bits, symmetric, -1, scale_dtype="float32"),
                                                 _o.quantize(x, bits, symmetric, -1)))
    with pytest.raises(ValueError, match="scale dtype must be one of float32, float16, got 'bfloat16'"):
        lq.ops.quantize(x, bits, symmetric, -1, scale_dtype="bfloat16")


# ---- QLinear: no device branch -------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("act", [None, "dynamic", "static", "ema"])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_qlinear_builds_and_runs_on_meta_with_its_packed_weight(monkeypatch, bits, act, scale_dtype):
    rec = _Recorder()
    monkeypatch.setattr(lq.ops, "_ops", rec)
    lin = nn.Linear(48, 24, device="meta")
    q = lq.QLinear.from_linear(lin, w_bits=bits, w_group_size=-1 if bits == 8 else 16, w_symmetric=bits != 3,
                               act=act, w_scale_dtype=scale_dtype)
    assert q.qweight.is_meta and q.qweight.shape == (24, lq.quant_format.packed_len(48, bits))
    x = torch.randn(2, 5, 48, device="meta", dtype=torch.bfloat16)
    out = q(x)
    assert out.is_meta and out.shape == (2, 5, 24) and out.dtype == torch.bfloat16
    w = q.dequantize()
    assert w.is_meta and w.shape == (24, 48)
    # the kernels (here the fakes) got the layer's own packed width, never an unpacked copy
    if scale_dtype == "float32":  # (float16 scales are chosen in PyTorch: ops.quantize)
        assert ("quantize", bits) in rec.calls
    assert ("dequantize", bits) in rec.calls  # q.dequantize()
    assert all(b == bits for name, b in rec.calls if name == "weight_only_linear"), rec.calls


def test_qlinear_2_3_bit_runs_on_every_device(device):
    lin = nn.Linear(48, 24)
    for bits in (2, 3):
        cpu = lq.QLinear.from_linear(lin, w_bits=bits, w_group_size=16, w_symmetric=False, act=None)
        there = lq.QLinear.from_linear(copy.deepcopy(lin).to(device), w_bits=bits, w_group_size=16,
                                       w_symmetric=False, act=None)
        assert torch.equal(there.qweight.cpu(), cpu.qweight) and there.qweight.device.type == device.type
        assert torch.equal(there.dequantize().cpu(), cpu.dequantize())
        x = _x((3, 48), seed=bits)
        torch.testing.assert_close(there(x.to(device)).cpu(), cpu(x), rtol=1e-5, atol=1e-5)


# ---- production code does not import the test oracle ----------------------
PRODUCTION = ["nn/qlinear.py", "ops.py", "_fallback.py", "quant_format.py", "_checks.py", "_fake.py", "kvcache.py",
              "distributed/tensor_parallel.py", "onnx_export.py", "io.py"]


@pytest.mark.parametrize("path", PRODUCTION)
def test_production_modules_do_not_import_the_reference(path):
    tree = ast.parse((PKG / path).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [f"{n.module}.{a.name}" if n.module else a.name for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [m for m in names if "_reference" in m], f"{path} imports the test oracle"


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,g", [((1, 64), 32), ((5, 96), -1), ((2, 3, 100), 20), ((4, 0), -1), ((0, 64), 64)])
@pytest.mark.parametrize("zero_points", [False, True])
def test_w4a8_fallback_matches_the_cpu_kernel_bit_for_bit(dtype, shape, g, zero_points):
    K = shape[-1]
    qw, s, z = lq.ops.quantize(_x((7, K), seed=3), 4, not zero_points, g)
    bias = torch.randn(7)
    x = _x(shape, dtype)
    got = _fallback.KERNELS["w4a8_linear"](x, qw, s, z if zero_points else None, g, bias)
    want = _o.w4a8_linear(x, qw, s, z if zero_points else None, g, bias)
    assert got.dtype == want.dtype == dtype and torch.equal(got, want)
