"""Decode GEMM for a few rows (M = 2..16) with the weights as the tensor cores' A operand, each
lane's 16-byte load of packed words being its own MMA fragments: no shared memory, no reshuffle.

    out^T [N, M] += W [N, K] @ x^T [K, M]      (mma.sync m16n8k16: A = 16 columns of W, B = x^T)

Why: the slot kernel (kernels.slot_gemm) feeds the words to tl.dot as its B operand, and Triton
moves every tile through shared memory to build the fragments; on an H200 its M = 16 GEMVs sat at
30-45% of the read bandwidth with L1 the busiest unit. An MMA's K may be summed in any order and
its rows may be any outputs, as long as A and B agree, so the layout the weights already have
(kernels.layout: words [K / EPW, N], N contiguous) can feed A straight from registers.

Which lane holds what (g = lane / 4 and c = lane % 4, as the PTX ISA names a fragment's rows and
columns). Per chunk of 4 word rows (32 columns of K for int4, 16 for int8), lane (g, c) loads the
4 words of word row `chunk + c` at the warp's columns 4 g .. 4 g + 3 (one 16-byte load; a warp
reads 4 rows x 128 contiguous bytes). Its word i is output row g (i even) or g + 8 (i odd) of
MMA tile i // 2: two 16-row tiles a warp, 32 columns. In an MMA, lane (g, c) holds A's row g and
g + 8 at K positions 2c, 2c + 1, 2c + 8, 2c + 9, and those K positions of every row are held by
the lanes of the same c: so the MMA's K positions of lanes c are the codes of word row chunk + c,
for every row alike. int4 (pair-interleaved nibbles, kernels.layout): one word gives the fp16
pairs (codes 0,1), (2,3), (4,5), (6,7) by LOP3s, so two MMAs (the word's first four codes, then
the last four) take K = 32; int8: the pairs (bytes 0,1), (2,3) by PRMTs, one MMA per K = 16. B,
x^T, must match: lane (g, c) holds x[g] (and x[g + 8], the second block of 8 rows) at the same K
positions, i.e. the 8 (int4) or 4 (int8) consecutive columns of x its word row covers: one
16-byte (int4) or 8-byte (int8) load per row. The C fragment gives lane (g, c) the outputs of its
4 columns for x rows 2c, 2c + 1 (and 8 + 2c, 9 + 2c).

The codes become exact fp16 (q - z) in the fragment (the 1024.0 mantissa trick of
kernels.slot_gemm with the zero point in the subtrahend), so the MMA sums x (q - z) exactly in
fp32 and each group of K costs one scale multiply per output afterwards; float offsets (GGUF)
would need sum x per group as well and are left to the slot kernel.

Triton has no way to place a tensor's elements in chosen lanes, but a [32 * warps, 4] tensor
loaded with 4 contiguous elements a row gets the layout "thread t holds row t" (sizePerThread
[1, 4], threadsPerWarp [32, 1]), and tl.inline_asm_elementwise with pack = 4 hands one asm block
a thread's 4 elements of every operand: so the asm (one warp-wide mma.sync per tile and K step)
sees exactly the fragments the index arithmetic put in each lane. The interpreter (EMULATE) sums
the same K positions per output in plain Triton; the PTX is checked on the GPU
(benchmarks/bench_gemv.py) and by a model of its instructions (tests/kernels/test_frag_gemm.py).

A program: TILES (1 or 2) tiles of 32 columns a warp (the second reuses the lanes' x fragments),
and a K slice walked in blocks of up to 128 columns of K (one scale multiply each); each block's
words, x fragments, scales and zero points are requested together before its MMAs, and the
outputs go to memory once, by fp32 atomics (split-K over the slices). H200, M = 16, g128, against
the slot kernel's tuned tiles in the same process (benchmarks/results/h200/frag_probe.log): int4
4096 x 14336 19.2 -> 14.1 us (39% -> 53% of the read bandwidth), 4096 x 128256 146 -> 102 us
(46% -> 65%); int8 4096 x 128256 207 -> 167 us (63% -> 78%; 89% with two tiles a warp,
gemv_sweep_m16_frags.log). What still holds it back is latency (Nsight Compute: warps stalled on
their loads, 12 of 16 possible a SM; ncu_frag_w4_m16_4096x14336.txt): a block's loads need
registers (its x fragments take twice its words' at two blocks of 8 rows), which caps a warp at
one block in flight. Prefetching the next block into registers (two blocks an iteration, so that
no register copy waits for a load) lost 3-5 points on int4 and gained 2-11 on int8, loading the
words past L1 changed nothing, and Triton's cp.async pipeline was 4-6 times slower
(dropped_variants.log, thirteenth session); two tiles a warp wins the largest int8 shapes only,
so it is a tile option. Staging the blocks through shared memory by hand-written cp.async (each
lane its own pieces, several blocks in flight without registers) was slower still, by a third to a
half, with x staged or not (fourteenth session, ab_frag_cp_async.log).

SUPER (config field 3): the slice is walked SUPER blocks at a time, all their loads requested
before the first block's MMAs, and ptxas is given 232 registers instead of 168 to keep them in
flight. At SUPER = 2 the int8 shapes gain 4-10 points of the read bandwidth (H200, one process:
47.5 / 61.1 / 60.9 / 82.9% -> 52.6 / 70.9 / 70.4 / 87.0% on the issue's four shapes); int4 gains
only on the smaller shapes (4096 x 4096 39.6 -> 42.2%) and loses 2-5 on the others. SUPER = 4
lost everywhere, and so did forcing every load of a super-block ahead of its first MMA
(benchmarks/results/h200/ab_frag_super.log). The tuned table picks SUPER per shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, nibble_slot
from .pdl import pdl_launch, release_dependents, wait_for_producer
from .slot_gemm import INT4_CONSTANT_REGS, INT4_CONSTANTS

FRAG_PATH = "frags"  # the tuned configs' name of this kernel
BLOCK_K_MAX = 128    # columns of K between two scale multiplies (a group, or part of a larger one)
# ptxas's own register target (82 for int4 at M = 16) made it sink each chunk's loads to just before
# its MMAs: four dependent memory round trips a block. Given room (about 128 used), it issues the
# whole block's loads first, as the program orders them (sm_90 code of triton 3.6).
MAX_REGISTERS = 168
# With two blocks' loads requested together (SUPER = 2), ptxas needs more room to keep the second
# block's requests ahead of the first one's MMAs: int8 M = 16 gained 2-7 points of the read
# bandwidth at 232 registers over 168, int4 stayed equal (benchmarks/results/h200/ab_frag_super.log).
MAX_REGISTERS_SUPER = 232
_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"


def frag_asm(bits: int, m_blocks: int) -> str:
    """PTX of one chunk (4 word rows): acc_b += the chunk's MMAs for each block b < m_blocks of 8
    rows of x. Operands per lane, 4 registers each (pack = 4): outputs acc0 ($0-$3) and acc1
    ($4-$7, two blocks only), 64-bit: element i holds the fp32 outputs (row 2c, row 2c + 1) of
    block b for the lane's column i; inputs the 4 words, x (int4: 64-bit, elements 0, 1 = x[g]'s
    8 columns, 2, 3 = x[g + 8]'s; int8: 32-bit, elements 0, 1 = x[g]'s 4 columns, 2, 3 =
    x[g + 8]'s), clo (fp16x2 1024 + z per word), chi (int4: fp16x2 -(64 + z)), then acc0, acc1."""
    nacc = m_blocks
    base = 4 * nacc
    w, x = base, base + 4
    clo, chi = base + 8, base + 12
    acc_in = base + (16 if bits == 4 else 12)
    lines = [f"mov.b64 {{c{b}_{i}_0, c{b}_{i}_1}}, ${acc_in + 4 * b + i};" for b in range(nacc) for i in range(4)]
    if bits == 4:
        regs = (f".reg .b32 {INT4_CONSTANT_REGS}, t, " + ", ".join(f"d{i}_{s}" for i in range(4) for s in range(4))
                + ", " + ", ".join(f"x{b}_{s}" for b in range(2) for s in range(4)) + ";")
        lines = INT4_CONSTANTS + lines
        for b in range(nacc):  # x[g + 8 b]: fp16 pairs of columns (0,1) (2,3) (4,5) (6,7)
            lines.append(f"mov.b64 {{x{b}_0, x{b}_1}}, ${x + 2 * b};")
            lines.append(f"mov.b64 {{x{b}_2, x{b}_3}}, ${x + 2 * b + 1};")
        for i in range(4):  # word i -> (q - z) pairs of codes (0,1) (2,3) (4,5) (6,7); LOP3 = (a & b) | c
            lines += [f"lop3.b32 d{i}_0, ${w + i}, lo4, m, 0xEA;", f"sub.f16x2 d{i}_0, d{i}_0, ${clo + i};",
                      f"lop3.b32 d{i}_1, ${w + i}, hi4, m, 0xEA;", f"fma.rn.f16x2 d{i}_1, d{i}_1, r16, ${chi + i};",
                      f"shr.u32 t, ${w + i}, 8;",
                      f"lop3.b32 d{i}_2, t, lo4, m, 0xEA;", f"sub.f16x2 d{i}_2, d{i}_2, ${clo + i};",
                      f"lop3.b32 d{i}_3, t, hi4, m, 0xEA;", f"fma.rn.f16x2 d{i}_3, d{i}_3, r16, ${chi + i};"]
        steps = [(0, 1), (2, 3)]  # K step j: A's pairs (2c, 2c+1) and (2c+8, 2c+9) are code pairs 2j, 2j+1
    else:
        regs = (".reg .b32 m, " + ", ".join(f"d{i}_{s}" for i in range(4) for s in range(2)) + ";")
        lines = ["mov.b32 m, 0x64646464;"] + lines
        for i in range(4):  # word i -> (q - z) pairs of bytes (0,1) (2,3): PRMT puts 0x64 above each byte
            lines += [f"prmt.b32 d{i}_0, ${w + i}, m, 0x5140;", f"sub.f16x2 d{i}_0, d{i}_0, ${clo + i};",
                      f"prmt.b32 d{i}_1, ${w + i}, m, 0x7362;", f"sub.f16x2 d{i}_1, d{i}_1, ${clo + i};"]
        steps = [(0, 1)]
    for tile in range(2):
        for j, (lo, hi) in enumerate(steps):
            a = f"{{d{2 * tile}_{lo}, d{2 * tile + 1}_{lo}, d{2 * tile}_{hi}, d{2 * tile + 1}_{hi}}}"
            for b in range(nacc):
                bx = f"{{x{b}_{2 * j}, x{b}_{2 * j + 1}}}" if bits == 4 else f"{{${x + 2 * b}, ${x + 2 * b + 1}}}"
                c = f"{{c{b}_{2 * tile}_0, c{b}_{2 * tile}_1, c{b}_{2 * tile + 1}_0, c{b}_{2 * tile + 1}_1}}"
                lines.append(f"{_MMA} {c}, {a}, {bx}, {c};")
    lines += [f"mov.b64 ${4 * b + i}, {{c{b}_{i}_0, c{b}_{i}_1}};" for b in range(nacc) for i in range(4)]
    acc_regs = ".reg .f32 " + ", ".join(f"c{b}_{i}_{p}" for b in range(nacc) for i in range(4) for p in range(2)) + ";"
    return "{\n" + regs + "\n" + acc_regs + "\n" + "\n".join(lines) + "\n}"


def frag_constraints(bits: int, m_blocks: int) -> str:
    """The inline-asm constraints of frag_asm(bits, m_blocks), in its operand order: the accumulators
    out (64-bit), the words, x (int4: 64-bit units, int8: 32-bit), clo, chi (int4 only), the
    accumulators in; 4 operands each (pack = 4)."""
    x = "l" if bits == 4 else "r"
    groups = ["=l"] * m_blocks + ["r", x, "r"] + (["r"] if bits == 4 else []) + ["l"] * m_blocks
    return ",".join(c for c in groups for _ in range(4))


_ASM_W4_M8, _ASM_W4_M16 = tl.constexpr(frag_asm(4, 1)), tl.constexpr(frag_asm(4, 2))
_ASM_W8_M8, _ASM_W8_M16 = tl.constexpr(frag_asm(8, 1)), tl.constexpr(frag_asm(8, 2))
_CON_W4_M8, _CON_W4_M16 = tl.constexpr(frag_constraints(4, 1)), tl.constexpr(frag_constraints(4, 2))
_CON_W8_M8, _CON_W8_M16 = tl.constexpr(frag_constraints(8, 1)), tl.constexpr(frag_constraints(8, 2))


@triton.jit
def _chunk_mma(acc0, acc1, words, xf, clo, chi, BITS: tl.constexpr, M_BLOCKS: tl.constexpr):
    """One chunk's MMAs (frag_asm) on the lanes' fragments; acc0, acc1 int64 [T, 4] (fp32 pairs)."""
    if BITS == 4:
        if M_BLOCKS == 1:
            acc0 = tl.inline_asm_elementwise(_ASM_W4_M8, _CON_W4_M8, [words, xf, clo, chi, acc0], dtype=tl.int64,
                                             is_pure=True, pack=4)
        else:
            acc0, acc1 = tl.inline_asm_elementwise(_ASM_W4_M16, _CON_W4_M16, [words, xf, clo, chi, acc0, acc1],
                                                   dtype=(tl.int64, tl.int64), is_pure=True, pack=4)
    else:
        if M_BLOCKS == 1:
            acc0 = tl.inline_asm_elementwise(_ASM_W8_M8, _CON_W8_M8, [words, xf, clo, acc0], dtype=tl.int64,
                                             is_pure=True, pack=4)
        else:
            acc0, acc1 = tl.inline_asm_elementwise(_ASM_W8_M16, _CON_W8_M16, [words, xf, clo, acc0, acc1],
                                                   dtype=(tl.int64, tl.int64), is_pure=True, pack=4)
    return acc0, acc1


@triton.jit
def _fp32_pair(acc):
    """int64 [T, 4] holding fp32 pairs -> (low, high) fp32 [T, 4]: the rows 2c and 2c + 1."""
    lo = (acc & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    hi = (acc >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _emulated_codes(w_ptr, kb, rows_k, n, n_ok, z, stride_wk, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The interpreter's codes minus zero points, (q - z) fp32 [T, 4, BLOCK_K], of the block at K
    column kb for each lane's 4 columns n."""
    EPW: tl.constexpr = 32 // BITS
    k = kb + tl.arange(0, BLOCK_K)
    wk = tl.load(w_ptr + (k // EPW)[None, None, :] * stride_wk + n[:, :, None],
                 mask=((k // EPW) < rows_k)[None, None, :] & n_ok[:, :, None], other=0)
    q = (wk >> (nibble_slot(k, BITS) * BITS)[None, None, :]) & ((1 << BITS) - 1)
    return q.to(tl.float32) - z.to(tl.float32)[:, :, None]


@triton.jit
def _emulated_sums(qz, x_ptr, kb, rows_k, row, M, stride_xm, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The interpreter's block sums for x row `row` [T] of each lane: sum over the block's K of
    x[row] (q - z) for the lane's 4 columns, what its C fragment holds after the block's MMAs."""
    k = kb + tl.arange(0, BLOCK_K)
    xr = tl.load(x_ptr + row[:, None] * stride_xm + k[None, :],
                 mask=(row < M)[:, None] & ((k // (32 // BITS)) < rows_k)[None, :], other=0.0).to(tl.float32)
    return tl.sum(qz * xr[:, None, :], axis=2)


@triton.jit
def _scales(s_ptr, z_ptr, grp, n, n_ok, stride_sg, BITS: tl.constexpr, ZERO_MODE: tl.constexpr, EVEN_N: tl.constexpr):
    """Group grp's scales (fp32) and zero points (int32) of columns n [T, 4]."""
    if EVEN_N:
        s = tl.load(s_ptr + grp * stride_sg + n).to(tl.float32)
    else:
        s = tl.load(s_ptr + grp * stride_sg + n, mask=n_ok, other=0.0).to(tl.float32)
    if ZERO_MODE == 0:
        z = tl.full(n.shape, 8 if BITS == 4 else 128, dtype=tl.int32)
    elif EVEN_N:
        z = tl.load(z_ptr + grp * stride_sg + n).to(tl.int32)
    else:
        z = tl.load(z_ptr + grp * stride_sg + n, mask=n_ok, other=0).to(tl.int32)
    return s, z


@triton.jit
def _block_group(blk, last_grp, GROUP_BLOCKS: tl.constexpr):
    """The group of block blk. A super-block may run past K in a partial last slice: those blocks
    read the last group's scales (and zero words and x, so they add nothing)."""
    return 0 if GROUP_BLOCKS == 0 else tl.minimum(blk // GROUP_BLOCKS, last_grp)


@triton.jit
def _block_loads(blk, last_grp, w_lanes, ns, x_units, x_ok, quad, s_ptr, z_ptr, rows_k, N, stride_wk, stride_sg,
                 BITS: tl.constexpr, ZERO_MODE: tl.constexpr, TILES: tl.constexpr, CHUNKS: tl.constexpr,
                 GROUP_BLOCKS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, FULL_M: tl.constexpr):
    """Everything block blk reads: per tile its chunks' words, scales and zero points; per chunk the
    lanes' x fragments (shared by the tiles)."""
    ROWS: tl.constexpr = CHUNKS * 4  # word rows a block
    grp = _block_group(blk, last_grp, GROUP_BLOCKS)
    words = ()
    scales = ()
    for tile in tl.static_range(TILES):
        tile_words = ()
        for ch in tl.static_range(CHUNKS):
            row0 = blk * ROWS + 4 * ch  # the chunk's first word row
            if EVEN_N and EVEN_K:
                tile_words += (tl.load(w_lanes[tile] + row0 * stride_wk),)
            else:
                r_ok = (row0 + quad) < rows_k
                tile_words += (tl.load(w_lanes[tile] + row0 * stride_wk, mask=r_ok[:, None] & (ns[tile] < N), other=0),)
        words += (tile_words,)
        scales += (_scales(s_ptr, z_ptr, grp, ns[tile], ns[tile] < N, stride_sg, BITS, ZERO_MODE, EVEN_N),)
    xfs = ()
    for ch in tl.static_range(CHUNKS):
        row0 = blk * ROWS + 4 * ch
        if FULL_M and EVEN_K:
            xfs += (tl.load(x_units + 2 * row0),)
        elif EVEN_K:
            xfs += (tl.load(x_units + 2 * row0, mask=x_ok, other=0),)
        else:
            xfs += (tl.load(x_units + 2 * row0, mask=x_ok & ((row0 + quad) < rows_k)[:, None], other=0),)
    return words, xfs, scales


@triton.jit
def _block_update(totals, loads, BITS: tl.constexpr, TILES: tl.constexpr, CHUNKS: tl.constexpr,
                  M_BLOCKS: tl.constexpr):
    """totals (per tile: the 4 [T, 4] sums of x rows 2c, 2c + 1, 8 + 2c, 9 + 2c) += one block's
    scaled MMA sums."""
    words, xfs, scales = loads
    new = ()
    for tile in tl.static_range(TILES):
        s, z = scales[tile]
        lo, hi = zero_point_operands(z, BITS)
        acc0 = tl.zeros(z.shape, dtype=tl.int64)
        acc1 = tl.zeros(z.shape, dtype=tl.int64)
        for ch in tl.static_range(CHUNKS):
            acc0, acc1 = _chunk_mma(acc0, acc1, words[tile][ch], xfs[ch], lo, hi, BITS, M_BLOCKS)
        new += (add_scaled_block(totals[tile], acc0, acc1, s, M_BLOCKS),)
    return new


@triton.jit
def zero_point_operands(z, BITS: tl.constexpr):
    """frag_asm's per-word constants for zero points z (int32): fp16x2 1024 + z, and for int4
    -(64 + z) (int8 has no second constant: the first is passed twice)."""
    lo = (z | 0x6400) | ((z | 0x6400) << 16)                   # fp16x2 1024 + z
    if BITS == 4:
        hi = (0xD400 | (z << 4)) | ((0xD400 | (z << 4)) << 16)  # fp16x2 -(64 + z) (z < 16)
    else:
        hi = lo
    return lo, hi


@triton.jit
def add_scaled_block(totals, acc0, acc1, s, M_BLOCKS: tl.constexpr):
    """totals (the 4 [T, 4] sums of x rows 2c, 2c + 1, 8 + 2c, 9 + 2c) + s times one block's MMA
    sums acc0 (rows 2c, 2c + 1) and acc1 (8 + 2c, 9 + 2c; M_BLOCKS = 2 only)."""
    t00, t01, t10, t11 = totals
    a0, a1 = _fp32_pair(acc0)
    t00 += s * a0
    t01 += s * a1
    if M_BLOCKS == 2:
        a0, a1 = _fp32_pair(acc1)
        t10 += s * a0
        t11 += s * a1
    return t00, t01, t10, t11


@triton.jit
def _emulated_block_update(totals, blk, last_grp, ns, quad, x_ptr, w_ptr, s_ptr, z_ptr, rows_k, M, N, stride_xm,
                           stride_wk, stride_sg, BITS: tl.constexpr, ZERO_MODE: tl.constexpr, TILES: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_BLOCKS: tl.constexpr):
    """_block_update's sums for the interpreter, from plain loads (no inline PTX there)."""
    grp = _block_group(blk, last_grp, GROUP_BLOCKS)
    new = ()
    for tile in tl.static_range(TILES):
        n = ns[tile]
        s, z = _scales(s_ptr, z_ptr, grp, n, n < N, stride_sg, BITS, ZERO_MODE, False)
        qz = _emulated_codes(w_ptr, blk * BLOCK_K, rows_k, n, n < N, z, stride_wk, BITS, BLOCK_K)
        t00, t01, t10, t11 = totals[tile]
        t00 += s * _emulated_sums(qz, x_ptr, blk * BLOCK_K, rows_k, 2 * quad, M, stride_xm, BITS, BLOCK_K)
        t01 += s * _emulated_sums(qz, x_ptr, blk * BLOCK_K, rows_k, 2 * quad + 1, M, stride_xm, BITS, BLOCK_K)
        t10 += s * _emulated_sums(qz, x_ptr, blk * BLOCK_K, rows_k, 8 + 2 * quad, M, stride_xm, BITS, BLOCK_K)
        t11 += s * _emulated_sums(qz, x_ptr, blk * BLOCK_K, rows_k, 9 + 2 * quad, M, stride_xm, BITS, BLOCK_K)
        new += ((t00, t01, t10, t11),)
    return new


@triton.jit
def _frag_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wk, stride_sg, stride_om,
    BITS: tl.constexpr, ZERO_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr,
    WARPS: tl.constexpr, TILES: tl.constexpr, K_SLICE: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_BLOCKS: tl.constexpr, M_BLOCKS: tl.constexpr, SUPER: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr, FULL_M: tl.constexpr,
):
    """out [M, N] += x [M, K] @ W.T for M <= 16 (M_BLOCKS blocks of 8 rows): program (TILES tiles of
    32 columns a warp, K slice of K_SLICE), scale multiplies every BLOCK_K columns of K
    (GROUP_BLOCKS such blocks a group; 0: one group, per-channel), fp32 atomics at the end.
    EVEN_N, EVEN_K: no partial column tile, no partial K slice; FULL_M: M = 8 M_BLOCKS (no masks
    there). SUPER: blocks whose loads are requested together, before the first of them is
    multiplied (it divides the slice's blocks)."""
    EPW: tl.constexpr = 32 // BITS
    T: tl.constexpr = 32 * WARPS
    CHUNKS: tl.constexpr = BLOCK_K // (4 * EPW)
    release_dependents(PDL)
    t = tl.arange(0, T)
    lane = t % 32
    gid = lane // 4   # the fragment's row group
    quad = lane % 4   # and the lane within it
    col = tl.program_id(0) * (T * TILES) + (t // 32) * (32 * TILES) + 4 * gid
    rows_k = K // EPW
    blocks = tl.cdiv(K, BLOCK_K)
    b_lo = tl.program_id(1) * (K_SLICE // BLOCK_K)
    b_hi = tl.minimum(blocks, b_lo + K_SLICE // BLOCK_K)
    last_grp = 0 if GROUP_BLOCKS == 0 else (blocks - 1) // GROUP_BLOCKS
    # x in 64-bit (int4: 4 fp16) or 32-bit (int8: 2 fp16) units: element e of lane (g, c) is unit
    # 2 r + e % 2 of x row g + 8 (e // 2), r its word row (two units: its 8 or 4 columns)
    e = tl.arange(0, 4)[None, :]
    x_row = gid[:, None] + 8 * (e // 2)
    if BITS == 4:
        x_units = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + x_row * (stride_xm // 4) + 2 * quad[:, None] + e % 2
    else:
        x_units = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + x_row * (stride_xm // 2) + 2 * quad[:, None] + e % 2
    x_ok = (x_row < M) & (e // 2 < M_BLOCKS)
    ns = ()       # per tile: the lane's 4 columns [T, 4]
    w_lanes = ()  # and their words in word row 0 + c
    totals = ()   # and the sums of x rows 2c, 2c + 1, 8 + 2c, 9 + 2c over the slice
    for tile in tl.static_range(TILES):
        n = col[:, None] + 32 * tile + tl.arange(0, 4)[None, :]
        ns += (n,)
        w_lanes += (w_ptr + quad[:, None] * stride_wk + n,)
        zero = tl.zeros([T, 4], dtype=tl.float32)
        totals += ((zero, zero, zero, zero),)
    wait_for_producer(PDL)  # x is the previous kernel's output
    for sb in tl.range(b_lo, b_hi, SUPER, num_stages=1):  # Triton's own pipeline measured 4-6 times slower
        if EMULATE:
            for i in tl.static_range(SUPER):
                totals = _emulated_block_update(totals, sb + i, last_grp, ns, quad, x_ptr, w_ptr, s_ptr, z_ptr, rows_k,
                                                M, N, stride_xm, stride_wk, stride_sg, BITS, ZERO_MODE, TILES, BLOCK_K,
                                                GROUP_BLOCKS)
        else:
            loads = ()
            for i in tl.static_range(SUPER):
                loads += (_block_loads(sb + i, last_grp, w_lanes, ns, x_units, x_ok, quad, s_ptr, z_ptr, rows_k, N,
                                       stride_wk, stride_sg, BITS, ZERO_MODE, TILES, CHUNKS, GROUP_BLOCKS, EVEN_N,
                                       EVEN_K, FULL_M),)
            for i in tl.static_range(SUPER):
                totals = _block_update(totals, loads[i], BITS, TILES, CHUNKS, M_BLOCKS)
    for tile in tl.static_range(TILES):
        n = ns[tile]
        n_ok = n < N
        t00, t01, t10, t11 = totals[tile]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32) * (tl.program_id(1) == 0).to(tl.float32)
            t00 += bias
            t01 += bias
            t10 += bias
            t11 += bias
        _add_rows(out_ptr, t00, 2 * quad, n, n_ok, M, stride_om)
        _add_rows(out_ptr, t01, 2 * quad + 1, n, n_ok, M, stride_om)
        if M_BLOCKS == 2:
            _add_rows(out_ptr, t10, 8 + 2 * quad, n, n_ok, M, stride_om)
            _add_rows(out_ptr, t11, 9 + 2 * quad, n, n_ok, M, stride_om)


@triton.jit
def _add_rows(out_ptr, total, row, n, n_ok, M, stride_om):
    """out[row (one per lane), n] += total [T, 4] with fp32 atomics (split-K)."""
    tl.atomic_add(out_ptr + row[:, None] * stride_om + n, total, mask=(row < M)[:, None] & n_ok, sem="relaxed")


def frag_block_k(lin) -> int | None:
    """Columns of K between scale multiplies for `lin`, or None when this kernel cannot serve it
    (a group smaller than one chunk, or not a whole number of chunks)."""
    chunk = 4 * (32 // lin.bits)
    group = lin.group_size_eff
    if group >= lin.in_features:  # per-channel: any block inside the one group
        return BLOCK_K_MAX
    block = min(group, BLOCK_K_MAX)
    return block if block % chunk == 0 and group % block == 0 else None


def try_frag_gemm(x2: torch.Tensor, lin, out2: torch.Tensor, config: tuple) -> bool:
    """Runs out2 [M, N] += x2 @ W.T with this kernel when `config` (BLOCK_N, K slice, SUPER blocks
    requested together, num_warps, path) selects it (path "frags"; BLOCK_N = 32 num_warps, or 64
    num_warps for two column tiles a warp; 2+ warps; SUPER dividing the slice's blocks) and it applies: 1..16
    rows, integer or symmetric zero points, no act-order, K a multiple of the codes per word, groups
    of whole chunks (int4: 32 columns of K, int8: 16); returns whether it ran. x is read as fp16
    (bf16 is converted first, as the slot kernel does) from rows aligned for its 8- and 16-byte
    loads (copied when they are not)."""
    bn, k_slice, sup, nw, path = config
    m, k = x2.shape
    tiles = bn // (32 * nw)
    if path != FRAG_PATH or not 1 <= m <= 16 or lin.zero_mode_id == 2 or lin.perm is not None:
        return False
    epw = 32 // lin.bits
    block_k = frag_block_k(lin)
    if block_k is None or k % epw or tiles not in (1, 2) or bn != 32 * nw * tiles or k_slice % block_k:
        return False
    if nw < 2:  # one-warp programs give wrong sums on the H200 wherever a K slice spans groups (g32, g128;
        return False  # per-channel is right) and right ones in the interpreter: frag_one_warp.log
    if sup < 1 or (k_slice // block_k) % sup:
        return False
    if x2.dtype != torch.float16:
        x2 = x2.to(torch.float16)
    if x2.stride(0) % 4 or x2.data_ptr() % 16:  # x is read in aligned units of 4 (int4) or 2 (int8) fp16
        x2 = x2.clone(memory_format=torch.contiguous_format)  # stride K: a multiple of 8 (int4) or 4 (int8)
    n = lin.out_features
    group = lin.group_size_eff
    m_blocks = 1 if m <= 8 else 2
    _frag_gemm_kernel[(triton.cdiv(n, bn), triton.cdiv(k, k_slice))](
        x2, lin.words, lin.scales, lin.zeros_or_offsets, lin.bias, out2,
        m, n, k, x2.stride(0), lin.words.stride(0), lin.scales.stride(0), out2.stride(0),
        BITS=lin.bits, ZERO_MODE=lin.zero_mode_id, HAS_BIAS=lin.bias is not None, EMULATE=INTERPRET,
        WARPS=nw, TILES=tiles, K_SLICE=k_slice, BLOCK_K=block_k, GROUP_BLOCKS=0 if group >= k else group // block_k,
        M_BLOCKS=m_blocks, SUPER=sup, EVEN_N=n % bn == 0, EVEN_K=k % k_slice == 0, FULL_M=m == 8 * m_blocks,
        num_warps=nw, maxnreg=MAX_REGISTERS if sup == 1 else MAX_REGISTERS_SUPER, **pdl_launch(x2),
    )
    return True
