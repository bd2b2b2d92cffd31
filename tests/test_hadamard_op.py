"""llmeasyquant::hadamard_transform (src/cpp/kernels/hadamard*.cpp,
src/cuda/hadamard.cu) against the dense float64 reference
(``_reference.hadamard_transform``: ``x @ kron(had_m, S_p)^T * scale``), on
every CPU tier this machine runs (``cpu_isa``), all three float dtypes, the
widths of LLM layers (576 = 36 x 16, 1536 = 12 x 128, 2560 = 20 x 128,
4096 = 2**12, 14336 = 28 x 512), one row, odd row counts and 3-D inputs.

Tolerance (conftest.assert_close_to_reference): the kernel's error against the
float64 result may be at most 4x that of the float32 PyTorch transform
(``hadamard.transform``) plus one rounding step of the output dtype. Exact
where the kernels promise it: the tiers agree bit for bit for +-1 matrices,
and without had_m the kernel is ``hadamard.transform`` bit for bit (the same
butterflies). The CUDA cases skip without a GPU (compiled, not yet validated
on one); the SASS check runs wherever the build has CUDA kernels."""

from __future__ import annotations

import functools
import math
import re
import zlib

import pytest
import torch

from conftest import HAS_CUDA_KERNELS, R, _isas, assert_close_to_reference, lq, noncontig
from llmeasyquant import _checks, _fallback, hadamard

ops = torch.ops.llmeasyquant
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
NS = [1, 2, 8, 12, 64, 576, 1536, 768, 4096, 2560]
LEADS = [(1,), (7,), (2, 3)]
cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA_KERNELS,
                                             reason="needs a CUDA GPU and a CUDA build of llmeasyquant")]


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _x(shape, dtype, *key) -> torch.Tensor:
    """Activation-like rows: per-channel magnitudes and an outlier channel
    (what the rotation is for)."""
    g = _gen(shape, dtype, *key)
    x = torch.randn(shape, generator=g) * (torch.rand(shape[-1], generator=g) * 2 + 0.1)
    x[..., int(torch.randint(shape[-1], (1,), generator=g))] += 30.0
    return x.to(dtype)


def _ref64(x, had, scale, dense=None):
    """float64 result: the dense reference for small products, else the same
    product factored: kron(had, S_p) = kron(had, S_p1, S_p2) with p = p1 p2
    (Sylvester matrices are Kronecker powers of S_2)."""
    n = x.shape[-1]
    if dense if dense is not None else x.numel() * n <= 1 << 26:
        return R.hadamard_transform(x, had, scale, torch.float64)
    m = 1 if had is None else had.shape[0]
    hm = torch.ones(1, 1, dtype=torch.float64) if had is None else had.double().cpu()
    p = n // m
    p1 = 1 << (p.bit_length() - 1) // 2
    X = x.double().cpu().reshape(-1, m, p1, p // p1)
    y = X @ hadamard.sylvester(p // p1).T  # one factor at a time (a 4-operand einsum is slow)
    y = torch.einsum("bj,rijc->ribc", hadamard.sylvester(p1), y)
    y = torch.einsum("ai,ribc->rabc", hm, y)
    return (y * scale).reshape(x.shape)


@functools.lru_cache(maxsize=None)
def _case(n, lead, dtype):
    """x, had_m, scale, the float32 PyTorch transform and the float64 result
    (computed once; every tier is compared with them)."""
    x = _x((*lead, n), dtype, "case")
    had = hadamard.small_matrix(n)
    scale = 1.0 / math.sqrt(n)
    return x, had, scale, hadamard.transform(x, had, scale), _ref64(x, had, scale)


# ---- against the reference, every CPU tier ---------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", NS)
def test_matches_reference(cpu_isa, dtype, n):
    for lead in LEADS:
        x, had, scale, ref, ref64 = _case(n, lead, dtype)
        out = ops.hadamard_transform(x, had, scale)
        assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
        assert_close_to_reference(out, ref, ref64)


def test_long_rows(cpu_isa):
    # Llama-3-8B's MLP width (m = 28, p = 512) and a long power of two
    for n in (14336, 16384):
        for dtype in FLOATS:
            x = _x((3, n), dtype, "long")
            had = hadamard.small_matrix(n)
            out = lq.ops.hadamard_transform(x, had)
            assert_close_to_reference(out, hadamard.transform(x, had), _ref64(x, had, 1 / math.sqrt(n)))


def test_the_factored_float64_product_is_the_dense_reference():
    for n in (12, 576, 2560, 4096):
        x = _x((3, n), torch.float32, "factored")
        had = hadamard.small_matrix(n)
        dense, factored = _ref64(x, had, 0.5, dense=True), _ref64(x, had, 0.5, dense=False)
        torch.testing.assert_close(factored, dense, rtol=1e-12, atol=1e-12)


def test_orthonormal():
    # Q = kron(H_m, S_p) / sqrt(n) is orthogonal: norms are kept, Q^T Q x = x
    for n in (576, 1536, 2560):
        x = _x((5, n), torch.float32, "orth")
        had = hadamard.small_matrix(n)
        y = lq.ops.hadamard_transform(x, had)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
        torch.testing.assert_close(y, x @ hadamard.matrix(n).T, rtol=1e-5, atol=1e-4)


# ---- exactness the kernels promise -------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
def test_tiers_agree_bit_for_bit(dtype, monkeypatch):
    tiers = _isas()
    if len(tiers) < 2:
        pytest.skip("one CPU tier only")
    for n in NS + [14336]:
        x, had = _x((5, n), dtype, "tiers"), hadamard.small_matrix(n)
        outs = []
        for t in tiers:
            monkeypatch.setenv("LLMEQ_CPU_ISA", t)
            outs.append(ops.hadamard_transform(x, had, 0.125))
        for t, o in zip(tiers[1:], outs[1:]):
            assert torch.equal(o, outs[0]), f"n={n}: {t} differs from {tiers[0]}"


@pytest.mark.parametrize("dtype", FLOATS)
def test_without_had_m_is_the_pytorch_transform_bit_for_bit(cpu_isa, dtype):
    for n in (1, 2, 4, 8, 16, 64, 512, 4096):
        x = _x((3, n), dtype, "exact")
        assert torch.equal(ops.hadamard_transform(x, None, n ** -0.5), hadamard.transform(x, None, n ** -0.5)), n


def test_had_m_none_vs_given(cpu_isa):
    # a 1 x 1 [[1]] is no cross-block product; H_2 (x) S_p is S_2p, and the
    # cross-block sums are then the last butterfly stage's (u + v, u - v): exact
    for n in (8, 64, 1024):
        x = _x((4, n), torch.float32, "none")
        y = ops.hadamard_transform(x, None, 0.25)
        assert torch.equal(ops.hadamard_transform(x, torch.ones(1, 1), 0.25), y)
        assert torch.equal(ops.hadamard_transform(x, hadamard.small_matrix(2), 0.25), y)


def test_general_matrix(cpu_isa):
    # had_m need not be +-1 (nor orthogonal): any float32 [m, m]
    g = _gen("general")
    for m, p in ((3, 16), (12, 8), (5, 32), (7, 1), (6, 4)):
        had = torch.randn(m, m, generator=g)
        x = _x((9, m * p), torch.float32, "general", m)
        out = ops.hadamard_transform(x, had, 0.3)
        assert_close_to_reference(out, hadamard.transform(x, had, 0.3), R.hadamard_transform(x, had, 0.3,
                                                                                             torch.float64))
        # a strided had_m is read as the matrix it shows (made contiguous inside)
        assert torch.equal(ops.hadamard_transform(x, had.T, 0.3), ops.hadamard_transform(x, had.T.contiguous(), 0.3))


def test_scale_argument(cpu_isa):
    x, had = _x((3, 576), torch.float32, "scale"), hadamard.small_matrix(576)
    unit = ops.hadamard_transform(x, had, 1.0)
    assert_close_to_reference(unit, hadamard.transform(x, had, 1.0), R.hadamard_transform(x, had, 1.0, torch.float64))
    for s in (0.5, -2.0, 0.0):  # powers of two and 0 scale exactly
        assert torch.equal(ops.hadamard_transform(x, had, s), unit * s)
    # the wrapper's default is 1 / sqrt(n); had_m moves to x's device
    assert torch.equal(lq.ops.hadamard_transform(x, had), ops.hadamard_transform(x, had, 1 / math.sqrt(576)))
    assert torch.equal(lq.ops.hadamard_transform(x, had, 0.5), ops.hadamard_transform(x, had, 0.5))


# ---- layouts, threads ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
def test_noncontiguous_inputs(cpu_isa, dtype):
    for n in (12, 64, 1536):
        had = hadamard.small_matrix(n)
        x = _x((6, 5, n), dtype, "noncontig")
        want = ops.hadamard_transform(x, had, 0.5)
        views = [noncontig(x), x.transpose(0, 1), x[::2], x[:, 1:4], x.reshape(30, n)[::3]]
        for v in views:
            got = ops.hadamard_transform(v, had, 0.5)
            assert got.is_contiguous() and torch.equal(got, ops.hadamard_transform(v.contiguous(), had, 0.5))
        assert torch.equal(ops.hadamard_transform(noncontig(x), had, 0.5), want)
    # a 1-D x, empty leading dims
    x = _x((64,), dtype, "1d")
    assert torch.equal(ops.hadamard_transform(x, None, 1.0), ops.hadamard_transform(x[None], None, 1.0)[0])
    e = ops.hadamard_transform(torch.empty(0, 3, 48, dtype=dtype), hadamard.small_matrix(48), 1.0)
    assert e.shape == (0, 3, 48) and e.dtype == dtype


def test_threads_split_rows_without_changing_results(cpu_isa):
    x, had = _x((65, 1536), torch.float32, "threads"), hadamard.small_matrix(1536)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.hadamard_transform(x, had, 0.5)
        torch.set_num_threads(2)
        assert torch.equal(ops.hadamard_transform(x, had, 0.5), one)
    finally:
        torch.set_num_threads(n)


def test_output_is_a_fresh_tensor():
    x = _x((4, 1), torch.float32, "fresh")  # n = 1: the transform is x * scale
    y = ops.hadamard_transform(x, None, 1.0)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr() and not y._is_view()


# ---- errors: same checks and messages in C++ and Python -----------------------------------------
BAD = [
    (lambda: (torch.randn(3, 100), None), ValueError,
     r"expected the last dim of x to be m \* 2\*\*k with m = 1 \(no had_m\), got 100 \(x \[3, 100\]\)"),
    (lambda: (torch.randn(3, 100), hadamard.small_matrix(12)), ValueError,
     r"with m = 12 \(the size of had_m\), got 100"),
    (lambda: (torch.randn(3, 36), hadamard.small_matrix(12)), ValueError, r"m = 12 .*got 36"),  # 36 = 12 x 3
    (lambda: (torch.randn(2, 0), None), ValueError, r"got 0"),
    (lambda: (torch.randn(3, 48), hadamard.small_matrix(12).double()), TypeError,
     r"expected had_m of dtype Float, got Double"),
    (lambda: (torch.randn(3, 48), torch.ones(3, 4)), ValueError,
     r"expected had_m a square 2-D matrix \[m, m\], got \[3, 4\]"),
    (lambda: (torch.randn(3, 48), torch.ones(12)), ValueError, r"square 2-D matrix \[m, m\], got \[12\]"),
    (lambda: (torch.randn(3, 48), torch.ones(0, 0)), ValueError, r"square 2-D matrix \[m, m\], got \[0, 0\]"),
    (lambda: (torch.randn(3, 48).to(torch.float64), None), TypeError,
     r"expected x of dtype float32, bfloat16 or float16, got Double"),
    (lambda: (torch.ones(3, 8, dtype=torch.int8), None), TypeError, r"expected x of dtype float32"),
    (lambda: (torch.tensor(1.0), None), ValueError, r"expected x with at least 1 dimension"),
]


@pytest.mark.parametrize("k", range(len(BAD)))
def test_errors(k):
    make, exc, pattern = BAD[k]
    x, had = make()
    with pytest.raises(exc, match=r"llmeasyquant\.hadamard_transform: .*" + pattern) as eager:
        ops.hadamard_transform(x, had, 1.0)
    # the fake (meta tensors), the fallback kernel and the reference fail the same way
    meta = (x.to("meta"), None if had is None else had.to("meta"))
    for call in (lambda: ops.hadamard_transform(*meta, 1.0),
                 lambda: _fallback.KERNELS["hadamard_transform"](x, had, 1.0),
                 lambda: R.hadamard_transform(x, had, 1.0)):
        with pytest.raises(exc) as got:
            call()
        assert str(got.value).splitlines()[0] == str(eager.value).splitlines()[0]
    if x.dim():
        with pytest.raises(exc, match=pattern):
            lq.ops.hadamard_transform(x, had, 1.0)


def test_had_m_on_another_device_is_refused_by_the_op():
    x = torch.randn(2, 48, device="meta")
    with pytest.raises(RuntimeError, match="expected had_m on meta"):
        ops.hadamard_transform(x, hadamard.small_matrix(48), 1.0)


# ---- opcheck, fake, fallback ----------------------------------------------------------------------
def _opcheck_samples():
    g = _gen("opcheck")
    return [
        (torch.randn(3, 48, generator=g).to(torch.bfloat16), hadamard.small_matrix(48), 48 ** -0.5),
        (torch.randn(2, 3, 64, generator=g), None, 0.125),
        (noncontig(torch.randn(5, 576, generator=g)).to(torch.float16), hadamard.small_matrix(576), 1.0),
        (torch.randn(1, 12, generator=g), hadamard.small_matrix(12), -0.5),
        (torch.randn(7, 1, generator=g), None, 2.0),
    ]


@pytest.mark.parametrize("k", range(5))
def test_opcheck(k):
    torch.library.opcheck(ops.hadamard_transform.default, _opcheck_samples()[k])


def test_compiles():
    had = hadamard.small_matrix(1536)
    f = torch.compile(lambda t: lq.ops.hadamard_transform(t, had) * 2, fullgraph=True, backend="eager")
    x = _x((3, 1536), torch.bfloat16, "compile")
    assert torch.equal(f(x), lq.ops.hadamard_transform(x, had) * 2)


@pytest.mark.parametrize("dtype", FLOATS)
def test_fallback_kernel_matches_the_cpu_kernel(dtype):
    for n in (1, 12, 64, 576, 2560):
        x, had = _x((5, n), dtype, "fallback"), hadamard.small_matrix(n)
        got = _fallback.KERNELS["hadamard_transform"](x, had, 0.5)
        want = ops.hadamard_transform(x, had, 0.5)
        if had is None:
            assert torch.equal(got, want)
        else:
            assert_close_to_reference(want, got, R.hadamard_transform(x, had, 0.5, torch.float64))


# ---- CUDA (compiled, not yet validated on a GPU: these skip without one) -----------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", NS + [14336, 28672])
@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_cuda_matches_reference(dtype, n, _):
    for lead in LEADS + [(300,)]:
        x = _x((*lead, n), dtype, "cuda")
        had = hadamard.small_matrix(n)
        out = lq.ops.hadamard_transform(x.cuda(), None if had is None else had.cuda())
        assert out.is_cuda and out.dtype == dtype and out.shape == x.shape
        assert_close_to_reference(out.cpu(), hadamard.transform(x, had), _ref64(x, had, 1 / math.sqrt(n)))
        # the same fp32 operations as the CPU kernels (+-1 matrices): at most a rounding step apart
        cpu = ops.hadamard_transform(x, had, 1 / math.sqrt(n)).double()
        assert (out.cpu().double() - cpu).abs().max() <= torch.finfo(dtype).eps * cpu.abs().max()


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_cuda_layouts_and_routes(_):
    had = hadamard.small_matrix(1536).cuda()
    x = _x((6, 5, 1536), torch.bfloat16, "cuda-layout").cuda()
    want = lq.ops.hadamard_transform(x, had)
    for v in (noncontig(x), x.transpose(0, 1), x[::2], x[:, 1:]):
        assert torch.equal(lq.ops.hadamard_transform(v, had), lq.ops.hadamard_transform(v.contiguous(), had))
    assert torch.equal(lq.ops.hadamard_transform(noncontig(x), had), want)
    # an unaligned row start (element offset 1 of a fp32 buffer) takes the scalar loads
    buf = torch.randn(3 * 64 + 1, device="cuda")
    xu = buf[1:].view(3, 64)
    assert torch.equal(lq.ops.hadamard_transform(xu, None), lq.ops.hadamard_transform(xu.clone(), None))
    # rows longer than the kernel takes run in PyTorch through the wrapper; the op itself says so
    n = 2 * _checks.CUDA_HADAMARD_MAX_N
    xl = torch.randn(2, n, device="cuda")
    torch.testing.assert_close(lq.ops.hadamard_transform(xl).cpu(), hadamard.transform(xl.cpu()), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="the CUDA kernel takes rows of at most 32768"):
        ops.hadamard_transform(xl, None, 1.0)
    # had_m given on the CPU is moved by the wrapper
    cpu_had = hadamard.small_matrix(1536)
    assert torch.equal(lq.ops.hadamard_transform(x, cpu_had), want)


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_cuda_graph_capture(_):
    had = hadamard.small_matrix(576).cuda()
    x = torch.randn(1, 576, device="cuda", dtype=torch.bfloat16)
    want = lq.ops.hadamard_transform(x, had)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = lq.ops.hadamard_transform(x, had)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@pytest.mark.skipif(not lq.build_info()["cuda"], reason="this build has no CUDA kernels (no nvcc / CPU torch)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_sass_has_warp_shuffles_and_no_spills(arch):
    from test_cuda_ops import _sass_by_kernel

    sass = _sass_by_kernel(arch)
    kernels = [k for k in sass if "hadamard_kernel" in k]
    assert len(kernels) == 3, sorted(sass)  # fp32, bf16, fp16
    for k in kernels:
        assert "SHFL.BFLY" in sass[k], k
        assert not re.search(r"\b(LDL|STL)\b", sass[k]), f"{k} spills to local memory"
