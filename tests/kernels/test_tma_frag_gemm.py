"""kernels.tma_frag_gemm (the fragment GEMM with its words and x staged by TMA). No interpreter
runs Gluon, so the CPU checks the two things the kernel adds to kernels.frag_gemm's PTX (whose
model test is tests/kernels/test_frag_gemm.py): the shared-memory views through which each lane
reads back exactly the fragments the fragment kernel's lanes load, against a model of how TMA
lays a box out under the 128-byte swizzle, and that those reads are free of bank conflicts. The
GPU runs the kernel itself against kernels.reference.linear (benchmarks/bench_gemv.py, whose log
is kept). In the interpreter a "tma-frags" config runs the fragment kernel on the same tile."""

import itertools

import pytest
import torch

from qruntime.kernels import tma_frag_gemm
from qruntime.kernels.frag_gemm import try_frag_gemm
from qruntime.kernels.layout import prepare
from qruntime.kernels.qmatmul import STREAM_FALLBACK_SLICE, qmatmul_accumulate
from qruntime.kernels.tma_frag_gemm import lane_word_row, scales_view_bases, tma_grid, words_view_bases, x_view_bases
from packed_linears import assert_accumulates_product, make_linear


def stored_byte(byte: int) -> int:
    """Where TMA's 128-byte swizzle puts a box's byte (box laid out row-major, 1024-byte aligned):
    the 16-byte piece index (bits 4-6) xor the 128-byte row index mod 8 (bits 7-9)."""
    return byte ^ (((byte >> 7) & 7) << 4)


def view_index(bases, offset: int) -> tuple:
    """The logical index a linear shared layout gives a buffer offset: xor of its set bits' bases."""
    index = [0] * len(bases[0])
    for bit, basis in enumerate(bases):
        if offset >> bit & 1:
            index = [a ^ b for a, b in zip(index, basis)]
    return tuple(index)


@pytest.mark.parametrize("bits", [4, 8])
def test_lanes_take_every_word_row_once(bits):
    rows = 128 // (32 // bits)
    taken = sorted(lane_word_row(bits, h, c) for h in range(rows // 4) for c in range(4))
    assert taken == list(range(rows))


@pytest.mark.parametrize("bits,warps,tiles", list(itertools.product((4, 8), (1, 2, 4, 8), (1, 2))))
def test_words_view_reads_each_lanes_fragment(bits, warps, tiles):
    rows = 128 // (32 // bits)
    chunks = rows // 4
    words = warps * tiles * rows * 32
    bases = words_view_bases(bits, warps, tiles)
    assert 1 << len(bases) == words
    held = {}  # buffer slot (int32) -> (sub-box, word row, column) TMA stored there
    for box, row, col in itertools.product(range(warps * tiles), range(rows), range(32)):
        held[stored_byte(((box * rows + row) * 32 + col) * 4) // 4] = (box, row, col)
    slot_of = {}
    for slot in range(words):
        index = view_index(bases, slot)
        slot_of[index] = slot
        tile_chunk, t, i = index
        tile, h = divmod(tile_chunk, chunks)
        warp, lane = divmod(t, 32)
        g, c = divmod(lane, 4)
        assert held[slot] == (warp * tiles + tile, lane_word_row(bits, h, c), 4 * g + i), (slot, index)
    assert len(slot_of) == words  # every (chunk, thread, word) read once
    # one LDS.128 a lane: each phase of 8 lanes must hit 8 different 16-byte bank groups
    for tile_chunk, warp, phase in itertools.product(range(tiles * chunks), range(warps), range(4)):
        groups = {slot_of[(tile_chunk, 32 * warp + 8 * phase + j, 0)] // 4 % 8 for j in range(8)}
        assert len(groups) == 8, (tile_chunk, warp, phase)


@pytest.mark.parametrize("bits", [4, 8])
def test_x_view_reads_each_lanes_fragment(bits):
    unit = 8 if bits == 4 else 4      # bytes a fragment element carries: 4 or 2 columns of x
    chunks = 128 // (32 // bits) // 4
    bases = x_view_bases(bits)
    assert 1 << len(bases) == 4096 // unit
    slot_of = {}
    for slot in range(4096 // unit):
        index = view_index(bases, slot)
        slot_of[index] = slot
        h, zero, lane, e = index
        assert zero == 0
        g, c = divmod(lane, 4)
        # the unit's first column of the block: unit 2 r + e % 2 of the lane's word row r
        column = (2 * lane_word_row(bits, h, c) + e % 2) * unit // 2
        half, byte = divmod(stored_byte(slot * unit), 2048)  # TMA's box [2, 16, 64] fp16, swizzled
        assert (half, byte // 128, byte % 128 // 2) == (column // 64, g + 8 * (e // 2), column % 64), (slot, index)
    assert len(slot_of) == 4096 // unit
    # a lane's two units of one x row are one load (16 bytes for int4, 8 for int8): 8 or 16 lanes a phase
    per_phase = 128 // (2 * unit)
    for h, row_half, phase in itertools.product(range(chunks), range(2), range(32 // per_phase)):
        lanes = range(per_phase * phase, per_phase * (phase + 1))
        first = [slot_of[(h, 0, lane, 2 * row_half)] * unit for lane in lanes]
        assert all(f % (2 * unit) == 0 for f in first)  # the two units are adjacent and aligned
        banks = {(f // 4 + b) % 32 for f in first for b in range(2 * unit // 4)}
        assert len(banks) == 32, (h, row_half, phase)


# (config, case): one tile a warp and two; a partial last K slice, a partial column tile, M < 8
CASES = {
    "two-tiles-m16-n70-k384-g128": ((128, 256, 2, 2, "tma-frags"), (16, 70, 384, 128)),
    "one-tile-m5-n100-k512-per-channel": ((64, 512, 3, 2, "tma-frags"), (5, 100, 512, -1)),
    "stream-two-tiles-m3-n96-k640-g128": ((128, 6, 2, 2, "tma-stream"), (3, 96, 640, 128)),
    "staged-scales-m16-n70-k384-g128": ((64, 256, 3, 2, "tma-frags+scales"), (16, 70, 384, 128)),
    "stream-staged-scales-m7-n96-k512-per-channel": ((128, 4, 2, 4, "tma-stream+scales"), (7, 96, 512, -1)),
    "warp-specialized-two-tiles-m16-n70-k384-g128": ((256, 256, 3, 4, "ws-tma-frags"), (16, 70, 384, 128)),
    "warp-specialized-stream-m3-n96-k512-per-channel": ((128, 4, 2, 4, "ws-tma-stream+scales"), (3, 96, 512, -1)),
}


@pytest.mark.parametrize("config,case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("zero_mode", ["symmetric", "int"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_tma_config_runs_fragment_kernel_without_tma(bits, zero_mode, config, case):
    """Without TMA (here: the interpreter) a "tma-frags" config runs the fragment kernel on the same
    tile and K slice ("tma-stream": K slices of STREAM_FALLBACK_SLICE), and the product is right."""
    ran = []

    def through_dispatch(x, lin, out, cfg):
        frag_cfg = (cfg[0], cfg[1] if tma_grid(cfg[4]) == "tma-frags" else STREAM_FALLBACK_SLICE, 1, cfg[3], "frags")
        ran.append(try_frag_gemm(x, lin, out.clone(), frag_cfg))  # the fragment kernel serves it
        qmatmul_accumulate(x, lin, out, config=cfg)
        return True

    assert_accumulates_product(through_dispatch, config, bits, zero_mode, case)
    assert ran == [True]


@pytest.mark.parametrize("warps,tiles", list(itertools.product((1, 2, 4, 8), (1, 2))))
def test_scales_view_reads_each_lanes_columns(warps, tiles):
    """The staged scales' view [WARPS, TILES, 8, 1, 4] of a stage's box (one group's BLOCK_N
    columns, row-major, unswizzled): warp w, tile u, lane row g, element e reads column
    32 (w TILES + u) + 4 g + e, the column kernels.frag_gemm's lanes (g, c) scale in that tile."""
    bases = scales_view_bases(warps, tiles)
    columns = 32 * warps * tiles
    assert 1 << len(bases) == columns
    read = set()
    for slot in range(columns):
        w, u, g, zero, e = view_index(bases, slot)
        assert zero == 0 and slot == 32 * (w * tiles + u) + 4 * g + e, (slot, (w, u, g, e))
        read.add((w, u, g, e))
    assert len(read) == columns


@pytest.mark.parametrize("zero_mode", ["symmetric", "int"])
@pytest.mark.parametrize("group", [128, -1], ids=["g128", "one-group"])
def test_scales_descriptors(zero_mode, group):
    """The scales' and zero points' TMA boxes: one group's BLOCK_N columns, at least 128 bytes wide
    (a stage's buffer must be 128-byte aligned: 64 uint8 zero points take a box of 128), with a
    16-byte aligned row stride even for one group (a [1, N] tensor's stride(0) may be 1)."""
    lin = prepare(make_linear(96, 256, 4, group, zero_mode), torch.device("cpu"), torch.float16)
    s_desc, z_desc = tma_frag_gemm._scales_descriptors(lin, 64)
    assert list(s_desc.block_shape) == [1, 64] and list(s_desc.shape) == list(lin.scales.shape)
    assert list(s_desc.strides) == [96, 1]
    if zero_mode == "symmetric":
        assert z_desc is None
    else:
        assert list(z_desc.block_shape) == [1, 128] and list(z_desc.strides) == [96, 1]
    assert tma_frag_gemm._scales_descriptors(lin, 64) is lin.tma_descriptors[("scales", 64, lin.scales.data_ptr())]


def test_serves_only_what_the_kernel_handles(monkeypatch):
    """tma_frag_serves' rules (what the kernel has no path for keeps the fragment kernel), with the
    device check stubbed so that they run on the CPU."""
    monkeypatch.setattr(tma_frag_gemm, "INTERPRET", False)
    monkeypatch.setattr(tma_frag_gemm, "_has_tma", lambda index: True)
    cuda = torch.device("cuda", 0)

    def serves(n=96, k=256, bits=4, group=128, zero_mode="int", bias=False, act_order=False, m=16):
        lin = prepare(make_linear(n, k, bits, group, zero_mode, act_order=act_order, bias=bias), torch.device("cpu"),
                      torch.float16)
        return tma_frag_gemm.tma_frag_serves(lin, m, cuda)

    assert serves() and serves(bits=8, zero_mode="symmetric", group=-1, m=1) and serves(group=256)
    assert not serves(bias=True)              # no bias path
    assert not serves(act_order=True)         # no permutation of x
    assert not serves(zero_mode="float")      # GGUF offsets need sum x per group
    assert not serves(group=64)               # a group smaller than a block of 128
    assert not serves(k=320, group=-1)        # K not a multiple of 128 (x's [K / 64, M, 64] view)
    assert not serves(n=80)                   # N not a multiple of 32 (the words' [N / 32, K / EPW, 32] view)
    assert not serves(m=17)
    assert not tma_frag_gemm.tma_frag_serves(prepare(make_linear(96, 256, 4, 128, "int", bias=False), torch.device("cpu"),
                                                     torch.float16), 16, torch.device("cpu"))


@pytest.mark.parametrize("warps,tiles", [(4, 1), (4, 2), (8, 1), (8, 2)])
def test_loader_register_cap_fits_the_register_file(warps, tiles):
    """The warp-specialized kernel's maxnreg: whole groups of 4 warps only; the cap moved from the
    loader's group (all but its 24 registers a thread) leaves the multiplying warps at least what
    their tiles need (104 a thread for one tile, 136 for two); for the stream grid its programs an
    SM (multiplying warps plus the loader's group of 4, at the cap each) also fit the 64K registers
    of an SM at once, else no cap; the split-K grid takes the least cap."""
    need = 104 if tiles == 1 else 136

    def enough(cap):
        return (cap * (warps + 4) - 24 * 4) // warps >= need

    least = min(c for c in range(8, 257, 8) if enough(c))
    assert tma_frag_gemm.loader_register_cap(warps, tiles, None) == least
    assert tma_frag_gemm.loader_register_cap(2, tiles, None) is None
    for per_sm in range(1, 9):
        cap = tma_frag_gemm.loader_register_cap(warps, tiles, per_sm)
        fits = [c for c in range(least, 129, 8) if per_sm * c * 32 * (warps + 4) <= 65536]
        assert cap == (max(fits) if fits else None), (per_sm, cap)
    assert tma_frag_gemm.loader_register_cap(4, 1, 4) == 64 and tma_frag_gemm.loader_register_cap(4, 2, 3) == 80


def test_refuses_malformed_configs(monkeypatch):
    """try_tma_frag_gemm returns False, before any launch, for configs that name another kernel or
    that the kernel has no shape for (the linear itself served: the device check stubbed), so that
    dispatch moves on instead of failing."""
    monkeypatch.setattr(tma_frag_gemm, "INTERPRET", False)
    monkeypatch.setattr(tma_frag_gemm, "_has_tma", lambda index: True)
    lin = prepare(make_linear(96, 256, 4, 128, "int"), torch.device("cpu"), torch.float16)
    x = torch.randn(4, 256).half()
    out = torch.zeros(4, 96)
    for cfg in [(64, 512, 2, 2, "frags"),         # the fragment kernel's
                (256, 512, 2, 2, "tma-frags"),     # four tiles a warp
                (96, 512, 2, 2, "tma-frags"),      # not whole 32-column tiles a warp
                (64, 192, 2, 2, "tma-frags"),      # a K slice of 1.5 blocks
                (64, 512, 0, 2, "tma-frags"),      # no stage
                (64, 0, 2, 2, "tma-stream"),       # no program an SM
                (64, 4, 0, 2, "tma-stream"),
                (64, 512, 2, 2, "tma-frags+zeros"),  # no such way to the scales
                (512, 512, 2, 8, "tma-frags+scales"),  # 512 columns: wider than a TMA box of scales can be
                (64, 512, 2, 2, "ws-tma-frags"),    # warp-specialized: 2 warps, not a group of 4
                (256, 4, 2, 4, "ws-tma-stream"),   # two tiles a warp: 4 programs an SM leave too few registers
                (128, 5, 2, 4, "ws-tma-stream"),   # 5 programs of 8 warps: no register cap fits
                (64, 512, 2, 2, "tma-frags-ws")]:  # no such path
        assert not tma_frag_gemm.try_tma_frag_gemm(x, lin, out, cfg), cfg
    assert torch.count_nonzero(out) == 0
