"""The CUDA kernels' tensor-core fragment layouts, shared-memory swizzle and
ldmatrix addressing (src/cpp/include/llmeq/mma_layout.h), checked on the CPU:
against the PTX ISA fragment tables (written out here independently, register
by register) and against a CPU model of ldmatrix reading the swizzled tiles.
No GPU needed: a wrong lane/element mapping fails here first."""

import itertools

import pytest

from llmeasyquant import _C

L = _C._mma_layout


# ---- the PTX ISA tables (mma.m16n8k32 .s8 and mma.m16n8k16 .f16/.bf16) ------
# "row = groupID for a0..a3 and a8..a11, groupID + 8 for a4..a7 and a12..a15;
#  col = threadID_in_group * 4 + (i & 3), + 16 for a8..a15"
def isa_s8_a(lane, i):
    gid, tig = lane // 4, lane % 4
    row = gid + 8 if i in (4, 5, 6, 7, 12, 13, 14, 15) else gid
    col = tig * 4 + (i % 4) + (16 if i >= 8 else 0)
    return row, col


def isa_s8_b(lane, i):  # (k, n): "row = tig * 4 + (i & 3) (+16 for b4..b7), col = groupID"
    gid, tig = lane // 4, lane % 4
    return tig * 4 + (i % 4) + (16 if i >= 4 else 0), gid


def isa_acc(lane, i):  # "row = groupID (+8 for c2, c3), col = tig * 2 + (i & 1)"
    gid, tig = lane // 4, lane % 4
    return gid + (8 if i >= 2 else 0), tig * 2 + (i % 2)


def isa_h_a(lane, i):  # a0,a1: (g, 2t..), a2,a3: (g+8, ..), a4,a5: (g, 2t+8..), a6,a7: (g+8, 2t+8..)
    gid, tig = lane // 4, lane % 4
    row = gid + 8 if i in (2, 3, 6, 7) else gid
    return row, tig * 2 + (i % 2) + (8 if i >= 4 else 0)


def isa_h_b(lane, i):  # b0,b1: k = 2t, 2t+1; b2,b3: k + 8; n = groupID
    gid, tig = lane // 4, lane % 4
    return tig * 2 + (i % 2) + (8 if i >= 2 else 0), gid


@pytest.mark.parametrize("name,isa,n_elems,shape", [
    ("s8_a", isa_s8_a, 16, (16, 32)),
    ("s8_b", isa_s8_b, 8, (32, 8)),
    ("acc_c", isa_acc, 4, (16, 8)),
    ("h_a", isa_h_a, 8, (16, 16)),
    ("h_b", isa_h_b, 4, (16, 8)),
])
def test_fragment_layout_matches_ptx_isa_and_covers_tile(name, isa, n_elems, shape):
    seen = set()
    for lane, i in itertools.product(range(32), range(n_elems)):
        rc = L(name, lane, i)
        assert rc == isa(lane, i), f"{name} lane {lane} element {i}"
        assert 0 <= rc[0] < shape[0] and 0 <= rc[1] < shape[1]
        seen.add(rc)
    assert len(seen) == shape[0] * shape[1]  # every element owned by exactly one (lane, i)


def _smem_image(tile_rows):
    """A tile of rows x 64 bytes with unique byte values (as row, byte) pairs,
    stored through the kernels' swizzle: smem[swz64(r, chunk) + b] = (r, 16 chunk + b)."""
    smem = {}
    for r in range(tile_rows):
        for ch in range(4):
            base = L("swz64", r, ch)[1]
            for b in range(16):
                smem[base + b] = (r, ch * 16 + b)
    assert len(smem) == tile_rows * 64  # the swizzle is a permutation of the tile
    return smem


def _ldmatrix_x4(smem, addr_of_lane):
    """CPU model of ldmatrix.m8n8.x4.b16: lane 8j + r supplies the address of
    row r of matrix j; lane l receives in register j the 4 bytes at
    4 * (l % 4) of row l // 4 of matrix j."""
    regs = {}
    for lane in range(32):
        for j in range(4):
            a = addr_of_lane(8 * j + lane // 4)
            regs[lane, j] = [smem[a + 4 * (lane % 4) + b] for b in range(4)]
    return regs


@pytest.mark.parametrize("ks", [0, 1])
def test_ldmatrix_s8_a_delivers_the_isa_fragment(ks):
    smem = _smem_image(16)
    regs = _ldmatrix_x4(smem, lambda l: L("swz64", *L("ldsm_s8_a", l, ks))[1])
    for lane, i in itertools.product(range(32), range(16)):
        row, col = isa_s8_a(lane, i)
        assert regs[lane, i // 4][i % 4] == (row, ks * 32 + col), f"lane {lane} a{i}"


@pytest.mark.parametrize("ks", [0, 1])
def test_ldmatrix_s8_b_delivers_two_n8_fragments(ks):
    smem = _smem_image(16)  # 16 weight rows (n), 64 bytes of k
    regs = _ldmatrix_x4(smem, lambda l: L("swz64", *L("ldsm_s8_b", l, ks))[1])
    for lane, nt, i in itertools.product(range(32), range(2), range(8)):
        k, n = isa_s8_b(lane, i)
        j = 2 * nt + i // 4  # register order b[0][0], b[0][1], b[1][0], b[1][1]
        assert regs[lane, j][i % 4] == (8 * nt + n, ks * 32 + k), f"lane {lane} tile {nt} b{i}"


@pytest.mark.parametrize("ks", [0, 1])
def test_ldmatrix_16bit_a_delivers_the_isa_fragment(ks):
    smem = _smem_image(16)  # 16 rows of 32 16-bit values
    regs = _ldmatrix_x4(smem, lambda l: L("swz64", *L("ldsm_h_a", l, ks))[1])
    for lane, i in itertools.product(range(32), range(8)):
        row, col = isa_h_a(lane, i)
        half = regs[lane, i // 2][2 * (i % 2): 2 * (i % 2) + 2]  # low half = lower element
        assert half == [(row, 2 * (ks * 16 + col)), (row, 2 * (ks * 16 + col) + 1)], f"lane {lane} a{i}"


@pytest.mark.parametrize("what", ["ldsm_s8_a", "ldsm_s8_b", "ldsm_h_a"])
@pytest.mark.parametrize("ks", [0, 1])
@pytest.mark.parametrize("row0", [0, 16, 48])
def test_ldmatrix_phases_are_bank_conflict_free(what, ks, row0):
    # each 8-lane phase reads 8 x 16 bytes: they must hit 8 different 16-byte bank groups
    for j in range(4):
        groups = set()
        for r in range(8):
            row, chunk = L(what, 8 * j + r, ks)
            addr = L("swz64", row0 + row, chunk)[1]
            assert addr % 16 == 0
            groups.add((addr // 16) % 8)
        assert len(groups) == 8, f"{what} matrix {j}: bank groups {sorted(groups)}"


def test_unknown_layout_name_is_an_error():
    with pytest.raises(ValueError, match="unknown layout"):
        L("nope", 0, 0)
