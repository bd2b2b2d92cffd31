"""The CUDA W4A16 panel layout (llmeasyquant/panel.py, mma_layout.h
w4_panel_*, src/cuda/gemm_w4_panel.cu) checked on the CPU: the slot functions
against the PTX ISA m16n8k16 B-fragment table, pack/unpack both ways, and a
CPU model of the kernel's data flow (each lane's 16-byte load, the shift + LOP3
"magic number" unpacking, the 16-bit subtract and multiply, the fragments fed
to the mma, the 128-byte-row swizzled activation tile read by ldmatrix)
against the op's PyTorch kernel. No GPU needed; the kernel itself is compiled,
not yet validated on a GPU (tests/test_cuda_ops.py runs it where one exists)."""

import itertools

import pytest
import torch

import llmeasyquant as lq
from llmeasyquant import _C, _fallback, panel
from llmeasyquant import quant_format as qf

L = _C._mma_layout
ops = torch.ops.llmeasyquant


def isa_h_b(lane, i):  # m16n8k16 B: b0,b1: k = 2 tig, 2 tig + 1; b2,b3: k + 8; n = groupID
    gid, tig = lane // 4, lane % 4
    return tig * 2 + (i % 2) + (8 if i >= 2 else 0), gid


def isa_h_a(lane, i):
    gid, tig = lane // 4, lane % 4
    row = gid + 8 if i in (2, 3, 6, 7) else gid
    return row, tig * 2 + (i % 2) + (8 if i >= 4 else 0)


def isa_acc(lane, i):
    gid, tig = lane // 4, lane % 4
    return gid + (8 if i >= 2 else 0), tig * 2 + (i % 2)


# ---- the slot functions ---------------------------------------------------------
def test_panel_slots_are_the_isa_b_fragments_of_eight_n8_tiles():
    seen = set()
    for lane, word, p in itertools.product(range(32), range(4), range(4)):
        # nibbles p and p + 4 become the low / high half of one B register:
        # n8 tile 2 word + (p >> 1), register p & 1 (elements 2 (p & 1), +1)
        tile, reg = 2 * word + (p >> 1), p & 1
        for half, nib in enumerate((p, p + 4)):
            k, n = L("w4_panel_elem", lane, word * 8 + nib)
            ik, inn = isa_h_b(lane, 2 * reg + half)
            assert (k, n) == (ik, 8 * tile + inn), (lane, word, nib)
            seen.add((k, n))
    assert len(seen) == 16 * 64  # every value of the k16 x n64 tile exactly once


def test_panel_slot_and_elem_are_inverse():
    for k, n in itertools.product(range(16), range(64)):
        lane, idx = L("w4_panel_slot", k, n)
        assert L("w4_panel_elem", lane, idx) == (k, n)


def test_python_tile_index_matches_the_header():
    for lane, word, nib in itertools.product(range(32), range(4), range(8)):
        assert (int(panel._K_IDX[lane, word, nib]), int(panel._N_IDX[lane, word, nib])) == \
            L("w4_panel_elem", lane, word * 8 + nib)


def test_group_param_order_gives_a_lane_its_eight_columns_contiguously():
    offs = {}
    for which, n in itertools.product(range(2), range(64)):
        offs[which, n] = L("w4_panel_param", which, n)[1]
    assert sorted(offs.values()) == list(range(128))
    for gid in range(8):  # lane group gid owns columns 8 j + gid, j = 0..7
        for which in range(2):
            got = [offs[which, 8 * j + gid] for j in range(8)]
            assert got == list(range(which * 64 + gid * 8, which * 64 + gid * 8 + 8))


@pytest.mark.parametrize("ks", range(4))
@pytest.mark.parametrize("row0", [0, 16, 48])
def test_128_byte_rows_ldmatrix_delivers_the_a_fragment_conflict_free(ks, row0):
    smem = {}
    for r in range(16):
        for ch in range(8):
            base = L("swz128", r, ch)[1]
            for b in range(16):
                smem[base + b] = (r, ch * 16 + b)
    assert len(smem) == 16 * 128
    for lane, i in itertools.product(range(32), range(8)):
        # lane 8 j + r supplies row r of matrix j; lane l gets 4 bytes at 4 (l % 4) of row l // 4
        j = i // 2
        row, chunk = L("ldsm_h_a", 8 * j + lane // 4, ks)
        a = L("swz128", row, chunk)[1] + 4 * (lane % 4) + 2 * (i % 2)
        r, c = isa_h_a(lane, i)
        assert [smem[a], smem[a + 1]] == [(r, 2 * (ks * 16 + c)), (r, 2 * (ks * 16 + c) + 1)]
    for j in range(4):
        groups = {(L("swz128", row0 + L("ldsm_h_a", 8 * j + r, ks)[0], L("ldsm_h_a", 8 * j + r, ks)[1])[1] // 16) % 8
                  for r in range(8)}
        assert len(groups) == 8, f"matrix {j}: bank groups {sorted(groups)}"


# ---- pack / unpack -------------------------------------------------------------------
def _layer(N, K, g, zero=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=gen)
    G = 1 if g in (-1, K) else K // g
    s = torch.rand(N, G, generator=gen) * 0.05 + 0.001
    z = torch.randint(-8, 8, (N, G), dtype=torch.int8, generator=gen) if zero else None
    return q, qf.pack_int4(q), s, z


@pytest.mark.parametrize("N,K,g", [(64, 64, 64), (100, 192, 64), (7, 80, -1), (130, 256, 128), (1, 16, -1)])
@pytest.mark.parametrize("zero", [True, False])
def test_pack_unpack_round_trip_and_slots(N, K, g, zero):
    q, qw, s, z = _layer(N, K, g, zero)
    p = panel.pack(qw, s, z, g, K)
    assert p is not None
    P, K16 = -(-N // 64), -(-K // 64) * 4
    assert p.qpanel.shape == (P, K16, 32, 4) and p.qpanel.dtype == torch.int32
    assert p.gparams.shape == (P, s.shape[1], 2, 8, 8)
    assert torch.equal(panel.unpack(p.qpanel, N, K), q)
    flat = p.qpanel.view(-1).to(torch.int64) & 0xFFFFFFFF
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):  # where the header says each value is
        k, n = int(torch.randint(0, K, (1,), generator=gen)), int(torch.randint(0, N, (1,), generator=gen))
        lane, idx = L("w4_panel_slot", k % 16, n % 64)
        word = (((n // 64) * K16 + k // 16) * 32 + lane) * 4 + idx // 8
        assert (int(flat[word]) >> (4 * (idx % 8))) & 0xF == int(q[n, k]) + 8
    sc, zz = panel.group_params(p.gparams, N)
    assert torch.equal(sc, s) and torch.equal(zz, (z.float() if zero else torch.zeros_like(s)) + 8)


def test_padding_is_inert():
    q, qw, s, z = _layer(70, 80, -1)
    p = panel.pack(qw, s, z, -1, 80)
    full = panel.unpack(p.qpanel, 128, 128)
    assert torch.equal(full[:70, :80], q)
    assert (full[70:] == 0).all() and (full[:, 80:] == 0).all()
    sc, zz = panel.group_params(p.gparams, 128)
    assert (sc[70:] == 0).all() and (zz[70:] == 8).all()


@pytest.mark.parametrize("K,g", [(64, 32), (80, 16), (72, -1), (200, 8)])
def test_pack_refuses_what_the_kernel_cannot_take(K, g):
    N = 8
    q = torch.zeros(N, K, dtype=torch.int8)
    G = 1 if g == -1 else K // g
    assert panel.pack(qf.pack_int4(q), torch.ones(N, G), None, g, K) is None


def test_pack_refuses_zero_points_bf16_cannot_unpack_exactly():
    q, qw, s, z = _layer(8, 64, -1)
    assert panel.pack(qw, s, z.clamp(max=120), -1, 64) is not None
    z[3, 0] = 121
    assert panel.pack(qw, s, z, -1, 64) is None


def test_pack_runs_on_the_tensors_device_and_keeps_it():
    q, qw, s, z = _layer(64, 128, 64)
    p = panel.pack(qw, s, z, 64, 128)
    assert p.qpanel.device == qw.device and p.gparams.device == qw.device


# ---- a CPU model of the kernel's data flow -----------------------------------------------
def _bits_to(dtype, bits16):
    return bits16.to(torch.int16).view(dtype)


def _kernel_model(x, p, N, K, g, dtype):
    """What gemm_w4_panel.cu computes, lane by lane: per k16 tile, each lane's
    four words -> (w >> 4 pair) & 0x000f000f | MAGIC -> (h - (MAGIC + 8 + z)) *
    s in 16 bits -> B registers, placed by the ISA table; A by the ISA table;
    the mma products accumulated in float32 per k16 step."""
    magic_bits, magic = (0x4300, 128.0) if dtype == torch.bfloat16 else (0x6400, 1024.0)
    P, K16 = p.qpanel.shape[:2]
    M = x.shape[0]
    out = torch.zeros(M, P * 64, dtype=torch.float32)
    w_all = torch.empty(K16 * 16, P * 64, dtype=dtype)
    words = p.qpanel.to(torch.int64) & 0xFFFFFFFF
    xp = torch.nn.functional.pad(x, (0, K16 * 16 - K))
    for pi, t in itertools.product(range(P), range(K16)):
        gi = min(t * 16, K - 1) // (K if g == -1 else g)
        prm = p.gparams[pi, gi]
        W = torch.empty(16, 64, dtype=dtype)  # the B fragments of this tile, gathered back
        for lane in range(32):
            col = lane >> 2
            for wd, pr in itertools.product(range(4), range(4)):
                j = 2 * wd + (pr >> 1)
                h = ((int(words[pi, t, lane, wd]) >> (4 * pr)) & 0x000F000F) | (magic_bits * 0x10001)
                halves = _bits_to(dtype, torch.tensor([h & 0xFFFF, h >> 16]))
                zz = torch.tensor(magic + float(prm[1, col, j])).to(dtype)
                sc = torch.tensor(float(prm[0, col, j])).to(dtype)
                vals = (halves - zz) * sc  # 16-bit ops: exact subtract, one rounding
                for half in range(2):
                    k, n = isa_h_b(lane, 2 * (pr & 1) + half)
                    W[k, 8 * j + n] = vals[half]
        w_all[t * 16:(t + 1) * 16, pi * 64:(pi + 1) * 64] = W
        for m0 in range(0, M, 16):  # m16 tiles; A and C by the ISA tables
            A = torch.zeros(16, 16, dtype=dtype)
            for lane, i in itertools.product(range(32), range(8)):
                r, c = isa_h_a(lane, i)
                if m0 + r < M:
                    A[r, c] = xp[m0 + r, t * 16 + c]
            prod = A.float() @ W.float()
            for lane, e in itertools.product(range(32), range(4)):
                r, c = isa_acc(lane, e)
                for j in range(8):
                    if m0 + r < M:
                        out[m0 + r, pi * 64 + 8 * j + c] += prod[r, 8 * j + c]
    return out[:, :N], w_all[:K, :N].T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,g,M", [(72, 128, 64, 3), (64, 80, -1, 17)])
def test_cpu_model_of_the_kernel_matches_the_ops_pytorch_kernel(dtype, N, K, g, M):
    q, qw, s, z = _layer(N, K, g, seed=5)
    p = panel.pack(qw, s, z, g, K)
    x = (torch.randn(M, K, generator=torch.Generator().manual_seed(6))).to(dtype)
    # the weights the kernel forms are bit-identical to panel.dequantize
    model, w_model = _kernel_model(x, p, N, K, g, dtype)
    w = panel.dequantize(p.qpanel, p.gparams, N, K, dtype)
    assert torch.equal(w_model.view(torch.int16), w.view(torch.int16))
    want = lq.ops.weight_only_linear_panel(x, p.qpanel, p.gparams, N, g)
    assert want.dtype == dtype and want.shape == (M, N)
    torch.testing.assert_close(model.to(dtype), want, rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(want.float(), (x.float() @ w.float().T).to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_panel_op_is_within_one_weight_rounding_of_weight_only_linear(dtype):
    N, K, g = 96, 256, 64
    q, qw, s, z = _layer(N, K, g, seed=7)
    p = panel.pack(qw, s, z, g, K)
    x = torch.randn(9, K, generator=torch.Generator().manual_seed(8)).to(dtype)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(9))
    got = lq.ops.weight_only_linear_panel(x, p.qpanel, p.gparams, N, g, bias).float()
    ref = lq.ops.weight_only_linear(x, qw, s, z, 4, g, bias).float()
    # one extra rounding of each weight (relative 2^-8 in bf16, 2^-11 in fp16) plus the output's
    wq = qf.unpack_int4(qw, K).float() - z.float().repeat_interleave(g, 1)
    bound = (x.float().abs() @ (wq.abs() * s.repeat_interleave(g, 1)).T) * (2 ** -7 if dtype == torch.bfloat16
                                                                          else 2 ** -10)
    assert ((got - ref).abs() <= bound + ref.abs() * 2 ** -7 + 1e-6).all()


def test_panel_op_opcheck_and_errors():
    q, qw, s, z = _layer(70, 128, 64)
    p = panel.pack(qw, s, z, 64, 128)
    x = torch.randn(2, 3, 128).bfloat16()
    torch.library.opcheck(ops.weight_only_linear_panel.default, (x, p.qpanel, p.gparams, 70, 64, None))
    torch.library.opcheck(ops.weight_only_linear_panel.default,
                          (x[:, :, :128].half(), p.qpanel, p.gparams, 70, 64, torch.randn(70)))
    out = lq.ops.weight_only_linear_panel(x, p.qpanel, p.gparams, 70, 64)
    assert out.shape == (2, 3, 70)
    assert torch.equal(out, lq.ops.weight_only_linear_panel(x.reshape(6, 128), p.qpanel, p.gparams, 70, 64)
                       .reshape(2, 3, 70))
    with pytest.raises(ValueError, match="expected x bfloat16 or float16"):
        lq.ops.weight_only_linear_panel(x.float(), p.qpanel, p.gparams, 70, 64)
    with pytest.raises(ValueError, match=r"expected qpanel of shape \[2, 8, 32, 4\]"):
        lq.ops.weight_only_linear_panel(x, p.qpanel[:, :4], p.gparams, 70, 64)
    with pytest.raises(ValueError, match="expected gparams of shape"):
        lq.ops.weight_only_linear_panel(x, p.qpanel, p.gparams, 70, -1)
    with pytest.raises(ValueError, match="a multiple of 64 dividing K"):
        lq.ops.weight_only_linear_panel(x, p.qpanel, p.gparams, 70, 32)
    with pytest.raises(ValueError, match="positive multiple of 16"):
        lq.ops.weight_only_linear_panel(x[..., :72], p.qpanel, p.gparams, 70, -1)
    assert "weight_only_linear_panel" in _fallback.KERNELS
