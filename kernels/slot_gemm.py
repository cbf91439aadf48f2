"""Decode GEMM for a few rows (M = 2..16): out (fp32) += x @ W.T over packed int4/int8 weights
(the layout of kernels.layout), on tensor cores, each packed word read once.

Why a kernel of its own: the general kernel (kernels.qmatmul) unpacks a [BLOCK_K, BLOCK_N] tile by
reading each word row once per code it holds and shifting every code separately, about 78
instructions per int4 word in its sm_90 code; at M = 16 the tensor cores leave the unpacking as the
whole cost. Here a word becomes its EPW codes as exact fp16 (code - center) by bit tricks
(10 instructions per int4 word, `_unpack_asm`; about 26 per word in all), and
the K sum is split by code slot: slot j of word row r is column k = EPW r + j of x, so

    sum_k x[m, k] (q[k, n] - center) = sum_j  x[:, j::EPW] @ slot_j        (EPW dots of K = word rows)

with no reshuffle of the codes: each slot is a [rows, BLOCK_N] tile in the words' own layout, and
each x_j a [16, rows] piece of the slice's x, read whole (a few KB per program, from L2) and split
into its slots in registers (`_slot_xs`). The dots accumulate in fp32; the
scale, zero point and center are applied once per group afterwards (kernels._common.group_contribution).

A program owns one K slice inside one group (or a whole number of word rows of a per-channel
weight) and TILES column tiles, and adds each tile's [16, BLOCK_N] outputs with fp32 atomics
(split-K, as the M = 1 kernels). The slice must hold at least 16 word rows (the tensor-core K): int4 group
sizes of 128 and up, int8 of 64 and up; other weights keep the general kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, group_contribution, load_2d, nibble_slot
from .pdl import pdl_launch, release_dependents, wait_for_producer

# int4 codes -> exact fp16 (q - 8): LOP3 or-s a low nibble (lo4) or a high one (hi4) of each half
# into the mantissa of 1024.0 (m), giving 1024 + q or 1024 + 16 q; minus 1032 (c), or times 1/16
# (r16) minus 72 (k72), leaves q - 8. The constants live in registers (f16x2 arithmetic takes no
# immediates); ptxas folds them.
INT4_CONSTANT_REGS = "m, c, lo4, hi4, r16, k72"
INT4_CONSTANTS = ["mov.b32 m, 0x64006400;", "mov.b32 c, 0x64086408;", "mov.b32 lo4, 0x000F000F;",
                  "mov.b32 hi4, 0x00F000F0;", "mov.b32 r16, 0x2C002C00;", "mov.b32 k72, 0xD480D480;"]


def int4_to_centered(dst: str, src: str, mask: str) -> tuple[str, str]:
    """The two PTX lines that make fp16x2 dst (q - 8 of the nibbles `mask` selects in each half of
    src: "lo4" or "hi4"): the LOP3, then the centering (callers may put other lines between)."""
    center = f"sub.f16x2 {dst}, {dst}, c;" if mask == "lo4" else f"fma.rn.f16x2 {dst}, {dst}, r16, k72;"
    return f"lop3.b32 {dst}, {src}, {mask}, m, 0xEA;", center


MIN_ROWS = 16  # word rows per slice: the K of one tensor-core dot
SLOT_PATHS = ("slots", "slots-unrolled")  # the tuned configs' names of this kernel (see _slot_gemm_kernel)


def _unpack_asm(bits: int) -> str:
    """PTX: two packed words of one column, word rows r and r + 1 ($EPW, $EPW+1) -> for each slot j
    the fp16x2 (code j of row r, code j of row r + 1) minus the center ($j): the register a
    tensor-core B operand holds (two consecutive K of one column), so no repacking follows.

    int4 (pair-interleaved, kernels.layout: slots 2i, 2i + 1 in nibbles i, i + 4): PRMT joins the
    words' low halves (nibbles 0-3 of both) and their high halves (nibbles 4-7); LOP3 or-s one
    nibble of each word into the mantissas of an fp16x2 1024.0, straight or after a shift by 8;
    low nibbles read 1024 + q (minus 1032 leaves q - 8), high ones 1024 + 16 q (times 1/16 minus
    72 leaves q - 8). 10 instructions per word. int8: PRMT takes byte j of each word, LOP3 sets
    0x64 above them, minus 1152 leaves q - 128. 6 instructions per word."""
    if bits == 4:
        body = INT4_CONSTANTS + [
            "prmt.b32 lo, $8, $9, 0x5410;",      # nibbles 0-3 of both words: slots 0, 2, 4, 6
            "prmt.b32 hi, $8, $9, 0x7632;",      # nibbles 4-7: slots 1, 3, 5, 7
            "shr.u32 lo8, lo, 8;", "shr.u32 hi8, hi, 8;"]
        for slot, (src, mask) in enumerate([("lo", "lo4"), ("hi", "lo4"), ("lo", "hi4"), ("hi", "hi4"),
                                            ("lo8", "lo4"), ("hi8", "lo4"), ("lo8", "hi4"), ("hi8", "hi4")]):
            body += int4_to_centered(f"${slot}", src, mask)
        regs = f".reg .b32 lo, hi, lo8, hi8, {INT4_CONSTANT_REGS};"
    else:
        body = ["mov.b32 m, 0x64006400; mov.b32 c, 0x64806480; mov.b32 ff, 0x00FF00FF;"]
        for slot in range(4):
            body.append(f"prmt.b32 ${slot}, $4, $5, 0x{slot + 4:x}{slot + 4:x}{slot:x}{slot:x};")   # (byte j of r, of r + 1)
            body.append(f"lop3.b32 ${slot}, ${slot}, ff, m, 0xEA;")
            body.append(f"sub.f16x2 ${slot}, ${slot}, c;")
        regs = ".reg .b32 m, c, ff;"
    return "{\n" + regs + "\n" + "\n".join(body) + "\n}"


_UNPACK_W4 = tl.constexpr(_unpack_asm(4))
_UNPACK_W8 = tl.constexpr(_unpack_asm(8))


@triton.jit
def _slot(w, j: tl.constexpr, BITS: tl.constexpr):
    """Plain-Triton code of slot j (column EPW r + j) minus the center, as fp16 (the interpreter's path)."""
    code = (w >> (nibble_slot(j, BITS) * BITS)) & ((1 << BITS) - 1)
    return (code.to(tl.float32) - (8.0 if BITS == 4 else 128.0)).to(tl.float16)


@triton.jit
def _slot_xs(x_ptr, rows, m_ok, stride_xm, perm_ptr, r, r_ok, HAS_PERM: tl.constexpr, BITS: tl.constexpr,
             ROWS: tl.constexpr):
    """x[:, EPW r + j] as fp16 [16, ROWS] for each slot j (int8: slots 0..3, then those again), and
    the slice's sum of x per row [16, 1] in fp32. The slice is read once, whole, then split into
    its slots in registers: reading each slot's columns on their own (stride EPW) took 8 times the
    L1 sectors on int4, and L1 was the kernel's busiest unit (Nsight Compute,
    benchmarks/results/h200/ncu_slot_w4_m16_4096x14336.txt)."""
    EPW: tl.constexpr = 32 // BITS
    kj = EPW * r[:, None] + tl.arange(0, EPW)[None, :]                                 # [ROWS, EPW]
    if HAS_PERM:
        kj = tl.load(perm_ptr + kj, mask=r_ok[:, None], other=0)
    x = tl.load(x_ptr + rows[:, None, None] * stride_xm + kj[None, :, :],
                mask=m_ok[:, None, None] & r_ok[None, :, None], other=0.0).to(tl.float16)   # [16, ROWS, EPW]
    xs = tl.sum(tl.sum(x.to(tl.float32), axis=2), axis=1)[:, None]
    # the last dim's index is slot j; each split halves it by its lowest bit
    even, odd = tl.split(tl.reshape(x, (16, ROWS, EPW // 2, 2)))                      # slots 2i, 2i + 1
    if BITS == 4:
        e0, e1 = tl.split(tl.reshape(even, (16, ROWS, 2, 2)))                          # slots {0, 4}, {2, 6}
        o0, o1 = tl.split(tl.reshape(odd, (16, ROWS, 2, 2)))                           # slots {1, 5}, {3, 7}
        x0, x4 = tl.split(e0)
        x2, x6 = tl.split(e1)
        x1, x5 = tl.split(o0)
        x3, x7 = tl.split(o1)
        return x0, x1, x2, x3, x4, x5, x6, x7, xs
    else:
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        return x0, x1, x2, x3, x0, x1, x2, x3, xs


@triton.jit
def _tile_dots(w, x0, x1, x2, x3, x4, x5, x6, x7, BITS: tl.constexpr, EMULATE: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum_j x_j @ (codes of slot j - center) for one tile of words w [R, BLOCK_N] (int8: slots 0..3)."""
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    if EMULATE:
        acc = tl.dot(x0, _slot(w, 0, BITS), acc)
        acc = tl.dot(x1, _slot(w, 1, BITS), acc)
        acc = tl.dot(x2, _slot(w, 2, BITS), acc)
        acc = tl.dot(x3, _slot(w, 3, BITS), acc)
        if BITS == 4:
            acc = tl.dot(x4, _slot(w, 4, BITS), acc)
            acc = tl.dot(x5, _slot(w, 5, BITS), acc)
            acc = tl.dot(x6, _slot(w, 6, BITS), acc)
            acc = tl.dot(x7, _slot(w, 7, BITS), acc)
    elif BITS == 4:
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            _UNPACK_W4, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [w], dtype=(tl.float16,) * 8, is_pure=True, pack=2)
        acc = tl.dot(x0, c0, acc)
        acc = tl.dot(x1, c1, acc)
        acc = tl.dot(x2, c2, acc)
        acc = tl.dot(x3, c3, acc)
        acc = tl.dot(x4, c4, acc)
        acc = tl.dot(x5, c5, acc)
        acc = tl.dot(x6, c6, acc)
        acc = tl.dot(x7, c7, acc)
    else:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            _UNPACK_W8, "=r,=r,=r,=r,r,r", [w], dtype=(tl.float16,) * 4, is_pure=True, pack=2)
        acc = tl.dot(x0, c0, acc)
        acc = tl.dot(x1, c1, acc)
        acc = tl.dot(x2, c2, acc)
        acc = tl.dot(x3, c3, acc)
    return acc


@triton.jit
def _slot_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr,
    M, N, K, group_size, stride_xm, stride_wk, stride_sg, stride_om,
    BITS: tl.constexpr, ZERO_MODE: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    EMULATE: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr,
    EVEN: tl.constexpr, UNROLLED: tl.constexpr,
):
    """out [M, N] += x [M, K] @ W.T for M <= 16: program (TILES column tiles of BLOCK_N, K slice of
    ROWS word rows inside one group). The slice's x columns are loaded once for all tiles. The
    tiles' words stream in one of two ways: Triton's pipelined loop copies the next tiles' words
    to shared memory while the current one is multiplied; or (UNROLLED) the tiles are unrolled,
    the first one requested before the PDL wait and each next one into registers before the
    current one's dots, which keeps x's operand fragments in registers too (no shared-memory
    reload of x per tile). UNROLLED wins the 4096 x 4096 shapes, the pipelined loop the larger
    ones (H200, benchmarks/results/h200/ab_slot_prefetch.log). EVEN: the tiles are whole (no masks
    on the words)."""
    EPW: tl.constexpr = 32 // BITS
    OFFSET: tl.constexpr = -8.0 if BITS == 4 else -128.0  # what the codes carry besides q: -center
    release_dependents(PDL)
    n0 = tl.program_id(0) * TILES * BLOCK_N
    r = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    r_ok = r < K // EPW
    k0 = tl.program_id(1) * ROWS * EPW
    g = k0 // group_size
    if UNROLLED:  # no kernel of the step writes weights: the first tile is requested before the wait
        w, s, z = _slot_tile(w_ptr, s_ptr, z_ptr, r, r_ok, g, n0 + tl.arange(0, BLOCK_N), N, stride_wk, stride_sg,
                             ZERO_MODE, EVEN)
    wait_for_producer(PDL)  # x is the previous kernel's output
    rows = tl.arange(0, 16)
    m_ok = rows < M
    # xs: the sum of x over the slice as the dots see it (fp16), for the zero point and the center
    x0, x1, x2, x3, x4, x5, x6, x7, xs = _slot_xs(x_ptr, rows, m_ok, stride_xm, perm_ptr, r, r_ok, HAS_PERM, BITS, ROWS)
    if UNROLLED:
        for i in tl.static_range(TILES):
            n = n0 + i * BLOCK_N + tl.arange(0, BLOCK_N)
            if i + 1 < TILES:  # in flight while tile i is multiplied
                w_next, s_next, z_next = _slot_tile(w_ptr, s_ptr, z_ptr, r, r_ok, g, n + BLOCK_N, N, stride_wk, stride_sg,
                                                    ZERO_MODE, EVEN)
            acc = _tile_dots(w, x0, x1, x2, x3, x4, x5, x6, x7, BITS, EMULATE, BLOCK_N)
            _add_tile(out_ptr, bias_ptr, acc, xs, s, z, rows, m_ok, n, N, k0, stride_om, BITS, ZERO_MODE, OFFSET, HAS_BIAS)
            if i + 1 < TILES:
                w, s, z = w_next, s_next, z_next
    else:
        for i in tl.range(0, TILES):
            n = n0 + i * BLOCK_N + tl.arange(0, BLOCK_N)
            w, s, z = _slot_tile(w_ptr, s_ptr, z_ptr, r, r_ok, g, n, N, stride_wk, stride_sg, ZERO_MODE, EVEN)
            acc = _tile_dots(w, x0, x1, x2, x3, x4, x5, x6, x7, BITS, EMULATE, BLOCK_N)
            _add_tile(out_ptr, bias_ptr, acc, xs, s, z, rows, m_ok, n, N, k0, stride_om, BITS, ZERO_MODE, OFFSET, HAS_BIAS)


@triton.jit
def _slot_tile(w_ptr, s_ptr, z_ptr, r, r_ok, g, n, N, stride_wk, stride_sg, ZERO_MODE: tl.constexpr, EVEN: tl.constexpr):
    """The words [ROWS, BLOCK_N] of the slice's rows r for columns n, and their group's scales and
    zeros [1, BLOCK_N] as fp32."""
    n_ok = n < N
    w = load_2d(w_ptr, r, r_ok, n, n_ok, stride_wk, EVEN)
    s = tl.load(s_ptr + g * stride_sg + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ZERO_MODE != 0:
        z = tl.load(z_ptr + g * stride_sg + n, mask=n_ok, other=0).to(tl.float32)[None, :]
    else:
        z = s  # unused
    return w, s, z


@triton.jit
def _add_tile(out_ptr, bias_ptr, acc, xs, s, z, rows, m_ok, n, N, k0, stride_om, BITS: tl.constexpr,
              ZERO_MODE: tl.constexpr, OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Adds one tile's dots acc [16, BLOCK_N], scaled and zero-corrected, (+ the bias, once: by the
    first K slice) to out's M rows with fp32 atomics."""
    n_ok = n < N
    acc = group_contribution(acc, xs, s, z, BITS, ZERO_MODE, OFFSET)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :] * (k0 == 0).to(tl.float32)
    tl.atomic_add(out_ptr + rows[:, None] * stride_om + n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :],
                  sem="relaxed")


def slot_rows(lin, block_k: int) -> int | None:
    """Word rows per K slice for `lin` (at most block_k columns, a power of two inside one group),
    or None when no slice of at least MIN_ROWS word rows fits in a group."""
    epw = 32 // lin.bits
    group = lin.group_size_eff
    rows = block_k // epw
    while rows >= MIN_ROWS:
        if group >= lin.in_features or group % (rows * epw) == 0:
            return rows
        rows //= 2
    return None


def try_slot_gemm(x2: torch.Tensor, lin, out2: torch.Tensor, config: tuple) -> bool:
    """Runs out2 [M, N] += x2 @ W.T with the slot kernel when `config` (BLOCK_N, BLOCK_K, column
    tiles per program, num_warps, path) selects it ("slots", or "slots-unrolled": the column tiles
    unrolled, see _slot_gemm_kernel) and it applies (2..16 rows, K a multiple of the codes per
    word, a slice of at least 16 word rows inside one group); returns whether it ran."""
    bn, bk, tiles, nw, path = config
    m, k = x2.shape
    if path not in SLOT_PATHS or not 1 <= m <= 16 or k % (32 // lin.bits):
        return False
    rows = slot_rows(lin, bk)
    if rows is None:
        return False
    n = lin.out_features
    word_rows = k * lin.bits // 32
    tiles = max(1, min(tiles, triton.cdiv(n, bn)))  # no program of tiles wholly past N
    _slot_gemm_kernel[(triton.cdiv(n, bn * tiles), triton.cdiv(word_rows, rows))](
        x2, lin.words, lin.scales, lin.zeros_or_offsets, lin.perm, lin.bias, out2,
        m, n, k, lin.group_size_eff, x2.stride(0), lin.words.stride(0), lin.scales.stride(0), out2.stride(0),
        BITS=lin.bits, ZERO_MODE=lin.zero_mode_id, HAS_PERM=lin.perm is not None, HAS_BIAS=lin.bias is not None,
        EMULATE=INTERPRET, BLOCK_N=bn, ROWS=rows, TILES=tiles, EVEN=n % (bn * tiles) == 0 and word_rows % rows == 0,
        UNROLLED=path == "slots-unrolled", num_warps=nw, **pdl_launch(x2),
    )
    return True
