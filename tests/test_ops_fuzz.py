"""Seeded fuzz test: every op against the pure-PyTorch reference on random
shapes and arguments (odd M/N/K, K = 1, group sizes that divide K, 2/3/4/8
bits, symmetric / asymmetric, with / without zero-points and bias, fp32 /
fp16 / bf16, non-contiguous inputs), once per CPU instruction-set path.

Exact (torch.equal) where the op is exact (quantize family, EMA, integer and
scaled GEMMs, the fused dynamic linear: the same IEEE ops in the same order);
``assert_close_to_reference`` for the weight-only linear's float products and
the Hadamard transform.
Plus ``torch.library.opcheck`` on a few random cases per op. Every case is
derived from the seed and the case index, so a failure names a reproducible
case. Bounded: small shapes, ~10 s per ISA path on 2 busy cores."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from conftest import R, assert_close_to_reference, lq, noncontig, rand_int8
from llmeasyquant import hadamard, panel
from llmeasyquant.cpu_pack import pack_int8_panels, pack_w4a8

SEED = 20261201
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
KS = [1, 2, 3, 5, 7, 8, 12, 16, 24, 31, 33, 48, 64, 100, 129]
CASES = 100  # per op and ISA path
ops = torch.ops.llmeasyquant


def _rng(*key) -> tuple[random.Random, torch.Generator]:
    seed = zlib.crc32(repr((SEED, *key)).encode())
    return random.Random(seed), torch.Generator().manual_seed(seed)


def _groups(K: int) -> list[int]:
    return [0, -1] + [g for g in range(1, K + 1) if K % g == 0]


def _values(shape, dtype, rng: random.Random, gen: torch.Generator) -> torch.Tensor:
    """Activation-like values: random per-channel magnitudes, an outlier,
    sometimes an all-zero row or a constant row."""
    x = torch.randn(shape, generator=gen) * (torch.rand(shape[-1], generator=gen) * 4 + 0.01)
    x = x * 10.0 ** rng.uniform(-3, 3)
    if rng.random() < 0.3:
        x[..., rng.randrange(shape[-1])] += 20.0 * rng.choice([1, -1])
    if rng.random() < 0.2 and x.dim() > 1:
        x[0] = 0.0
    if rng.random() < 0.1 and x.dim() > 1:
        x[-1] = rng.uniform(-2, 2)
    return x.to(dtype)


def _shape(rng: random.Random, K: int) -> tuple[int, ...]:
    lead = [rng.choice([1, 2, 3, 5, 9, 17]) for _ in range(rng.choice([0, 1, 1, 2]))]
    return (*lead, K)


def _maybe_noncontig(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    # (a last dim of 1 has no stride to speak of: such a view stays contiguous)
    return noncontig(x) if rng.random() < 0.3 and x.shape[-1] > 1 else x


def _eq(out, ref, what):
    assert out.dtype == ref.dtype and out.shape == ref.shape, f"{what}: {out.dtype}{tuple(out.shape)} vs " \
                                                              f"{ref.dtype}{tuple(ref.shape)}"
    if out.is_floating_point():  # exact, NaN where the reference has NaN
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(out, ref), f"{what}: max diff {(out.double() - ref.double()).abs().max()}"


# ---------------------------------------------------------------- quantize family
def _quantize_case(i):
    rng, gen = _rng("quantize", i)
    K = rng.choice(KS)
    dtype, bits, sym = rng.choice(FLOATS), rng.choice([2, 3, 4, 8]), rng.random() < 0.5
    g = rng.choice(_groups(K))
    return _values(_shape(rng, K), dtype, rng, gen), bits, sym, g, rng


@pytest.mark.parametrize("i", range(CASES))
def test_quantize_family(cpu_isa, one_thread, i):
    x, bits, sym, g, rng = _quantize_case(i)
    what = f"case {i}: x {x.dtype}{tuple(x.shape)} bits={bits} sym={sym} group_size={g}"
    xin = _maybe_noncontig(x, rng)
    q, s, z = lq.ops.quantize(xin, bits, sym, g)
    rq, rs, rz = R.quantize(x, bits, sym, g)
    _eq(s, rs, what + " scale")
    _eq(z, rz, what + " zero_point")
    _eq(q, rq, what + " q")
    K = x.shape[-1]
    dt = rng.choice(FLOATS)
    _eq(lq.ops.dequantize(q, s, z, bits, g, K, dt), R.dequantize(rq, rs, rz, bits, g, K, dt), what + " dequantize")
    # static quantization with perturbed (valid) scales and zero-points
    s2 = (s * rng.uniform(0.5, 2.0)).clamp(min=1e-30)
    lo, hi = R.qrange(bits)
    z2 = (z.to(torch.int32) + rng.choice([-1, 0, 1])).clamp(lo, hi).to(torch.int8)
    _eq(lq.ops.quantize_static(xin, s2, z2, bits, g), R.quantize_static(x, s2, z2, bits, g), what + " static")


@pytest.mark.parametrize("i", range(CASES // 4))
def test_channel_stats(cpu_isa, one_thread, i):
    rng, gen = _rng("stats", i)
    K = rng.choice(KS)
    stats, ref = lq.ops.new_channel_stats(K), lq.ops.new_channel_stats(K)
    for step in range(3):
        x = _values(_shape(rng, K), rng.choice(FLOATS), rng, gen)
        lq.ops.channel_stats_(_maybe_noncontig(x, rng), *stats)
        R.channel_stats_(x, *ref)
        for a, b, name in zip(stats, ref, ("absmax", "min", "max")):
            _eq(a, b, f"case {i} step {step} {name}")


@pytest.mark.parametrize("i", range(CASES // 2))
def test_ema_quantize(cpu_isa, one_thread, i):
    rng, gen = _rng("ema", i)
    K = rng.choice(KS)
    alpha, eps = rng.choice([0.0, 0.5, 0.9, 0.99]), rng.choice([1e-5, 1e-2])
    bits, sym = rng.choice([2, 3, 4, 8]), rng.random() < 0.5
    state, ref = lq.ops.new_ema_state(), lq.ops.new_ema_state()
    for step in range(4):
        x = _values(_shape(rng, K), rng.choice(FLOATS), rng, gen)
        if rng.random() < 0.15:  # a poisoned batch: must be skipped identically
            x.view(-1)[rng.randrange(x.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        update = rng.random() < 0.85
        what = f"case {i} step {step}: bits={bits} sym={sym} alpha={alpha} update={update}"
        q, s, z = lq.ops.ema_quantize_(_maybe_noncontig(x, rng), state, alpha, eps, bits, sym, update)
        rq, rs, rz = R.ema_quantize_(x, ref, alpha, eps, bits, sym, update)
        _eq(state, ref, what + " state")
        _eq(s, rs, what + " scale")
        _eq(z, rz, what + " zero_point")
        _eq(q, rq, what + " q")


# ---------------------------------------------------------------- GEMMs
def _mnk(rng):
    return rng.choice([1, 2, 3, 5, 17, 33]), rng.choice([1, 3, 5, 8, 31]), rng.choice(KS)


@pytest.mark.parametrize("i", range(CASES // 2))
def test_int8_gemm(cpu_isa, one_thread, i):
    rng, gen = _rng("int8_gemm", i)
    M, N, K = _mnk(rng)
    a, b = rand_int8(M, K, gen=gen), rand_int8(N, K, gen=gen)
    _eq(lq.ops.int8_gemm(_maybe_noncontig(a, rng), _maybe_noncontig(b, rng)), R.int8_gemm(a, b), f"case {i}")


@pytest.mark.parametrize("i", range(CASES))
def test_scaled_int8_gemm(cpu_isa, one_thread, i):
    rng, gen = _rng("scaled_int8_gemm", i)
    M, N, K = _mnk(rng)
    a, b = rand_int8(M, K, gen=gen), rand_int8(N, K, lo=rng.choice([-128, -127]), gen=gen)
    per_tensor = rng.random() < 0.3
    a_s = torch.rand(1 if per_tensor else M, generator=gen) + 0.01
    b_s = torch.rand(N, generator=gen) / 10 + 1e-4
    zero = None if rng.random() < 0.4 else rand_int8(1 if rng.random() < 0.3 else M, gen=gen)
    b_sum = lq.ops.weight_row_sums(b) if rng.random() < 0.5 else None
    out_dtype = rng.choice(FLOATS)
    bias = None if rng.random() < 0.4 else torch.randn(N, generator=gen).to(rng.choice(FLOATS))
    what = f"case {i}: M={M} N={N} K={K} zero={zero is not None} b_sum={b_sum is not None} {out_dtype}"
    out = lq.ops.scaled_int8_gemm(_maybe_noncontig(a, rng), a_s, b, b_s, a_zero=zero, b_sum=b_sum, bias=bias,
                                  out_dtype=out_dtype)
    _eq(out, R.scaled_int8_gemm(a, a_s, zero, b, b_s, b_sum, bias, out_dtype), what)


@pytest.mark.parametrize("i", range(CASES))
def test_dynamic_quant_linear(cpu_isa, one_thread, i):
    rng, gen = _rng("dynamic_quant_linear", i)
    _, N, K = _mnk(rng)
    dtype, sym = rng.choice(FLOATS), rng.random() < 0.5
    x = _values(_shape(rng, K), dtype, rng, gen)
    w = rand_int8(N, K, lo=-127, gen=gen)
    w_s = torch.rand(N, generator=gen) / 100 + 1e-5
    bias = None if rng.random() < 0.4 else torch.randn(N, generator=gen).to(rng.choice(FLOATS))
    w_sum = lq.ops.weight_row_sums(w)
    what = f"case {i}: x {dtype}{tuple(x.shape)} N={N} sym={sym} bias={bias is not None}"
    out = lq.ops.dynamic_quant_linear(_maybe_noncontig(x, rng), w, w_s, w_sum, bias, sym)
    ref = R.dynamic_quant_linear(x, w, w_s, w_sum, bias, sym)
    _eq(out, ref, what)
    # the same product from the pre-packed panel layout (QLinear's CPU copy), every tier
    packed = lq.ops.dynamic_quant_linear_packed(_maybe_noncontig(x, rng), pack_int8_panels(w), w_s, w_sum, K, N, bias,
                                                sym)
    _eq(packed, ref, what + " (pre-packed)")


@pytest.mark.parametrize("i", range(CASES))
def test_weight_only_linear(cpu_isa, one_thread, i):
    rng, gen = _rng("weight_only_linear", i)
    _, N, K = _mnk(rng)
    bits, sym = rng.choice([2, 3, 4, 8]), rng.random() < 0.5
    g = rng.choice([-1] + [d for d in range(1, K + 1) if K % d == 0])
    qw, s, z = lq.ops.quantize(torch.randn(N, K, generator=gen), bits, sym, g)
    zp = None if sym and rng.random() < 0.7 else z
    dtype = rng.choice(FLOATS)
    x = _values(_shape(rng, K), dtype, rng, gen)
    bias = None if rng.random() < 0.4 else torch.randn(N, generator=gen).to(rng.choice(FLOATS))
    out = lq.ops.weight_only_linear(_maybe_noncontig(x, rng), qw, s, zp, bits, g, bias)
    ref = R.weight_only_linear(x, qw, s, zp, bits, g, bias)
    wd = R.dequantize(qw, s, z if zp is not None else torch.zeros_like(z), bits, g, K, torch.float64)
    ref64 = x.double() @ wd.T + (bias.double() if bias is not None else 0.0)
    if dtype != torch.float32:  # the reference rounds its fp32 result to x.dtype once, so does the kernel
        ref64 = ref64.to(dtype).double()
    assert_close_to_reference(out, ref, ref64)


W4A8_KS = [*KS, 32, 96, 128, 256, 320, 640]


def _w4a8_case(rng, gen):
    _, N, _ = _mnk(rng)
    K = rng.choice(W4A8_KS)
    divisors = [d for d in range(1, K + 1) if K % d == 0]
    # groups on the AVX2 tier's 32-value grid more often than the others (scalar path)
    g = rng.choice([-1, *[d for d in divisors if d % 32 == 0] * 3, *divisors])
    sym = rng.random() < 0.5
    qw, s, z = lq.ops.quantize(torch.randn(N, K, generator=gen), 4, sym, g)
    zp = None if sym and rng.random() < 0.7 else z
    x = _values(_shape(rng, K), rng.choice(FLOATS), rng, gen)
    bias = None if rng.random() < 0.4 else torch.randn(N, generator=gen).to(rng.choice(FLOATS))
    return x, qw, s, zp, g, bias


@pytest.mark.parametrize("i", range(CASES))
def test_w4a8_linear(cpu_isa, one_thread, i):
    rng, gen = _rng("w4a8_linear", i)
    x, qw, s, zp, g, bias = _w4a8_case(rng, gen)
    what = f"case {i}: x {x.dtype}{tuple(x.shape)} N={qw.shape[0]} g={g} zp={zp is not None} bias={bias is not None}"
    out = lq.ops.w4a8_linear(_maybe_noncontig(x, rng), qw, s, zp, g, bias)
    ref = R.w4a8_linear(x, qw, s, zp, g, bias)
    _eq(out, ref, what)  # integer groups, same fp32 steps: bit for bit
    wp, gp = pack_w4a8(qw, s, zp, x.shape[-1])  # the pre-packed layout (QLinear's CPU copy), every tier
    packed = lq.ops.w4a8_linear_packed(_maybe_noncontig(x, rng), wp, gp, x.shape[-1], qw.shape[0], g, bias)
    _eq(packed, ref, what + " (pre-packed)")


# ---------------------------------------------------------------- Hadamard transform
HADAMARD_NS = [1, 2, 4, 8, 12, 20, 24, 40, 48, 64, 96, 128, 160, 192]


@pytest.mark.parametrize("i", range(CASES // 2))
def test_hadamard_transform(cpu_isa, one_thread, i):
    rng, gen = _rng("hadamard_transform", i)
    n, dtype = rng.choice(HADAMARD_NS), rng.choice(FLOATS)
    x = _values(_shape(rng, n), dtype, rng, gen)
    had = hadamard.small_matrix(n)  # None for a power of two
    scale = rng.choice([None, 1.0, 0.5, -3.0])
    out = lq.ops.hadamard_transform(_maybe_noncontig(x, rng), had, scale)
    s = n ** -0.5 if scale is None else scale
    assert_close_to_reference(out, hadamard.transform(x, had, s), R.hadamard_transform(x, had, s, torch.float64))


# ---------------------------------------------------------------- opcheck
def _opcheck_samples():
    """Two random argument sets per op (the fuzz generators above, small)."""
    out = []
    for i in range(2):
        x, bits, sym, g, rng = _quantize_case(100 + i)
        out.append((ops.quantize.default, (x, bits, sym, g)))
        q, s, z = R.quantize(x, bits, sym, g)
        out.append((ops.quantize_static.default, (x, s, z, bits, g)))
        out.append((ops.dequantize.default, (q, s, z, bits, g, x.shape[-1], rng.choice(FLOATS))))
        rng, gen = _rng("opcheck", i)
        K = rng.choice(KS)
        xs = _values((3, K), rng.choice(FLOATS), rng, gen)
        out.append((ops.channel_stats_.default, (xs, *lq.ops.new_channel_stats(K))))
        out.append((ops.ema_quantize_.default, (xs, lq.ops.new_ema_state(), 0.9, 1e-5, rng.choice([4, 8]),
                                                rng.random() < 0.5, True)))
        M, N, _ = _mnk(rng)
        a, b = rand_int8(M, K, gen=gen), rand_int8(N, K, lo=-127, gen=gen)
        out.append((ops.int8_gemm.default, (a, b)))
        out.append((ops.scaled_int8_gemm.default, (a, torch.rand(M, generator=gen), rand_int8(M, gen=gen), b,
                                                   torch.rand(N, generator=gen), lq.ops.weight_row_sums(b),
                                                   torch.randn(N, generator=gen), rng.choice(FLOATS))))
        out.append((ops.dynamic_quant_linear.default, (xs, b, torch.rand(N, generator=gen) / 50,
                                                       lq.ops.weight_row_sums(b), None, rng.random() < 0.5)))
        out.append((ops.dynamic_quant_linear_packed.default,
                    (xs, pack_int8_panels(b), torch.rand(N, generator=gen) / 50, lq.ops.weight_row_sums(b), K, N,
                     torch.randn(N, generator=gen), rng.random() < 0.5)))
        wb = rng.choice([2, 3, 4, 8])
        qw, ws, wz = R.quantize(torch.randn(N, K, generator=gen), wb, False, -1)
        out.append((ops.weight_only_linear.default, (xs, qw, ws, wz, wb, -1, torch.randn(N, generator=gen))))
        n = rng.choice([4, 12, 40, 64])
        had = hadamard.small_matrix(n)
        out.append((ops.hadamard_transform.default, (_values((3, n), rng.choice(FLOATS), rng, gen), had, n ** -0.5)))
        out.append((ops.w4a8_linear.default, _w4a8_case(rng, gen)))
        x4, qw4, s4, z4, g4, b4 = _w4a8_case(rng, gen)
        K4 = x4.shape[-1]
        out.append((ops.w4a8_linear_packed.default, (x4, *pack_w4a8(qw4, s4, z4, K4), K4, qw4.shape[0], g4, b4)))
        pk, pg = rng.choice([(64, 64), (192, 64), (256, 128), (48, -1), (80, -1)])
        pn = rng.randint(1, 130)
        qw, ws, wz = R.quantize(torch.randn(pn, pk, generator=gen), 4, rng.random() < 0.5, pg)
        p = panel.pack(qw, ws, wz, pg, pk)
        px = _values((rng.randint(1, 20), pk), rng.choice([torch.bfloat16, torch.float16]), rng, gen)
        out.append((ops.weight_only_linear_panel.default, (px, p.qpanel, p.gparams, pn, pg,
                                                           torch.randn(pn, generator=gen))))
        # the decode glue: random sizes, dtypes, GQA groups, positions
        dt, n = rng.choice(FLOATS), rng.randint(1, 70)
        xg = _values((rng.randint(1, 5), n), dt, rng, gen)
        out.append((ops.add_rms_norm.default, (xg, _values(xg.shape, dt, rng, gen) if rng.random() < 0.5 else None,
                                               _values((n,), dt, rng, gen), 1e-5)))
        gu = _values((rng.randint(1, 5), 2 * n), dt, rng, gen)
        out.append((ops.silu_mul.default, (gu[:, :n], gu[:, n:])))
        B, Hkv, D, S = rng.randint(1, 3), rng.randint(1, 3), 2 * rng.randint(1, 9), rng.randint(1, 20)
        H = Hkv * rng.randint(1, 3)
        qkv = _values((B, (H + 2 * Hkv) * D), dt, rng, gen)
        q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), -1)
        kc, vc = (_values((B, Hkv, S, D), dt, rng, gen) for _ in range(2))
        out.append((ops.decode_attention_.default, (q, k, v, kc, vc, torch.randn(D, generator=gen),
                                                    torch.randn(D, generator=gen), rng.randrange(S), D ** -0.5)))
    return out


_SAMPLES = _opcheck_samples()


def test_opcheck_samples_cover_every_op():
    defined = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("llmeasyquant::")}
    assert {op._schema.name.split("::")[1] for op, _ in _SAMPLES} == defined


@pytest.mark.parametrize("k", range(len(_SAMPLES)))
def test_opcheck_random(one_thread, k):
    op, args = _SAMPLES[k]
    torch.library.opcheck(op, args)
