"""The few-row decode GEMM (M = 2..16) of kernels.frag_gemm with its operands staged by TMA through
a ring of shared-memory buffers (Gluon, Hopper and newer).

    out^T [N, M] += W [N, K] @ x^T [K, M]      (mma.sync m16n8k16, kernels.frag_gemm.frag_asm)

Why: the fragment kernel loads each lane's words and x fragments into registers, and the
registers a block's loads need cap each warp at one or two blocks in flight; its M = 16 GEMVs sat
at 44-74% of an H200's read bandwidth. Here the copy engine (TMA) moves a program's blocks of
words and x into shared memory, STAGES blocks ahead of the MMAs and without a register: one
thread issues two bulk copies per block, and the warps read each block back with one 16-byte
LDS per chunk of 4 word rows (words) and two per chunk (x), in exactly the lanes the fragment
kernel's global loads used, then run the same PTX; a stage is refilled once its block's MMAs are
done. H200, M = 16, g128, the issue's shapes 4096 x 4096 / 4096 x 14336 / 14336 x 4096 /
4096 x 128256, each kernel's best tile in the same process (benchmarks/results/h200/
gemv_sweep_m16_tma.log): int8 56.1/74.5/75.7/90.6% -> 60.8/84.5/86.1/98.1% of the read bandwidth,
int4 44.1/53.0/54.5/67.6% -> 43.2/58.1/59.3/71.8% (4096 x 4096 kept the fragment kernel).
Refilling a stage as soon as every warp had read it, before the MMAs, held every fragment in a
register across the barrier: int4 at two tiles a warp took 168 registers instead of 144 (int8 at
four warps 127 instead of 79). Refilling after the MMAs (refill_ab.log, every tile both ways in one
process) took int4 to 42.6/59.3/60.6/80.2% and left int8 within a point (62.4/80.2/81.6/94.6%,
4096 x 4096 +5); the sweep with it, gemv_sweep_m16_late.log: int8 65.0/82.3/81.7/97.0%, int4
44.1/60.6/62.8/81.8%.

Layouts (why the views below are conflict-free and need no shuffle):
- words: the int32 words [K / EPW, N] are described to TMA as [N / 32, K / EPW, 32] (strides 32,
  N, 1), so one box [WARPS * TILES, R, 32] (R = 128 / EPW word rows, one block of 128 columns of
  K) lands as WARPS * TILES sub-boxes of [R, 32], each 32 columns wide: one 128-byte row per word
  row, 128-byte swizzled (16-byte piece j of row r stored at piece j ^ (r % 8)).
- Lane (g, c) of warp w reads, for chunk h of tile u, the 4 words of word row lane_word_row(h, c)
  at the sub-box's columns 4 g .. 4 g + 3. (The fragment kernel's lanes c take word rows chunk +
  c; any assignment of word rows to lanes c works as long as x's fragments follow it, and the one
  chosen makes every LDS free of bank conflicts under the swizzle.) `words_view_bases` writes
  this as a linear map from a buffer offset to (tile-chunk, thread, word), the
  SharedLinearLayout Gluon loads through.
- x: x [M, K] fp16 is described as [K / 64, M, 64] (strides 64, K, 1), one box [2, 16, 64] per
  block (rows past M read as zeros, so M < 16 needs no mask), 128-byte swizzled the same way; lane
  (g, c) reads x rows g and g + 8 at the 8 (int4) or 4 (int8) columns of its word row
  (`x_view_bases`), the same for every warp (the load broadcasts over warps).
  Both views are computed from the swizzle and the lane map (`_linear_bases`), not written out.

Work is cut into units, (column tile, block of 128 columns of K), numbered along K tile after
tile, and a program walks a run of consecutive units. "tma-frags" configs: a split-K grid, column
tile x K slice, as in the fragment kernel (blocks past K, in a partial last slice, read zeros from
TMA and the last group's scales, and add nothing). "tma-stream": the config's number of programs
an SM times the SMs, each an equal run, which may cross from one tile into the next (its sums go
out at the crossing); when that many fit an SM at once there is no partial second wave and no
ring filled twice on an SM. Against the best split-K tile in the same process it won 6 of the 11
int4 M = 16 shapes by 0.4-3.6 points of the read bandwidth and one int8 shape by 0.3
(gemv_sweep_m16_stream.log: int4 4096 x 14336 60.9 -> 62.1%, 4096 x 128256 80.1 -> 82.4%,
2048 x 3072 20.8 -> 24.4%), and lost the other int8 shapes by 0.9-6.4 points (their split-K
grids already fill the card with short rings). The outputs go to memory by fp32 atomics, once per
tile a run touches.

Scales and zero points: loaded by every lane a block ahead (LDG into registers), or, in the paths
with the suffix "+scales", staged by TMA with the words (one group's BLOCK_N scales, and zero
points, a box beside each stage's words; read back with one broadcast LDS a tile, the 4 lanes c of
a row g reading the same 4 columns). Nsight Compute had the int4 kernel's warps waiting on the
scale loads for 35% of their stall cycles (ncu_tma_4096_14336_4_16.txt), and an L2 prefetch of
them 2-4 blocks ahead changed nothing (ab_scales_l2_prefetch.log): the wait is L2's latency. Staged,
a block's scales cost no register in flight (int4, two tiles a warp: 144 -> 134 registers) but two
more copies a block, and they are read after the stage's wait instead of a block before it.
ab_staged_scales.log, the same tiles both ways: int8 4096 x 4096 63.2 -> 70.3%, 14336 x 4096 81.0 ->
85.7%, two-warp int4 tiles up to +5 points, four-warp int4 tiles down to -10. (Not for the CTA
barrier the compiler puts before each copy into a stage's mbarrier: one mbarrier per operand, one or
two fewer barriers a block, was no faster; ab_split_barriers.log.) So both stay, and the tuned table
chooses per shape (gemv_sweep_m16_scales.log: 17 of the 22 M = 16 shapes take "+scales").

Warp-specialized ("ws-" paths, LOADER): the same kernel with one more warp, the loader, issuing
every copy (`_load_run`: the first blocks' words before the PDL wait, their x after it, then each
refill once the multiplying warps have released the stage on its `empty` mbarrier), so the
multiplying warps (`_multiply_run`, 4 or 8: Gluon partitions come in groups of 4) wait, read,
multiply and release, and run none of the CTA barriers, proxy fence and copy code a refill costs
every warp otherwise (their block loop, int4, one tile a warp: 396 -> 352 sm_90 instructions in the
code). No fence before the release: every value a warp read went into its MMAs before it arrives,
so its reads are done. A register cap (loader_register_cap) lets setmaxnreg move the loader group's
registers to the multiplying warps and fits the stream grid's programs on an SM. H200, M = 16,
against the table's entries in one process (benchmarks/results/h200/ab_tma_ws.log): int4 4096 x
14336 64.7 -> 68.6% of the read bandwidth, 14336 x 4096 66.4 -> 70.0%, 4096 x 128256 84.9 -> 89.0%;
int8 within 1.5%, but 4096 x 4096 3 points slower; with 8 multiplying warps the widest shapes gain
more (gemv_sweep_m16_ws8.log). The table chooses per shape (16 of the 22 M = 16 entries).

No interpreter runs Gluon: tests/kernels/test_tma_frag_gemm.py checks the three views (words, x,
scales) against a model of how TMA lays its boxes out on the CPU (the PTX itself is
kernels.frag_gemm's, checked by a model of a warp there), and benchmarks/bench_gemv.py checks the
kernel's products on the GPU.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._common import INTERPRET
from .frag_gemm import _add_rows, _chunk_mma, add_scaled_block, zero_point_operands
from .pdl import pdl_launch
from .tuning import multiprocessors

TMA_FRAG_PATH = "tma-frags"  # the tuned configs' names of this kernel: split-K grid,
TMA_STREAM_PATH = "tma-stream"  # and equal runs of units, a tuned number of programs an SM
STAGED_SCALES = "+scales"  # either, with the scales and zero points staged by TMA beside the words
WARP_SPECIALIZED = "ws-"  # any of those with a loader warp issuing the copies (warp-specialized)
TMA_PATHS = tuple(ws + grid + scales for ws in ("", WARP_SPECIALIZED) for grid in (TMA_FRAG_PATH, TMA_STREAM_PATH)
                  for scales in ("", STAGED_SCALES))
# The warp-specialized kernel: the loader warp's registers (the least setmaxnreg allows; it holds a
# few indices), and a register file of 64K 32-bit registers an SM to share between the programs.
_LOADER_THREAD_REGISTERS = 24
LOADER_REGISTERS = gl.constexpr(_LOADER_THREAD_REGISTERS)
_REGISTER_FILE = 65536
BLOCK_K = gl.constexpr(128)  # columns of K a stage holds, and between two scale multiplies
_X_BOX = [2, 16, 64]         # x's box: 128 columns of 16 rows, as two 128-byte-wide halves
_X_BOX_BYTES = gl.constexpr(math.prod(_X_BOX) * 2)  # fp16


def tma_swizzle(byte: int) -> int:
    """Where a TMA box's byte lands in shared memory under the 128-byte swizzle (box laid out row-major,
    buffer 1024-byte aligned): its 16-byte piece index (bits 4-6) xor its 128-byte row mod 8 (bits 7-9)."""
    return byte ^ (((byte >> 7) & 7) << 4)


def lane_word_row(bits: int, chunk: int, c: int) -> int:
    """The word row of its block (0..R-1) that lanes (g, c) take in chunk `chunk`: for each chunk the
    4 lanes c take 4 rows, and the chunks cover the block. Chosen so that every LDS of the words and
    of x is free of bank conflicts under the swizzle (tests/kernels/test_tma_frag_gemm.py): the words'
    16-byte pieces need the 4 rows to differ in bits 1-2 (the 8 lanes of an LDS.128 phase then hit
    pieces g ^ (row % 8), all different); int8's x (8 bytes a lane and row, 16 lanes a phase) needs
    them to differ in bits 0 and 3 as well."""
    if bits == 4:
        return 8 * (chunk // 2) + 2 * c + chunk % 2
    return (3 * (c & 1)) ^ (12 * (c >> 1)) ^ (chunk & 1) ^ (4 * (chunk >> 1 & 1)) ^ (16 * (chunk >> 2))


def _linear_bases(forward, shape: tuple[int, ...]) -> list[list[int]]:
    """Bases of the shared layout whose logical index `idx` (in `shape`) sits at buffer offset
    forward(idx): basis b is the index at offset 2^b. Checks that forward is a bijection that xor's
    of bases reproduce (a Triton linear layout), which the swizzle and the lane maps here are."""
    table = {}
    for idx in itertools.product(*(range(s) for s in shape)):
        table[forward(idx)] = idx
    size = len(table)
    assert sorted(table) == list(range(size)) and size == math.prod(shape)
    bases = [list(table[1 << b]) for b in range(size.bit_length() - 1)]
    for offset, idx in table.items():
        got = [0] * len(shape)
        for b, basis in enumerate(bases):
            if offset >> b & 1:
                got = [u ^ v for u, v in zip(got, basis)]
        assert tuple(got) == idx
    return bases


@functools.lru_cache(maxsize=None)
def _words_view_bases(bits: int, warps: int, tiles: int) -> tuple:
    rows = 128 // (32 // bits)
    chunks = rows // 4

    def offset(idx):  # (tile * CHUNKS + chunk, thread, word) -> int32 slot of the stage buffer
        tile_chunk, t, i = idx
        tile, chunk = divmod(tile_chunk, chunks)
        warp, lane = divmod(t, 32)
        g, c = divmod(lane, 4)
        box = warp * tiles + tile
        return tma_swizzle(((box * rows + lane_word_row(bits, chunk, c)) * 32 + 4 * g + i) * 4) // 4
    return tuple(map(tuple, _linear_bases(offset, (tiles * chunks, 32 * warps, 4))))


def words_view_bases(bits: int, warps: int, tiles: int) -> list[list[int]]:
    """Offset bases of one stage's words viewed as [TILES * CHUNKS, 32 * WARPS, 4] int32 (index
    u * CHUNKS + h, thread t = 32 w + 4 g + c, word i): the buffer holds sub-box s = w * TILES + u
    ([R, 32] words, one 128-byte row per word row, swizzled), and thread t's 4 words of chunk h are
    the sub-box's row lane_word_row(h, c), columns 4 g .. 4 g + 3."""
    return [list(b) for b in _words_view_bases(bits, warps, tiles)]


@functools.lru_cache(maxsize=None)
def _x_view_bases(bits: int) -> tuple:
    unit = 8 if bits == 4 else 4  # bytes of a fragment element: 4 (int4) or 2 (int8) columns of x
    chunks = 128 // (32 // bits) // 4

    def offset(idx):  # (chunk, 0, lane, element) -> unit slot of the stage's x box [2, 16, 64] fp16
        chunk, _, lane, e = idx
        g, c = divmod(lane, 4)
        column = (2 * lane_word_row(bits, chunk, c) + e % 2) * unit // 2
        byte = ((column // 64) * 16 + g + 8 * (e // 2)) * 128 + (column % 64) * 2
        return tma_swizzle(byte) // unit
    return tuple(map(tuple, _linear_bases(offset, (chunks, 1, 32, 4))))


def x_view_bases(bits: int) -> list[list[int]]:
    """Offset bases of one stage's x box [2, 16, 64] fp16 (two halves of 64 columns, 16 rows each,
    128-byte rows, swizzled) viewed in units of 8 (int4) or 4 (int8) bytes as [CHUNKS, 1, 32, 4]
    (chunk, -, lane, element): element e of lane (g, c) in chunk h is unit 2 r + e % 2 of x row
    g + 8 (e // 2) (the first or second half of the 8 or 4 columns of word row r), r =
    lane_word_row(h, c): the fragment kernel's x operand for that word row."""
    return [list(b) for b in _x_view_bases(bits)]


@gluon.jit
def _split_all(p, FRAG: gl.constexpr, NUM: gl.constexpr):
    """p [T, 4, NUM] (the last dim held in registers) -> tuple of the NUM [T, 4] slices, in FRAG."""
    T: gl.constexpr = p.shape[0]
    if NUM == 2:
        a, b = gl.split(p)
        return gl.convert_layout(a, FRAG, assert_trivial=True), gl.convert_layout(b, FRAG, assert_trivial=True)
    else:
        a, b = gl.split(gl.reshape(p, [T, 4, NUM // 2, 2]))  # even and odd indices
        evens = _split_all(a, FRAG, NUM // 2)
        odds = _split_all(b, FRAG, NUM // 2)
        out = ()
        for i in gl.static_range(NUM // 2):
            out += (evens[i], odds[i])
        return out


@gluon.jit
def _slices(block, FRAG: gl.constexpr, NUM: gl.constexpr):
    """[NUM, T, 4] (the first dim held in registers) -> tuple of NUM [T, 4] tensors in FRAG."""
    return _split_all(gl.permute(block, [1, 2, 0]), FRAG, NUM)


@gluon.jit
def _request(w_desc, x_desc, s_desc, z_desc, wbuf, xbuf, sbuf, zbuf, bars, stage, row, n0, grp, EPW: gl.constexpr,
             WORDS: gl.constexpr, X: gl.constexpr, SCALES_TMA: gl.constexpr, ZERO_MODE: gl.constexpr):
    """TMA copies of block `row` (its first word row) into `stage`: the words and group grp's scales
    and zero points of the tile's columns (WORDS; the barrier's expected bytes count x too), x (X;
    after the producer of x has finished)."""
    bar = bars.index(stage)
    if WORDS:
        # (without SCALES_TMA the scales' descriptors are None: only the branch taken is compiled)
        S_BYTES: gl.constexpr = s_desc.block_type.nbytes if SCALES_TMA else 0
        Z_BYTES: gl.constexpr = z_desc.block_type.nbytes if SCALES_TMA and ZERO_MODE != 0 else 0
        mbarrier.expect(bar, w_desc.block_type.nbytes + _X_BOX_BYTES + S_BYTES + Z_BYTES)
        tma.async_copy_global_to_shared(w_desc, [n0 // 32, row, 0], bar, wbuf.index(stage))
        if SCALES_TMA:
            tma.async_copy_global_to_shared(s_desc, [grp, n0], bar, sbuf.index(stage))
            if ZERO_MODE != 0:
                tma.async_copy_global_to_shared(z_desc, [grp, n0], bar, zbuf.index(stage))
    if X:
        tma.async_copy_global_to_shared(x_desc, [row * EPW // 64, 0, 0], bar, xbuf.index(stage))


@gluon.jit
def _scales(s_ptr, z_ptr, grp, n, n_ok, stride_sg, BITS: gl.constexpr, ZERO_MODE: gl.constexpr,
            FRAG: gl.constexpr):
    """Group grp's scales (fp32) and zero points (int32) of columns n [T, 4]. (kernels.frag_gemm's
    _scales, with the symmetric zero point's tensor given a layout, which Gluon needs.)"""
    s = gl.load(s_ptr + grp * stride_sg + n, mask=n_ok, other=0.0).to(gl.float32)
    if ZERO_MODE == 0:
        z = _symmetric_zeros(BITS, n.shape[0], FRAG)
    else:
        z = gl.load(z_ptr + grp * stride_sg + n, mask=n_ok, other=0).to(gl.int32)
    return s, z


@gluon.jit
def _symmetric_zeros(BITS: gl.constexpr, T: gl.constexpr, FRAG: gl.constexpr):
    """The symmetric zero point (8 for int4, 128 for int8) as a [T, 4] int32 tensor in FRAG."""
    return gl.full([T, 4], 8 if BITS == 4 else 128, gl.int32, FRAG)


@gluon.jit
def _staged_scales(sbuf, zbuf, stage, BITS: gl.constexpr, ZERO_MODE: gl.constexpr, TILES: gl.constexpr,
                   WARPS: gl.constexpr, SCALES_VIEW: gl.constexpr, FRAG: gl.constexpr):
    """Per tile, the scales (fp32) and zero points (int32) of the lane's 4 columns [T, 4], read back
    from the stage's TMA copies (the 4 lanes c of a row g read the same 4 columns: a broadcast)."""
    T: gl.constexpr = 32 * WARPS
    L: gl.constexpr = gl.BlockedLayout([1, TILES, 1, 1, 4], [1, 1, 8, 4, 1], [WARPS, 1, 1, 1, 1], [4, 3, 2, 1, 0])
    s = _per_tile(sbuf.index(stage)._reinterpret(gl.float16, [WARPS, TILES, 8, 1, 4], SCALES_VIEW).load(L),
                  TILES, T, FRAG)
    if ZERO_MODE != 0:
        zb = zbuf.index(stage)
        if zb.shape[1] > T * TILES:  # a box widened to TMA's 128-byte alignment of each stage
            zb = zb.slice(0, T * TILES, dim=1)
        z = _per_tile(zb._reinterpret(gl.uint8, [WARPS, TILES, 8, 1, 4], SCALES_VIEW).load(L), TILES, T, FRAG)
    out = ()
    for u in gl.static_range(TILES):
        if ZERO_MODE == 0:
            zu = _symmetric_zeros(BITS, T, FRAG)
        else:
            zu = z[u].to(gl.int32)
        out += ((s[u].to(gl.float32), zu),)
    return out


@gluon.jit
def _per_tile(v, TILES: gl.constexpr, T: gl.constexpr, FRAG: gl.constexpr):
    """[WARPS, TILES, 8, 1, 4] (row g of each warp's tiles) -> tuple of TILES [T, 4] in FRAG, thread
    32 w + 4 g + c holding row g."""
    WARPS: gl.constexpr = v.shape[0]
    v = gl.permute(v.broadcast_to([WARPS, TILES, 8, 4, 4]), [1, 0, 2, 3, 4])
    v = gl.reshape(v, [TILES, T, 4])
    if TILES == 1:
        out = (gl.convert_layout(gl.reshape(v, [T, 4]), FRAG, assert_trivial=True),)
    else:
        out = _slices(v, FRAG, TILES)
    return out


@gluon.jit
def _block_scales(s_ptr, z_ptr, blk, last_grp, ns, N, stride_sg, BITS: gl.constexpr, ZERO_MODE: gl.constexpr,
                  GROUP_BLOCKS: gl.constexpr, TILES: gl.constexpr, FRAG: gl.constexpr):
    """Per tile, block blk's scales and zero points (a block past K reads the last group's)."""
    grp = _group(blk, last_grp, GROUP_BLOCKS)
    out = ()
    for u in gl.static_range(TILES):
        out += (_scales(s_ptr, z_ptr, grp, ns[u], ns[u] < N, stride_sg, BITS, ZERO_MODE, FRAG),)
    return out


@gluon.jit
def _group(blk, last_grp, GROUP_BLOCKS: gl.constexpr):
    """The group of block blk's scales (a block past K takes the last group's)."""
    return 0 if GROUP_BLOCKS == 0 else gl.minimum(blk // GROUP_BLOCKS, last_grp)


@gluon.jit
def _columns(base, tile, TILES: gl.constexpr, T: gl.constexpr):
    """Per tile u of column tile `tile`, the lane's 4 columns [T, 4] (base: their offsets in the tile)."""
    out = ()
    for u in gl.static_range(TILES):
        out += (base + (tile * (T * TILES) + 32 * u),)
    return out


@gluon.jit
def _unit(u, BK):
    """Work unit u -> (column tile, block of 128 columns of K): units run along K, tile after tile."""
    tile = u // BK
    return tile, u - tile * BK


@gluon.jit
def _unit_at(lo, i, BK, STREAM: gl.constexpr):
    """The i-th unit of the run from unit lo (split-K slices: the i-th block, past K if need be)."""
    if STREAM:
        return _unit(lo + i, BK)
    tile, blk = _unit(lo, BK)
    return tile, blk + i


@gluon.jit
def _following(tile, blk, BK, STREAM: gl.constexpr):
    """The unit after (tile, blk) (split-K slices: the block after, past K if need be)."""
    if not STREAM:
        return tile, blk + 1
    wrap = blk + 1 == BK
    return tile + wrap.to(gl.int32), gl.where(wrap, 0, blk + 1)


@gluon.jit
def _fill_ring(w_desc, x_desc, s_desc, z_desc, wbuf, xbuf, sbuf, zbuf, full, lo, count, BK, last_grp,
               BITS: gl.constexpr, TN: gl.constexpr, STAGES: gl.constexpr, STREAM: gl.constexpr,
               SCALES_TMA: gl.constexpr, ZERO_MODE: gl.constexpr, GROUP_BLOCKS: gl.constexpr, PDL: gl.constexpr):
    """Requests the run's first STAGES blocks: their words (and scales) at once, since the weights
    are no kernel's output, and their x once the previous kernel has finished (the PDL wait). TN:
    the columns of a column tile."""
    EPW: gl.constexpr = 32 // BITS
    R: gl.constexpr = BLOCK_K // EPW
    for i in gl.static_range(STAGES):
        if i < count:
            tile, blk = _unit_at(lo, i, BK, STREAM)
            _request(w_desc, x_desc, s_desc, z_desc, wbuf, xbuf, sbuf, zbuf, full, i, blk * R, tile * TN,
                     _group(blk, last_grp, GROUP_BLOCKS), EPW, True, False, SCALES_TMA, ZERO_MODE)
    if PDL:
        gdc_wait()  # x is the previous kernel's output
    for i in gl.static_range(STAGES):
        if i < count:
            tile, blk = _unit_at(lo, i, BK, STREAM)
            _request(w_desc, x_desc, s_desc, z_desc, wbuf, xbuf, sbuf, zbuf, full, i, blk * R, tile * TN,
                     0, EPW, False, True, SCALES_TMA, ZERO_MODE)


@gluon.jit
def _multiply_stage(totals, scales, wbuf, xbuf, stage, BITS: gl.constexpr, WARPS: gl.constexpr, TILES: gl.constexpr,
                    M_BLOCKS: gl.constexpr, WORDS_VIEW: gl.constexpr, X_VIEW: gl.constexpr):
    """totals (per tile) + the block in `stage` times its scales: the lanes read their word and x
    fragments back from the stage (one LDS per chunk of words, x shared by every warp) and run
    kernels.frag_gemm's MMAs on them."""
    EPW: gl.constexpr = 32 // BITS
    CHUNKS: gl.constexpr = BLOCK_K // EPW // 4
    T: gl.constexpr = 32 * WARPS
    FRAG: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [WARPS, 1], [1, 0])  # thread t holds row t
    WORDS_L: gl.constexpr = gl.BlockedLayout([CHUNKS * TILES, 1, 4], [1, 32, 1], [1, WARPS, 1], [2, 0, 1])
    X_CHUNKS_L: gl.constexpr = gl.BlockedLayout([CHUNKS, 1, 4], [1, 32, 1], [1, WARPS, 1], [2, 0, 1])
    X_LOAD_L: gl.constexpr = gl.BlockedLayout([CHUNKS, 1, 1, 4], [1, 1, 32, 1], [1, WARPS, 1, 1], [3, 0, 1, 2])
    X_UNIT: gl.constexpr = gl.int64 if BITS == 4 else gl.int32
    words = _slices(wbuf.index(stage)._reinterpret(gl.int32, [CHUNKS * TILES, T, 4], WORDS_VIEW).load(WORDS_L),
                    FRAG, CHUNKS * TILES)
    xv = xbuf.index(stage)._reinterpret(X_UNIT, [CHUNKS, 1, 32, 4], X_VIEW).load(X_LOAD_L)
    xv = gl.reshape(xv.broadcast_to([CHUNKS, WARPS, 32, 4]), [CHUNKS, T, 4])  # every warp reads the same x
    xfs = _slices(gl.convert_layout(xv, X_CHUNKS_L, assert_trivial=True), FRAG, CHUNKS)
    new = ()
    for u in gl.static_range(TILES):
        s, z = scales[u]
        clo, chi = zero_point_operands(z, BITS)
        acc0 = gl.zeros([T, 4], gl.int64, FRAG)
        acc1 = gl.zeros([T, 4], gl.int64, FRAG)
        for h in gl.static_range(CHUNKS):
            acc0, acc1 = _chunk_mma(acc0, acc1, words[u * CHUNKS + h], xfs[h], clo, chi, BITS, M_BLOCKS)
        new += (add_scaled_block(totals[u], acc0, acc1, s, M_BLOCKS),)
    return new


@gluon.jit
def _multiply_run(w_desc, x_desc, s_desc, z_desc, wbuf, xbuf, sbuf, zbuf, full, empty, s_ptr, z_ptr, out_ptr,
                  M, N, stride_sg, stride_om, lo, count, BK, last_grp,
                  BITS: gl.constexpr, ZERO_MODE: gl.constexpr, WARPS: gl.constexpr, TILES: gl.constexpr,
                  STAGES: gl.constexpr, GROUP_BLOCKS: gl.constexpr, M_BLOCKS: gl.constexpr, WORDS_VIEW: gl.constexpr,
                  X_VIEW: gl.constexpr, STREAM: gl.constexpr, SCALES_TMA: gl.constexpr, SCALES_VIEW: gl.constexpr,
                  LOADER: gl.constexpr):
    """The program's run of `count` units from unit `lo`, block by block out of the ring (`full`:
    each stage's barrier of arrived bytes), its sums added to out whenever the run leaves a column
    tile. A stage read and multiplied is refilled STAGES blocks ahead: by these warps (a CTA barrier,
    then the copies), or, with LOADER (the warp-specialized kernel), by the loader warp, told by the
    stage's `empty` barrier."""
    EPW: gl.constexpr = 32 // BITS
    R: gl.constexpr = BLOCK_K // EPW            # word rows a block
    T: gl.constexpr = 32 * WARPS
    FRAG: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [WARPS, 1], [1, 0])
    t = gl.arange(0, T, layout=gl.SliceLayout(1, FRAG))
    lane = t % 32
    row = 2 * (lane % 4)  # the first x row of the lane's sums
    e = gl.arange(0, 4, layout=gl.SliceLayout(0, FRAG))[None, :]
    base = ((t // 32) * (32 * TILES) + 4 * (lane // 4))[:, None] + e  # the lane's columns in a tile
    zero = gl.zeros([T, 4], gl.float32, FRAG)
    totals = _cleared(zero, TILES)  # per tile: sums of x rows 2c, 2c + 1, 8 + 2c, 9 + 2c over the run so far
    # units carried along instead of divided out per block: this block's, the next one's (its
    # scales are requested a block ahead) and the refill's, STAGES ahead
    tile, blk = _unit(lo, BK)
    tile_r, blk_r = _unit_at(lo, STAGES, BK, STREAM)
    ns = _columns(base, tile, TILES, T)
    if not SCALES_TMA:
        nxt = _block_scales(s_ptr, z_ptr, blk, last_grp, ns, N, stride_sg, BITS, ZERO_MODE, GROUP_BLOCKS, TILES, FRAG)
    for b in range(count):
        stage = b % STAGES
        tile_n, blk_n = _following(tile, blk, BK, STREAM)
        if not SCALES_TMA:
            scales = nxt  # the next block's scales are requested before this block's MMAs
            ns_n = _columns(base, tile_n, TILES, T) if STREAM else ns
            nxt = _block_scales(s_ptr, z_ptr, blk_n, last_grp, ns_n, N, stride_sg, BITS, ZERO_MODE, GROUP_BLOCKS,
                                TILES, FRAG)
        mbarrier.wait(full.index(stage), (b // STAGES) & 1)
        if SCALES_TMA:  # in the stage since the wait
            scales = _staged_scales(sbuf, zbuf, stage, BITS, ZERO_MODE, TILES, WARPS, SCALES_VIEW, FRAG)
        totals = _multiply_stage(totals, scales, wbuf, xbuf, stage, BITS, WARPS, TILES, M_BLOCKS, WORDS_VIEW, X_VIEW)
        # every warp has read this stage: refill it. (After the MMAs, not before: a refill between
        # the reads and the MMAs makes every word and x fragment a register held across the
        # barrier, 24-48 more a thread and one program fewer an SM; refill_ab.log.)
        if LOADER:
            # one arrival for all these warps (the compiler puts their barrier before it). No proxy
            # fence: every value read went into this block's MMAs, so the reads are done.
            mbarrier.arrive(empty.index(stage), count=1)
        elif b + STAGES < count:
            gl.thread_barrier()
            _request(w_desc, x_desc, s_desc, z_desc, wbuf, xbuf, sbuf, zbuf, full, stage, blk_r * R,
                     tile_r * (T * TILES), _group(blk_r, last_grp, GROUP_BLOCKS), EPW, True, True, SCALES_TMA,
                     ZERO_MODE)
        tile_r, blk_r = _following(tile_r, blk_r, BK, STREAM)
        if STREAM:
            if (tile_n != tile) & (b < count - 1):  # the run leaves this tile for the next: its sums go out
                _add_totals(out_ptr, totals, row, _columns(base, tile, TILES, T), N, M, stride_om, M_BLOCKS, TILES)
                totals = _cleared(zero, TILES)
        tile, blk = tile_n, blk_n
    if STREAM:  # the loop has moved one unit past the run
        tile, blk = _unit(lo + count - 1, BK)
        ns = _columns(base, tile, TILES, T)
    _add_totals(out_ptr, totals, row, ns, N, M, stride_om, M_BLOCKS, TILES)


@gluon.jit
def _load_run(w_desc, x_desc, s_desc, z_desc, wbuf, xbuf, sbuf, zbuf, full, empty, lo, count, BK, last_grp,
              BITS: gl.constexpr, TN: gl.constexpr, STAGES: gl.constexpr, STREAM: gl.constexpr,
              SCALES_TMA: gl.constexpr, ZERO_MODE: gl.constexpr, GROUP_BLOCKS: gl.constexpr, PDL: gl.constexpr):
    """The loader warp of the warp-specialized kernel: fills the ring, then refills each stage once
    the multiplying warps have released it (its `empty` barrier's phase for the previous round)."""
    EPW: gl.constexpr = 32 // BITS
    R: gl.constexpr = BLOCK_K // EPW
    _fill_ring(w_desc, x_desc, s_desc, z_desc, wbuf, xbuf, sbuf, zbuf, full, lo, count, BK, last_grp, BITS, TN,
               STAGES, STREAM, SCALES_TMA, ZERO_MODE, GROUP_BLOCKS, PDL)
    tile_r, blk_r = _unit_at(lo, STAGES, BK, STREAM)
    for b in range(STAGES, count):
        stage = b % STAGES
        mbarrier.wait(empty.index(stage), (b // STAGES - 1) & 1)
        _request(w_desc, x_desc, s_desc, z_desc, wbuf, xbuf, sbuf, zbuf, full, stage, blk_r * R, tile_r * TN,
                 _group(blk_r, last_grp, GROUP_BLOCKS), EPW, True, True, SCALES_TMA, ZERO_MODE)
        tile_r, blk_r = _following(tile_r, blk_r, BK, STREAM)


@gluon.jit
def _tma_frag_gemm_kernel(
    x_desc, w_desc, s_desc, z_desc, s_ptr, z_ptr, out_ptr, M, N, K, stride_sg, stride_om,
    BITS: gl.constexpr, ZERO_MODE: gl.constexpr, PDL: gl.constexpr, WARPS: gl.constexpr,
    TILES: gl.constexpr, K_SLICE: gl.constexpr, STAGES: gl.constexpr, GROUP_BLOCKS: gl.constexpr,
    M_BLOCKS: gl.constexpr, WORDS_VIEW: gl.constexpr, X_VIEW: gl.constexpr, STREAM: gl.constexpr,
    SCALES_TMA: gl.constexpr, SCALES_VIEW: gl.constexpr, LOADER: gl.constexpr,
):
    """out [M, N] += x [M, K] @ W.T for M <= 16. Work units: (column tile of TILES tiles of 32
    columns a warp, block of 128 columns of K), numbered along K tile after tile. A program walks a
    run of consecutive units through STAGES buffers: STREAM, an equal share of all units (grid: a
    tuned number of programs an SM; a run may cross from one tile into the next), else the
    K_SLICE / 128 units of column tile program_id(0) from slice program_id(1). Scale multiplies per
    block (GROUP_BLOCKS blocks a group; 0: one group, per-channel); fp32 atomics when a run leaves
    a tile. LOADER: warp-specialized, one more warp issuing every copy (`_load_run`)."""
    EPW: gl.constexpr = 32 // BITS
    R: gl.constexpr = BLOCK_K // EPW            # word rows a block
    T: gl.constexpr = 32 * WARPS
    if PDL:
        gdc_launch_dependents()
    BK = gl.cdiv(K, BLOCK_K)                    # units a column tile
    if STREAM:
        units = gl.cdiv(N, T * TILES) * BK
        lo = gl.program_id(0) * units // gl.num_programs(0)
        count = (gl.program_id(0) + 1) * units // gl.num_programs(0) - lo
    else:
        NB: gl.constexpr = K_SLICE // BLOCK_K
        lo = gl.program_id(0) * BK + gl.program_id(1) * NB
        count = NB  # blocks past K (a partial last slice) read zeros and the last group's scales
    wbuf = gl.allocate_shared_memory(gl.int32, [STAGES, WARPS * TILES, R, 32], w_desc.layout)
    xbuf = gl.allocate_shared_memory(gl.float16, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    if SCALES_TMA:
        sbuf = gl.allocate_shared_memory(gl.float16, [STAGES] + s_desc.block_type.shape, s_desc.layout)
        if ZERO_MODE != 0:
            zbuf = gl.allocate_shared_memory(gl.uint8, [STAGES] + z_desc.block_type.shape, z_desc.layout)
        else:
            zbuf = sbuf
    else:  # unused: the scales come from s_ptr / z_ptr
        sbuf = xbuf
        zbuf = xbuf
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
    if LOADER:
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(empty.index(i), count=1)
    else:
        empty = full  # unused
    fence_async_shared()
    last_grp = 0 if GROUP_BLOCKS == 0 else (BK - 1) // GROUP_BLOCKS
    if LOADER:
        gl.warp_specialize([
            (_multiply_run, (w_desc, x_desc, s_desc, z_desc, wbuf, xbuf, sbuf, zbuf, full, empty, s_ptr, z_ptr, out_ptr,
                             M, N, stride_sg, stride_om, lo, count, BK, last_grp, BITS, ZERO_MODE, WARPS, TILES, STAGES,
                             GROUP_BLOCKS, M_BLOCKS, WORDS_VIEW, X_VIEW, STREAM, SCALES_TMA, SCALES_VIEW, True)),
            (_load_run, (w_desc, x_desc, s_desc, z_desc, wbuf, xbuf, sbuf, zbuf, full, empty, lo, count, BK, last_grp,
                         BITS, T * TILES, STAGES, STREAM, SCALES_TMA, ZERO_MODE, GROUP_BLOCKS, PDL)),
        ], [1], [LOADER_REGISTERS])
    else:
        _fill_ring(w_desc, x_desc, s_desc, z_desc, wbuf, xbuf, sbuf, zbuf, full, lo, count, BK, last_grp, BITS,
                   T * TILES, STAGES, STREAM, SCALES_TMA, ZERO_MODE, GROUP_BLOCKS, PDL)
        _multiply_run(w_desc, x_desc, s_desc, z_desc, wbuf, xbuf, sbuf, zbuf, full, empty, s_ptr, z_ptr, out_ptr,
                      M, N, stride_sg, stride_om, lo, count, BK, last_grp, BITS, ZERO_MODE, WARPS, TILES, STAGES,
                      GROUP_BLOCKS, M_BLOCKS, WORDS_VIEW, X_VIEW, STREAM, SCALES_TMA, SCALES_VIEW, False)


@gluon.jit
def _cleared(zero, TILES: gl.constexpr):
    """Per tile, the four sums at zero."""
    out = ()
    for u in gl.static_range(TILES):
        out += ((zero, zero, zero, zero),)
    return out


@gluon.jit
def _add_totals(out_ptr, totals, row, ns, N, M, stride_om, M_BLOCKS: gl.constexpr, TILES: gl.constexpr):
    """out += each tile's sums (lane (g, c): x rows row = 2c, 2c + 1, 8 + 2c, 9 + 2c at its 4 columns)."""
    for u in gl.static_range(TILES):
        n = ns[u]
        n_ok = n < N
        t00, t01, t10, t11 = totals[u]
        _add_rows(out_ptr, t00, row, n, n_ok, M, stride_om)
        _add_rows(out_ptr, t01, row + 1, n, n_ok, M, stride_om)
        if M_BLOCKS == 2:
            _add_rows(out_ptr, t10, row + 8, n, n_ok, M, stride_om)
            _add_rows(out_ptr, t11, row + 9, n, n_ok, M, stride_om)


def _words_descriptor(lin, warps: int, tiles: int) -> TensorDescriptor:
    """The words' TMA descriptor for boxes of `warps * tiles` sub-boxes, kept on the linear."""
    key = (warps * tiles, lin.words.data_ptr())
    desc = lin.tma_descriptors.get(key)
    if desc is None:
        rows = 128 // (32 // lin.bits)
        kw, n = lin.words.shape
        layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=3)
        desc = TensorDescriptor(lin.words, [n // 32, kw, 32], [32, n, 1], [warps * tiles, rows, 32], layout)
        lin.tma_descriptors[key] = desc
    return desc


def _scales_descriptors(lin, block_n: int) -> tuple:
    """TMA descriptors of the scales [G, N] fp16 and the integer zero points [G, N] uint8 (None when
    symmetric) for boxes of one group's block_n columns, kept on the linear. A box is at least 128
    bytes wide (64 zero points: 128, the rest unread), as TMA wants each stage's buffer 128-byte aligned."""
    key = ("scales", block_n, lin.scales.data_ptr())
    descs = lin.tma_descriptors.get(key)
    if descs is None:
        descs = tuple(None if t is None else TensorDescriptor(
            t, list(t.shape), [t.stride(0) if t.shape[0] > 1 else t.shape[1], 1],  # one group: any row stride
            [1, max(block_n, 128 // t.element_size())],
            gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8 * t.element_size(), rank=2))
            for t in (lin.scales, lin.zeros_or_offsets if lin.zero_mode_id != 0 else None))
        lin.tma_descriptors[key] = descs
    return descs


@functools.lru_cache(maxsize=None)
def _scales_view_bases(warps: int, tiles: int) -> tuple:
    def offset(idx):  # (warp, tile, g, 0, element) -> element of the stage's [1, BLOCK_N] box
        warp, tile, g, _, e = idx
        return (warp * tiles + tile) * 32 + 4 * g + e
    return tuple(map(tuple, _linear_bases(offset, (warps, tiles, 8, 1, 4))))


def scales_view_bases(warps: int, tiles: int) -> list[list[int]]:
    """Offset bases of one stage's scale (or zero point) box [1, BLOCK_N] viewed as [WARPS, TILES, 8,
    1, 4] (warp w, tile u, lane row g, -, column e: column 32 (w TILES + u) + 4 g + e)."""
    return [list(b) for b in _scales_view_bases(warps, tiles)]


def _x_descriptor(x2: torch.Tensor) -> TensorDescriptor:
    m, k = x2.shape
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
    return TensorDescriptor(x2, [k // 64, m, 64], [64, x2.stride(0), 1], _X_BOX, layout)


@functools.lru_cache(maxsize=None)
def _has_tma(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def tma_frag_serves(lin, m: int, device: torch.device) -> bool:
    """Whether this kernel can run `lin` at M = m on `device`: a CUDA device of compute capability
    9.0+ (TMA; not the interpreter), 1..16 rows, int4/int8 with integer or symmetric zero points, no
    act-order, no bias (the kernel has no bias path: linears with one, Qwen's q|k|v, keep the
    fragment kernel), K a multiple of 128 with groups of whole blocks of 128 (or one group), N a
    multiple of 32 and words [K / EPW, N] contiguous (the TMA views)."""
    if INTERPRET or device.type != "cuda" or not _has_tma(device.index):
        return False
    k, n = lin.in_features, lin.out_features
    group = lin.group_size_eff
    return (1 <= m <= 16 and lin.bits in (4, 8) and lin.zero_mode_id != 2 and lin.perm is None and lin.bias is None
            and k % 128 == 0
            and (group >= k or group % 128 == 0) and n % 32 == 0 and lin.words.stride() == (n, 1))


def tma_grid(path) -> str | None:
    """The grid of a config's path (TMA_FRAG_PATH or TMA_STREAM_PATH, whichever way its scales go,
    warp-specialized or not), or None when the path is not this kernel's."""
    return path.removeprefix(WARP_SPECIALIZED).removesuffix(STAGED_SCALES) if path in TMA_PATHS else None


def loader_register_cap(warps: int, tiles: int, per_sm: int | None) -> int | None:
    """maxnreg for the warp-specialized kernel, or None when no cap fits. Registers are given out by
    groups of 4 warps: a program is its WARPS (a multiple of 4) multiplying warps plus a group for
    the loader, and ptxas moves the loader group's registers (all but LOADER_REGISTERS) to the others
    (setmaxnreg). The multiplying warps need about 104 registers a thread for one tile a warp, 136
    for two (fewer spill; sm_90 code of triton 3.6), which sets the least cap; the stream grid's
    `per_sm` programs must also fit an SM at once (None: the split-K grid, which takes the least)."""
    if warps % 4:
        return None
    need = 104 if tiles == 1 else 136
    least = -(-(need * warps + _LOADER_THREAD_REGISTERS * 4) // (warps + 4) // 8) * 8  # rounded up to 8
    if per_sm is None:
        return least
    cap = min(128, _REGISTER_FILE // (per_sm * 32 * (warps + 4)) // 8 * 8)
    return cap if cap >= least else None


def try_tma_frag_gemm(x2: torch.Tensor, lin, out2: torch.Tensor, config: tuple) -> bool:
    """Runs out2 [M, N] += x2 @ W.T with this kernel when `config` (BLOCK_N, K slice or programs an
    SM, STAGES, num_warps, path) selects it and tma_frag_serves; returns whether it ran. Path
    "tma-frags": a grid of column tiles x K slices (a multiple of 128); "tma-stream": as many
    programs as fit the card at once (the second field an SM, times its multiprocessors), each an
    equal run of the units. BLOCK_N = 32 num_warps (one tile a warp) or 64 num_warps (two). The
    prefix "ws-": warp-specialized, num_warps a multiple of 4 and a register cap that fits
    (loader_register_cap). x is read as fp16 (bf16 is converted first, as the fragment kernel does)
    from 16-byte aligned rows (copied when they are not)."""
    bn, k_field, stages, nw, path = config
    m, k = x2.shape
    tiles = bn // (32 * nw)
    stream = tma_grid(path) == TMA_STREAM_PATH
    staged = path in TMA_PATHS and path.endswith(STAGED_SCALES)
    loader = path in TMA_PATHS and path.startswith(WARP_SPECIALIZED)
    if path not in TMA_PATHS or tiles not in (1, 2) or bn != 32 * nw * tiles or (staged and bn > 256) \
            or stages < 1 or k_field < 1 or (not stream and k_field % 128):  # 256: a TMA box's widest
        return False
    cap = loader_register_cap(nw, tiles, k_field if stream else None) if loader else None
    if loader and cap is None:
        return False
    if not tma_frag_serves(lin, m, x2.device):
        return False
    if x2.dtype != torch.float16:
        x2 = x2.to(torch.float16)
    if x2.stride(0) % 8 or x2.data_ptr() % 16:  # TMA: 16-byte aligned base and rows
        x2 = x2.clone(memory_format=torch.contiguous_format)
    n = lin.out_features
    group = lin.group_size_eff
    if stream:
        units = triton.cdiv(n, bn) * triton.cdiv(k, 128)
        grid = (min(units, k_field * multiprocessors(x2.device.index)),)
    else:
        grid = (triton.cdiv(n, bn), triton.cdiv(k, k_field))
    s_desc, z_desc = _scales_descriptors(lin, bn) if staged else (None, None)
    _tma_frag_gemm_kernel[grid](
        _x_descriptor(x2), _words_descriptor(lin, nw, tiles), s_desc, z_desc, lin.scales, lin.zeros_or_offsets, out2,
        m, n, k, lin.scales.stride(0), out2.stride(0),
        BITS=lin.bits, ZERO_MODE=lin.zero_mode_id, WARPS=nw, TILES=tiles,
        K_SLICE=128 if stream else k_field, STAGES=stages, GROUP_BLOCKS=0 if group >= k else group // 128,
        M_BLOCKS=1 if m <= 8 else 2, WORDS_VIEW=gl.SharedLinearLayout(words_view_bases(lin.bits, nw, tiles)),
        X_VIEW=gl.SharedLinearLayout(x_view_bases(lin.bits)), STREAM=stream, SCALES_TMA=staged,
        SCALES_VIEW=gl.SharedLinearLayout(scales_view_bases(nw, tiles)), LOADER=loader, num_warps=nw,
        **({"maxnreg": cap} if loader else {}), **pdl_launch(x2),
    )
    return True
