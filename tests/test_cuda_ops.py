"""CUDA kernels against the pure-PyTorch reference: the mma.sync and dp4a
int8 GEMMs (every tile configuration and split-K), the tensor-core
weight-only GEMM, EMA under CUDA-graph capture, QLinear on CUDA. Outputs are
allocated over poisoned memory, so an element a kernel forgets to write shows
up. All tests here carry the `cuda` marker and skip without a GPU; the SASS
check at the end runs on the CPU (it reads the compiled extension)."""

import os
import re
import shutil
import subprocess
import zlib

import pytest
import torch

from conftest import HAS_CUDA_KERNELS, R, assert_close_to_reference, lq, noncontig, rand_int8

cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA_KERNELS,
                                             reason="needs a CUDA GPU and a CUDA build of llmeasyquant")]
DEV = "cuda"
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _poison():
    """Fill the caching allocator's free blocks with 0xFF bytes (NaN floats,
    -1 integers), so outputs the kernels fail to write are visible."""
    blocks = [torch.empty(n, dtype=torch.uint8, device=DEV) for n in [1 << 26] + [1 << 19] * 8 + [4096] * 64]
    for b in blocks:
        b.fill_(0xFF)
    del blocks


@pytest.fixture
def gemm_path(request, monkeypatch):
    monkeypatch.setenv("LLMEQ_CUDA_GEMM", request.param)
    return request.param


# (M, N, K): M = 1 / 7 (GEMV range), 33 / 100 / 300 (each mma tile config),
# N and K off the tile sizes, K not a multiple of 16 (padded), split-K shapes.
GEMM_SHAPES = [(1, 5, 16), (1, 33, 100), (7, 130, 4096), (8, 64, 48), (9, 70, 130), (33, 200, 1024),
               (100, 129, 272), (300, 257, 520), (16, 4096, 4096), (1, 1, 3)]


@pytest.mark.parametrize("gemm_path", ["auto", "mma", "dp4a"], indirect=True)
@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_int8_gemm_exact(gemm_path, M, N, K, _):
    if gemm_path == "dp4a" and M > 8:
        pytest.skip("the dp4a GEMV takes M <= 8")
    g = _gen(M, N, K)
    a, b = rand_int8(M, K, gen=g), rand_int8(N, K, gen=g)
    _poison()
    out = lq.ops.int8_gemm(a.to(DEV), b.to(DEV))
    assert torch.equal(out.cpu(), R.int8_gemm(a, b))


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_int8_gemm_extremes(_):
    K = 4096 + 16
    for av, bv in ((-128, -128), (-128, 127), (127, 127)):
        for M in (1, 40):
            a = torch.full((M, K), av, dtype=torch.int8)
            b = torch.full((3, K), bv, dtype=torch.int8)
            assert torch.equal(lq.ops.int8_gemm(a.to(DEV), b.to(DEV)).cpu(), R.int8_gemm(a, b))


@pytest.mark.parametrize("gemm_path", ["auto", "mma"], indirect=True)
@pytest.mark.parametrize("M", [1, 7, 33, 300])
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_scaled_int8_gemm_exact(gemm_path, M, out_dtype, _):
    g = _gen(M, str(out_dtype), gemm_path)
    for K, N in ((32, 5), (100, 33), (1024, 130)):
        a, b = rand_int8(M, K, gen=g), rand_int8(N, K, gen=g)
        a_s, b_s = torch.rand(M, generator=g) + 0.01, torch.rand(N, generator=g) + 0.01
        a_z = rand_int8(M, gen=g)
        bias = torch.randn(N, generator=g).to(out_dtype)
        for zero, bsum, bb, per_tensor in ((None, None, None, False), (a_z, None, bias, False),
                                           (a_z[:1], lq.ops.weight_row_sums(b), bias, True)):
            sc = a_s[:1] if per_tensor else a_s
            _poison()
            d = lambda t: None if t is None else t.to(DEV)  # noqa: E731
            out = lq.ops.scaled_int8_gemm(d(a), d(sc), d(b), d(b_s), a_zero=d(zero), b_sum=d(bsum), bias=d(bb),
                                          out_dtype=out_dtype)
            ref = R.scaled_int8_gemm(a, sc, zero, b, b_s, bsum, bb, out_dtype)
            assert torch.equal(out.cpu(), ref), f"K={K} N={N} zero={zero is not None}"


# M = 1-4 with K % 16 == 0 run the fused quantize + GEMV (one launch), the
# rest the quantize pre-pass + GEMM; both must equal the reference exactly
@pytest.mark.parametrize("M", [1, 2, 4, 5, 7, 33, 300])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("act_symmetric", [True, False])
@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_dynamic_quant_linear_exact(M, dtype, act_symmetric, _):
    g = _gen(M, str(dtype), act_symmetric)
    for K, N in ((17, 5), (256, 33), (1024, 130), (4096, 70), (11008, 9)):
        x = (torch.randn(M, K, generator=g) * 3 + 0.5).to(dtype)
        w = rand_int8(N, K, lo=-127, gen=g)
        w_s = torch.rand(N, generator=g) / 100
        bias = torch.randn(N, generator=g).to(dtype)
        w_sum = lq.ops.weight_row_sums(w)
        _poison()
        out = lq.ops.dynamic_quant_linear(x.to(DEV), w.to(DEV), w_s.to(DEV), w_sum.to(DEV), bias.to(DEV),
                                          act_symmetric)
        assert torch.equal(out.cpu(), R.dynamic_quant_linear(x, w, w_s, w_sum, bias, act_symmetric))
    xn = noncontig(x.to(DEV))
    assert torch.equal(lq.ops.dynamic_quant_linear(xn, w.to(DEV), w_s.to(DEV), w_sum.to(DEV)).cpu(),
                       R.dynamic_quant_linear(x, w, w_s, w_sum, None, True))


# (K, N, group_size, symmetric): tensor-core kernel shapes (K % 16 / 32, g % 32)
# and shapes that take the dequantize + fp32 matmul fallback (odd g / K).
WO_SHAPES = [(64, 5, 32, True), (256, 33, 64, False), (4096, 130, 128, False), (48, 7, -1, True),
             (1024, 200, -1, False), (100, 33, 20, False), (130, 9, 10, True)]


@pytest.fixture
def wo_path(request, monkeypatch):
    monkeypatch.setenv("LLMEQ_CUDA_WO", request.param)
    return request.param


# auto = GEMV up to M = 8, dequantize + cuBLAS above; mma = the tensor-core kernel for every M
@pytest.mark.parametrize("wo_path", ["auto", "mma"], indirect=True)
@pytest.mark.parametrize("M", [1, 7, 16, 17, 64, 65, 300])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_weight_only_linear(wo_path, M, bits, dtype, _):
    g = _gen(M, bits, str(dtype))
    for K, N, gs, sym in WO_SHAPES:
        if bits == 8 and K == 48 and M > 64:
            continue
        w = torch.randn(N, K, generator=g)
        qw, s, z = lq.ops.quantize(w, bits, sym, gs)
        zp = None if sym else z
        x = torch.randn(M, K, generator=g).to(dtype)
        bias = torch.randn(N, generator=g)
        _poison()
        d = lambda t: None if t is None else t.to(DEV)  # noqa: E731
        out = lq.ops.weight_only_linear(d(x), d(qw), d(s), d(zp), bits, gs, d(bias)).cpu()
        ref = R.weight_only_linear(x, qw, s, zp, bits, gs, bias)
        wd = R.dequantize(qw, s, z, bits, gs, K, torch.float64)
        ref64 = x.double() @ wd.T + bias.double()
        if dtype != torch.float32:
            ref64 = ref64.to(dtype).double()
        assert not out.isnan().any(), f"unwritten outputs K={K} N={N} g={gs}"
        assert_close_to_reference(out, ref, ref64)


# The W4A16 panel kernel (gemm_w4_panel.cu) against its PyTorch kernel on the
# CPU (panel.linear: the same 16-bit weights, so only the float32 summation
# order differs). (K, N, group size, symmetric): one and several panels, N off
# 64, K off the 64-value stage (per row), g = 64 / 128, a K long enough for
# every pipeline stage to be reused many times.
PANEL_SHAPES = [(64, 64, 64, True), (192, 100, 64, False), (80, 33, -1, False), (256, 130, 128, True),
                (4096, 200, 128, False), (1024, 1, -1, True)]


@pytest.mark.parametrize("M", [1, 9, 16, 17, 32, 33, 64, 65, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_weight_only_linear_panel(M, dtype, _):
    from llmeasyquant import panel

    g = _gen("panel", M, str(dtype))
    for K, N, gs, sym in PANEL_SHAPES:
        w = torch.randn(N, K, generator=g)
        qw, s, z = lq.ops.quantize(w, 4, sym, gs)
        p = panel.pack(qw, s, None if sym else z, gs, K)
        assert p is not None, (K, N, gs)
        x = torch.randn(M, K, generator=g).to(dtype)
        bias = torch.randn(N, generator=g) if not sym else None
        _poison()
        pd = panel.pack(qw.to(DEV), s.to(DEV), None if sym else z.to(DEV), gs, K)
        assert torch.equal(pd.qpanel.cpu(), p.qpanel) and torch.equal(pd.gparams.cpu(), p.gparams)
        out = lq.ops.weight_only_linear_panel(x.to(DEV), pd.qpanel, pd.gparams, N, gs,
                                              None if bias is None else bias.to(DEV)).cpu()
        ref = lq.ops.weight_only_linear_panel(x, p.qpanel, p.gparams, N, gs, bias)  # panel.linear on the CPU
        assert not out.isnan().any(), f"unwritten outputs K={K} N={N} g={gs}"
        wd = panel.dequantize(p.qpanel, p.gparams, N, K, torch.float64)
        ref64 = x.double() @ wd.T + (0 if bias is None else bias.double())
        assert_close_to_reference(out, ref, ref64.to(dtype).double())
        if M > 1:  # non-contiguous activations: the op makes them contiguous
            xs = noncontig(x.to(DEV))
            assert torch.equal(lq.ops.weight_only_linear_panel(xs, pd.qpanel, pd.gparams, N, gs).cpu(),
                               lq.ops.weight_only_linear_panel(xs.contiguous(), pd.qpanel, pd.gparams, N, gs).cpu())


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_qlinear_takes_the_panel_kernel_and_rebuilds_it_when_weights_change(_, monkeypatch):
    from llmeasyquant import panel
    from llmeasyquant.nn import QLinear

    g = _gen("qlinear-panel")
    lin = torch.nn.Linear(256, 96).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=g) / 16)
    q = QLinear.from_linear(lin.to(DEV), w_bits=4, w_group_size=64, act=None, w_symmetric=False)
    x = torch.randn(16, 256, generator=g).to(torch.bfloat16).to(DEV)
    out = q(x)
    p = q._cuda_panel(q.qweight)
    assert p is not None
    assert torch.equal(out, lq.ops.weight_only_linear_panel(x, p.qpanel, p.gparams, 96, 64, q.bias))
    assert "_panel_cache" not in "".join(q.state_dict())  # a derived cache, never saved
    with torch.no_grad():
        q.qweight.zero_()  # in place: the version counter changes, the cache is rebuilt
    assert q._cuda_panel(q.qweight) is not p
    monkeypatch.setenv("LLMEQ_CUDA_WO", "dequant")  # a forced canonical path is respected
    assert not panel.wanted(x, 4)
    torch.testing.assert_close(q(x), lq.ops.weight_only_linear(x, q.qweight, q.scales(), q.w_zero, 4, 64, q.bias))


# groups of 8..128 take g / 8 lanes each (several groups per warp); odd row
# counts leave the last warp with lanes past the end
@pytest.mark.parametrize("g", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_quantize_sub_warp_groups_exact(g, bits, symmetric, _):
    gen = _gen("subwarp", g, bits, symmetric)
    for rows, K in ((1, g), (3, 4 * g), (37, 2 * g), (129, 512)):
        x = (torch.randn(rows, K, generator=gen) * 2).to(torch.bfloat16)
        _poison()
        q, s, z = lq.ops.quantize(x.to(DEV), bits, symmetric, g)
        rq, rs, rz = R.quantize(x, bits, symmetric, g)
        assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and torch.equal(z.cpu(), rz), (rows, K)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_quantize_large_rows_and_groups(dtype, bits, _):
    # per-token rows longer than one warp pass, groups of 128, odd groups for 4-bit
    g = _gen("q", str(dtype), bits)
    x = (torch.randn(37, 4096 + 8, generator=g) * 3).to(dtype)
    for gs in (-1, 128, 8, 0, 4104 // 3 if bits == 8 else 57):
        if gs > 0 and x.shape[-1] % gs:
            continue
        for sym in (True, False):
            _poison()
            got = lq.ops.quantize(x.to(DEV), bits, sym, gs)
            ref = R.quantize(x, bits, sym, gs)
            for u, v in zip(got, ref):
                assert torch.equal(u.cpu(), v), f"group_size={gs} sym={sym}"
    xo = (torch.randn(5, 171, generator=g)).to(dtype)  # 4-bit, odd group 57: bytes straddle groups
    for u, v in zip(lq.ops.quantize(xo.to(DEV), bits, False, 57), R.quantize(xo, bits, False, 57)):
        assert torch.equal(u.cpu(), v)


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_channel_stats_many_rows(_):
    g = _gen("stats")
    x = torch.randn(1000, 300, generator=g) * 5
    x[17, 3] = float("nan")
    ref = lq.ops.new_channel_stats(300)
    got = lq.ops.new_channel_stats(300, DEV)
    for chunk in (x[:600], x[600:]):
        R.channel_stats_(chunk, *ref)
        lq.ops.channel_stats_(chunk.to(DEV), *got)
    for u, v in zip(got, ref):
        torch.testing.assert_close(u.cpu(), v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_ema_quantize_in_a_cuda_graph(symmetric, _):
    """Algorithm 1 runs on the device without host syncs: captured once in a
    CUDA graph, each replay advances the state exactly like the reference."""
    g = _gen("ema-graph", symmetric)
    xs = [torch.randn(8, 256, generator=g) * (1 + i) for i in range(5)]
    static_x = xs[0].to(DEV).clone()
    state = lq.ops.new_ema_state(DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
        lq.ops.ema_quantize_(static_x, state.clone(), 0.9, 1e-5, 8, symmetric, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, s, z = lq.ops.ema_quantize_(static_x, state, 0.9, 1e-5, 8, symmetric, True)
    state.zero_()
    ref_state = lq.ops.new_ema_state()
    for x in xs:
        static_x.copy_(x.to(DEV))
        graph.replay()
        rq, rs, rz = R.ema_quantize_(x, ref_state, 0.9, 1e-5, 8, symmetric, True)
        torch.cuda.synchronize()
        assert torch.equal(state.cpu(), ref_state)
        assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and torch.equal(z.cpu(), rz)


@pytest.mark.parametrize("act", [None, "dynamic", "static", "ema"])
@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_qlinear_on_cuda_matches_cpu(act, _):
    from llmeasyquant.nn import QLinear

    g = _gen("qlinear", str(act))
    lin = torch.nn.Linear(256, 96).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=g) / 16)
    kw = dict(w_bits=4, w_group_size=64, act=None) if act is None else dict(act=act)
    q = QLinear.from_linear(lin, **kw)
    if act == "static":
        q.set_static_range(-4.0, 4.0)
    qc = QLinear.from_linear(lin.to(DEV), **kw)
    if act == "static":
        qc.set_static_range(-4.0, 4.0)
    x = torch.randn(3, 5, 256, generator=g).to(torch.bfloat16)
    out_cpu, out_gpu = q(x), qc(x.to(DEV)).cpu()
    if act is None:
        torch.testing.assert_close(out_gpu, out_cpu, rtol=2e-2, atol=2e-2)
    else:
        assert torch.equal(out_gpu, out_cpu)  # integer path: exact on both devices


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_cuda_error_mixed_devices(_):
    a = rand_int8(4, 32).to(DEV)
    with pytest.raises(RuntimeError, match="expected b \\(weights\\) on cuda"):
        lq.ops.int8_gemm(a, rand_int8(4, 32))


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0, -1.0])
@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_cuda_error_bad_static_scale(bad, _):
    x = torch.randn(4, 32, device=DEV)
    with pytest.raises(ValueError, match="finite and > 0"):
        lq.ops.quantize_static(x, torch.tensor([bad], device=DEV), torch.zeros(1, dtype=torch.int8, device=DEV), 8, 0)


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_cuda_error_bad_path_setting(_, monkeypatch):
    a = rand_int8(4, 32).to(DEV)
    monkeypatch.setenv("LLMEQ_CUDA_GEMM", "fast")
    with pytest.raises(ValueError, match="LLMEQ_CUDA_GEMM"):
        lq.ops.int8_gemm(a, a)


# ---- SASS: the instructions we claim are in the binary (no GPU needed) --------
def _cuobjdump_tools():
    import site

    roots = site.getsitepackages()
    cuobj = nvdis = None
    for r in roots:
        for rel in ("nvidia/cu13/bin/cuobjdump", "triton/backends/nvidia/bin/cuobjdump"):
            if not cuobj and os.path.exists(os.path.join(r, rel)):
                cuobj = os.path.join(r, rel)
        if not nvdis and os.path.exists(os.path.join(r, "triton/backends/nvidia/bin/nvdisasm")):
            nvdis = os.path.join(r, "triton/backends/nvidia/bin/nvdisasm")
    return cuobj or shutil.which("cuobjdump"), nvdis or shutil.which("nvdisasm")


def _sass_by_kernel(arch):
    from llmeasyquant import _C

    cuobj, nvdis = _cuobjdump_tools()
    assert cuobj and nvdis, "cuobjdump / nvdisasm not found (nvidia-cuda-cuobjdump and triton are pinned deps)"
    env = dict(os.environ, PATH=os.path.dirname(nvdis) + os.pathsep + os.environ.get("PATH", ""))
    out = subprocess.run([cuobj, "--dump-sass", "--gpu-architecture", arch, _C.__file__], env=env,
                         capture_output=True, text=True, check=True).stdout
    kernels, name = {}, None
    for line in out.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            kernels[name] = []
        elif name:
            kernels[name].append(line)
    return {k: "\n".join(v) for k, v in kernels.items()}


@pytest.mark.skipif(not lq.build_info()["cuda"], reason="this build has no CUDA kernels (no nvcc / CPU torch)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_sass_has_tensor_core_and_dp4a_instructions(arch):
    sass = _sass_by_kernel(arch)
    mma = [k for k in sass if "gemm_s8_mma_kernel" in k]
    gemv = [k for k in sass if "gemv_s8_dp4a_kernel" in k]
    wo = [k for k in sass if "weight_only_kernel" in k]
    wo_gemv = [k for k in sass if "weight_only_gemv_kernel" in k]
    assert len(mma) == 3 and gemv and len(wo) == 12 and len(wo_gemv) == 4, sorted(sass)
    for k in mma:
        assert "IMMA.16832.S8.S8" in sass[k] and "LDSM" in sass[k] and "LDGSTS" in sass[k], k
    for k in gemv:
        assert "IDP.4A.S8.S8" in sass[k], k
    for k in wo:
        assert "HMMA.16816.F32" in sass[k], k
    # the W4A16 panel kernel: tensor cores, ldmatrix, cp.async, the LOP3 unpacking, 16-bit sub/mul
    panel = [k for k in sass if "w4_panel_kernel" in k]
    assert len(panel) == 6, sorted(sass)
    for k in panel:
        assert "HMMA.16816.F32" in sass[k] and "LDSM" in sass[k] and "LDGSTS" in sass[k], k
        assert "LOP3" in sass[k] and re.search(r"\bLDS\.128\b", sass[k]), k
        assert re.search(r"\bHFMA2|\bHADD2|\bHMUL2", sass[k]), k  # the dequantize stays in 16-bit pairs
    # decode W8A8 in one launch: the fused quantize + dp4a GEMV
    fused = [k for k in sass if "gemv_s8_fused_quant_kernel" in k]
    assert len(fused) == 1 and "IDP.4A.S8.S8" in sass[fused[0]], sorted(sass)
    # the vectorised dequantize: 16-byte stores of 8 values
    deq = [k for k in sass if "dequantize_vec8_kernel" in k]
    assert len(deq) == 1 and re.search(r"\bSTG\.E\.128\b", sass[deq[0]]), sorted(sass)
    quant = [k for k in sass if "quantize_segments_kernel" in k]
    assert len(quant) == 1, sorted(sass)
    for k in mma + gemv + wo_gemv + panel + deq + fused + quant:  # register arrays stayed in registers (no local-memory spills)
        assert not re.search(r"\b(LDL|STL)\b", sass[k]), f"{k} spills to local memory"
