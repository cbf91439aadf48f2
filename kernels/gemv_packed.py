"""Packed decode GEMV: out (fp32) += x @ W.T for ONE activation row over packed int4/int8 weights
(the layout of kernels.layout), with integer dot products (dp2a) instead of float arithmetic.

Why a kernel of its own: at M = 1 the dequant-fused GEMV is bound by instructions and latency on
Hopper, not by its loads (Nsight Compute, benchmarks/results/h200/ncu_gemv_w4_4096x14336*.txt; a
kernel that only reads the same tiles reaches the full bandwidth, probe_gemv.json). So what counts
is instructions per packed word and keeping loads in flight while computing.

The math: each program quantizes its K slice of x to 16-bit integers (step = the slice's absmax /
XQ_MAX), and one dp2a instruction multiplies two of them by two code bytes and accumulates in
int32. The codes stay raw (no centering, no conversion to float): an int4 word costs a PRMT, two
ANDs and four dp2a (`_int_dot_asm`), an int8 word two dp2a; a chain of word rows (MAX_CHAIN) sums
into one int32, and each group's sum becomes fp32 once, where the scales and zero points apply
(kernels._common.group_contribution). The sums are exact: the only rounding is x's, 2^-15 of the
slice's largest |x|, finer than fp16 for every value within 16x of that maximum. Against the
fp16x2 math it replaced (codes made exact fp16 by bit tricks, two products per HFMA2, fp16 chain
sums), sm_90 code takes a third fewer instructions per int4 word (17.6 -> 11.0 at 4 column tiles,
22.3 -> 15.0 at one) and 45% fewer per int8 word; on an H200 the isolated GEMVs got 5-10% faster,
8B w4 decode 2.2% and 1B w4 9.7% (benchmarks/results/h200/ab_int_dot.log).

A program takes one K slice across several column tiles, so the slice's activations are
quantized and regrouped into pairs once and the next tile loads while the current one is
multiplied. Used by kernels.qmatmul.qmatmul_accumulate when the tuned config picks the "packed"
path (BLOCK_N, BLOCK_K, K_ITERS = column tiles per program, num_warps), and by the decode step
where a GEMV forms its own input, saving the launch that would have written it: down_proj with the
SwiGLU (`qmatmul_accumulate_swiglu`), o_proj with flash-decoding's splits merged
(`qmatmul_accumulate_attention`), q|k|v and gate|up with the RMSNorm before them deferred
(`qmatmul_accumulate_deferred_norm`: h times the norm's weight, and the sum of h^2 for the
kernel that applies the norm's scale to the output).
On the CPU interpreter (no PTX) the EMULATE branch computes the same integer sums in plain Triton.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, group_contribution, load_2d
from .flash_decode import merge_splits
from .pdl import pdl_launch, release_dependents, wait_for_producer
from .rmsnorm import DeferredNorm, deferred_rms_scale
from .swiglu import silu_times


def _int_dot_asm(bits: int, words: int) -> str:
    """PTX for one output: the exact int32 sum over `words` packed words (operands $1..) of q x, q
    the raw codes and x the slice's activations as 16-bit integers, given as pairs (operands after
    the words, PAIRS per word, in order: pair p holds columns 2p, 2p + 1 of the word, low half
    first). dp2a.lo / dp2a.hi multiply the two 16-bit x of a pair by bytes (0, 1) / (2, 3) of a
    code register and add to an int32.
    int4 (pair-interleaved, kernels.layout: columns 2i, 2i + 1 in nibbles i, i + 4): PRMT swaps
    the word's middle bytes, so that one AND leaves the low nibbles as bytes holding columns
    (0, 1, 4, 5) and another the high nibbles (2, 3, 6, 7), as 16 q: their sum is shifted back
    once per chain (exact: every term is a multiple of 16). int8: bytes are columns 0..3."""
    pairs = 4 if bits == 4 else 2
    body = [".reg .b32 a, b, sa, sb;", "mov.b32 sa, 0;", "mov.b32 sb, 0;"]
    for i in range(words):
        w = f"${1 + i}"
        x = [f"${1 + words + i * pairs + p}" for p in range(pairs)]
        if bits == 4:
            body += [f"prmt.b32 a, {w}, 0, 0x3120;", "and.b32 b, a, 0xF0F0F0F0;", "and.b32 a, a, 0x0F0F0F0F;",
                     f"dp2a.lo.s32.u32 sa, {x[0]}, a, sa;", f"dp2a.hi.s32.u32 sa, {x[2]}, a, sa;",
                     f"dp2a.lo.s32.u32 sb, {x[1]}, b, sb;", f"dp2a.hi.s32.u32 sb, {x[3]}, b, sb;"]
        else:
            body += [f"dp2a.lo.s32.u32 sa, {x[0]}, {w}, sa;", f"dp2a.hi.s32.u32 sa, {x[1]}, {w}, sa;"]
    body += ["shr.s32 sb, sb, 4;", "add.s32 $0, sa, sb;"] if bits == 4 else ["mov.b32 $0, sa;"]
    return "{\n" + "\n".join(body) + "\n}"


_DOT_W4 = tl.constexpr(_int_dot_asm(4, 1))
_DOT_W4_CHAIN2 = tl.constexpr(_int_dot_asm(4, 2))
_DOT_W4_CHAIN4 = tl.constexpr(_int_dot_asm(4, 4))
_DOT_W8 = tl.constexpr(_int_dot_asm(8, 1))
_DOT_W8_CHAIN2 = tl.constexpr(_int_dot_asm(8, 2))


@triton.jit
def _pair_products(w, xp, lo_shift: tl.constexpr, BITS: tl.constexpr, hi_gap: tl.constexpr):
    """q_lo x_lo + q_hi x_hi (int32) for the codes at bits lo_shift and lo_shift + hi_gap of w and
    the two 16-bit integers of pair xp (low half first): one dp2a, in plain Triton."""
    mask: tl.constexpr = (1 << BITS) - 1
    q_lo = (w >> lo_shift) & mask
    q_hi = (w >> (lo_shift + hi_gap)) & mask
    return q_lo * ((xp << 16) >> 16) + q_hi * (xp >> 16)


@triton.jit
def _word_products(w, xp0, xp1, xp2, xp3, BITS: tl.constexpr):
    """Plain-Triton sum_j q_j x_j (int32) of each word from its pairs (pair p: columns 2p, 2p + 1)."""
    if BITS == 4:
        return (_pair_products(w, xp0, 0, 4, 16) + _pair_products(w, xp1, 4, 4, 16)
                + _pair_products(w, xp2, 8, 4, 16) + _pair_products(w, xp3, 12, 4, 16))
    else:
        return _pair_products(w, xp0, 0, 8, 8) + _pair_products(w, xp1, 16, 8, 8)


@triton.jit
def _chain_products(w, x, BITS: tl.constexpr, CHAIN: tl.constexpr, EMULATE: tl.constexpr):
    """The exact int32 sum q x over the CHAIN word rows of each chain: w a tuple of 4 word tensors
    (the first CHAIN used), x[4 r + p] pair p of row r (int8 words use two pairs; int8 chains are
    at most 2 rows, MAX_CHAIN). EMULATE: the same sums in plain Triton, for the CPU interpreter,
    which cannot run PTX."""
    if EMULATE:
        d = _word_products(w[0], x[0], x[1], x[2], x[3], BITS)
        for r in tl.static_range(1, CHAIN):
            d += _word_products(w[r], x[4 * r], x[4 * r + 1], x[4 * r + 2], x[4 * r + 3], BITS)
        return d
    elif BITS == 4:
        if CHAIN == 4:
            return tl.inline_asm_elementwise(_DOT_W4_CHAIN4, "=r" + ",r" * 20,
                                             [w[0], w[1], w[2], w[3], x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7],
                                              x[8], x[9], x[10], x[11], x[12], x[13], x[14], x[15]],
                                             dtype=tl.int32, is_pure=True, pack=1)
        elif CHAIN == 2:
            return tl.inline_asm_elementwise(_DOT_W4_CHAIN2, "=r" + ",r" * 10,
                                             [w[0], w[1], x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(_DOT_W4, "=r" + ",r" * 5, [w[0], x[0], x[1], x[2], x[3]],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        if CHAIN == 2:
            return tl.inline_asm_elementwise(_DOT_W8_CHAIN2, "=r" + ",r" * 6, [w[0], w[1], x[0], x[1], x[4], x[5]],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(_DOT_W8, "=r" + ",r" * 3, [w[0], x[0], x[1]],
                                             dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)  # tl.max would drop a NaN


@triton.jit
def _quantize_slice(xk, XQ_MAX: tl.constexpr):
    """The slice's activations xk [BLOCK_K] (fp32) as 16-bit integers (int16, |xq| <= XQ_MAX) and
    their step: xk ~ xq * step, step = max |xk| / XQ_MAX (1 for an all-zero slice; NaN or inf
    when the slice holds one, so that the outputs show it as float math would). int16, not int32:
    Triton then regroups the narrow integers, where with int32 it moved the regrouping up to the
    loaded fp16 x and quantized every value in every lane (64 conversions a lane, not 4)."""
    xmax = tl.reduce(tl.abs(xk), 0, _max_keeping_nan)
    safe_max = tl.where(xmax == 0, 1.0, xmax)
    xq = tl.floor(xk * (XQ_MAX / safe_max) + 0.5).to(tl.int16)
    return xq, safe_max / XQ_MAX


@triton.jit
def _columns(t, PAIRS: tl.constexpr):
    """The PAIRS columns of t [rows, PAIRS] as four [rows] tensors (PAIRS = 2: c0, c1, c0, c1)."""
    if PAIRS == 4:
        c02, c13 = tl.split(tl.reshape(t, (t.shape[0], 2, 2)))   # [rows, 2] each: columns (0, 2), (1, 3)
        c0, c2 = tl.split(c02)
        c1, c3 = tl.split(c13)
        return c0, c1, c2, c3
    else:
        c0, c1 = tl.split(t)
        return c0, c1, c0, c1


@triton.jit
def _tile_pairs(xq, SLOTS: tl.constexpr, CHAIN: tl.constexpr, PAIRS: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The K slice's 16-bit activations xq [BLOCK_K] as the int32 pairs each chain multiplies,
    [SLOTS, BLOCK_N] per (row in chain r, pair p), at 4 r + p of the tuple returned (rows past
    CHAIN repeat row 0, unused): formed once per program in a compact layout and regrouped by
    reshape/split (a pass through shared memory), not loaded or computed again by every thread
    for each of its rows, and kept for all the program's tiles."""
    lo, hi = tl.split(tl.reshape(xq, (BLOCK_K // 2, 2)))
    packed = (lo.to(tl.int32) & 0xFFFF) | (hi.to(tl.int32) << 16)
    pairs = tl.reshape(packed, (SLOTS, CHAIN, PAIRS))                                   # [slot, row in chain, pair]
    if CHAIN == 4:
        # [slot, pair, row // 2, row % 2]: each split takes the lowest bit of the row
        even, odd = tl.split(tl.reshape(tl.permute(pairs, (0, 2, 1)), (SLOTS, PAIRS, 2, 2)))
        r0, r2 = tl.split(even)
        r1, r3 = tl.split(odd)
    elif CHAIN == 2:
        r0, r1 = tl.split(tl.permute(pairs, (0, 2, 1)))
        r2 = r0
        r3 = r0
    else:
        r0 = tl.reshape(pairs, (SLOTS, PAIRS))
        r1 = r0
        r2 = r0
        r3 = r0
    a0, a1, a2, a3 = _columns(r0, PAIRS)
    b0, b1, b2, b3 = _columns(r1, PAIRS)
    c0, c1, c2, c3 = _columns(r2, PAIRS)
    d0, d1, d2, d3 = _columns(r3, PAIRS)
    return (_wide(a0, BLOCK_N), _wide(a1, BLOCK_N), _wide(a2, BLOCK_N), _wide(a3, BLOCK_N),
            _wide(b0, BLOCK_N), _wide(b1, BLOCK_N), _wide(b2, BLOCK_N), _wide(b3, BLOCK_N),
            _wide(c0, BLOCK_N), _wide(c1, BLOCK_N), _wide(c2, BLOCK_N), _wide(c3, BLOCK_N),
            _wide(d0, BLOCK_N), _wide(d1, BLOCK_N), _wide(d2, BLOCK_N), _wide(d3, BLOCK_N))


@triton.jit
def _wide(col, BLOCK_N: tl.constexpr):
    return tl.broadcast_to(col[:, None], (col.shape[0], BLOCK_N))


@triton.jit
def _load_tile(w_ptr, s_ptr, z_ptr, ra, ra_ok, g, g_ok, n, n_ok, stride_wk, stride_sg, K_ROWS,
               ZERO_MODE: tl.constexpr, CHAIN: tl.constexpr, EVEN: tl.constexpr):
    """The words of the program's word rows for columns n: row r of each chain [SLOTS, BLOCK_N] at
    w[r] (rows past CHAIN repeat row 0, unused), and the scales and zeros of its groups g
    [GROUPS, BLOCK_N] as fp32. ra: each chain's first row (ra_ok: inside the weight, K_ROWS rows:
    K may end inside a chain). EVEN: the tile is whole (no masks, no predicate per load)."""
    wa = load_2d(w_ptr, ra, ra_ok, n, n_ok, stride_wk, EVEN, STREAM=True)
    wb = wa
    wc = wa
    wd = wa
    if CHAIN >= 2:
        wb = load_2d(w_ptr, ra + 1, ra + 1 < K_ROWS, n, n_ok, stride_wk, EVEN, STREAM=True)
    if CHAIN == 4:
        wc = load_2d(w_ptr, ra + 2, ra + 2 < K_ROWS, n, n_ok, stride_wk, EVEN, STREAM=True)
        wd = load_2d(w_ptr, ra + 3, ra + 3 < K_ROWS, n, n_ok, stride_wk, EVEN, STREAM=True)
    s = load_2d(s_ptr, g, g_ok, n, n_ok, stride_sg, EVEN).to(tl.float32)
    z = load_2d(z_ptr, g, g_ok, n, n_ok, stride_sg, EVEN).to(tl.float32) if ZERO_MODE != 0 else s  # s: unused
    return (wa, wb, wc, wd), s, z


# where the GEMV's activations come from (SOURCE)
FROM_X = 0           # an fp16 row
FROM_SWIGLU = 1      # silu(gate) * up of the fp32 gate|up accumulator (down_proj)
FROM_SPLITS = 2      # flash-decoding's partial outputs, merged (o_proj)
FROM_RESIDUAL = 3    # the fp32 residual row times the RMSNorm weight, the norm's scale left to the consumer


@triton.jit
def slice_activations(x_ptr, aux_ptr, k0, K, norm_scale, SOURCE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                       HEAD_DIM: tl.constexpr, PIECE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The activations of K slice [k0, k0 + BLOCK_K) as fp32 holding fp16 values (rounded as the
    kernel that would otherwise have written them rounds): x itself; or silu(gate) * up formed from
    the fp32 gate|up accumulator [2K]; or the attention output merged from flash-decoding's
    splits, x = o [NUM_SPLITS, K] and aux = lse [NUM_SPLITS, K / HEAD_DIM] (column k is dim
    k % HEAD_DIM of head k // HEAD_DIM), as its combine kernel would merge them. norm_scale
    multiplies gate and up (the deferred RMSNorm scale of the gate|up GEMV's input, or 1).
    (FROM_RESIDUAL: `residual_slice`.)"""
    k = k0 + tl.arange(0, BLOCK_K)
    if SOURCE == 1:  # FROM_SWIGLU
        gate = tl.load(x_ptr + k, mask=k < K, other=0.0) * norm_scale
        up = tl.load(x_ptr + K + k, mask=k < K, other=0.0) * norm_scale
        return silu_times(gate, up).to(tl.float16).to(tl.float32)
    elif SOURCE == 2:  # FROM_SPLITS
        # the slice as BLOCK_K / PIECE pieces, each inside one head (PIECE divides BLOCK_K and HEAD_DIM)
        CHUNK: tl.constexpr = 8 if NUM_SPLITS > 8 else NUM_SPLITS
        piece = k0 + PIECE * tl.arange(0, BLOCK_K // PIECE)
        merged = merge_splits(x_ptr, aux_ptr, piece[:, None] + tl.arange(0, PIECE)[None, :], piece // HEAD_DIM,
                              piece < K, K, K // HEAD_DIM, NUM_SPLITS, CHUNK)
        return tl.reshape(merged, (BLOCK_K,)).to(tl.float16).to(tl.float32)
    else:
        return tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)


@triton.jit
def residual_slice(h_ptr, norm_w, ss_ptr, k0, K, BLOCK_K: tl.constexpr):
    """K slice [k0, k0 + BLOCK_K) of h * w, h the fp32 residual row and w the RMSNorm weight's
    slice (norm_w, fp32, loaded by the caller), in fp32 and not rounded to fp16 (h * w can exceed
    its range: this kernel makes integers of it from fp32, kernels.gemv_dense multiplies it in
    fp32); the programs of column tile 0 (one per K slice) add the slice's sum of h^2 to ss."""
    k = k0 + tl.arange(0, BLOCK_K)
    h = tl.load(h_ptr + k, mask=k < K, other=0.0)
    if tl.program_id(0) == 0:
        tl.atomic_add(ss_ptr, tl.sum(h * h, axis=0), sem="relaxed")
    return h * norm_w


@triton.jit
def norm_weight_slice(aux_ptr, k0, K, SOURCE: tl.constexpr, BLOCK_K: tl.constexpr):
    """FROM_RESIDUAL: the K slice of the RMSNorm weight (aux), fp32, for decode_gemv_input. No kernel
    of the step writes it, so the GEMVs request it with their weights, before the PDL wait (read
    after it, behind h and its sum of squares, it cost a dependent round trip: 8B w4 -0.5%, 1B w4
    -1.2%, benchmarks/results/h200/ab_early_norm_w.log). Other sources: unused."""
    if SOURCE == 3:
        k = k0 + tl.arange(0, BLOCK_K)
        return tl.load(aux_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    else:
        return 0.0


@triton.jit
def decode_gemv_input(x_ptr, aux_ptr, norm_w, clear_ptr, CLEAR_N, ss_ptr, norm_dim, eps, k0, K, SOURCE: tl.constexpr,
                      NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, PIECE: tl.constexpr, BLOCK_K: tl.constexpr,
                      CLEAR_CHUNK: tl.constexpr, NORM_SCALE: tl.constexpr):
    """What a decode GEMV program does once its producer has completed (after the PDL wait), before
    its products: zero its chunk of `clear` (CLEAR_CHUNK > 0: accumulators the step has read by
    now), and form its K slice's activations xk from SOURCE (slice_activations; FROM_RESIDUAL:
    residual_slice of norm_w, the RMSNorm weight's slice the caller requested before the wait;
    NORM_SCALE: FROM_SWIGLU's gate and up times the deferred RMSNorm scale read from ss_ptr).
    Shared by this module's kernel and kernels.gemv_dense's."""
    if CLEAR_CHUNK > 0:
        offs = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * CLEAR_CHUNK + tl.arange(0, CLEAR_CHUNK)
        tl.store(clear_ptr + offs, tl.zeros([CLEAR_CHUNK], dtype=tl.float32), mask=offs < CLEAR_N)
    if NORM_SCALE:  # FROM_SWIGLU: gate|up's input was h * w; its RMSNorm scale applies here
        norm_scale = deferred_rms_scale(ss_ptr, norm_dim, eps)
    else:
        norm_scale = 1.0
    if SOURCE == 3:  # FROM_RESIDUAL: h * w; one program per K slice adds the slice's squares
        return residual_slice(x_ptr, norm_w, ss_ptr, k0, K, BLOCK_K)
    else:
        return slice_activations(x_ptr, aux_ptr, k0, K, norm_scale, SOURCE, NUM_SPLITS, HEAD_DIM, PIECE, BLOCK_K)


@triton.jit
def _tile_outputs(w, s, z, x, xs, step,
                  BITS: tl.constexpr, ZERO_MODE: tl.constexpr, EMULATE: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUPS: tl.constexpr, SLOTS: tl.constexpr, CHAIN: tl.constexpr):
    """One column tile's share of the outputs [BLOCK_N] (fp32) from its words, scales and zeros,
    the slice's integer activation pairs x (the activations over `step`), and the activations'
    sums per group xs."""
    per_chain = _chain_products(w, x, BITS, CHAIN, EMULATE)  # [SLOTS, BN], exact int32
    if GROUPS == 1:
        d = tl.sum(per_chain, axis=0)[None, :]
    else:  # one partial sum per group, each with its own scale
        d = tl.sum(tl.reshape(per_chain, (GROUPS, SLOTS // GROUPS, BLOCK_N)), axis=1)
    d = d.to(tl.float32) * step
    return tl.sum(group_contribution(d, xs, s, z, BITS, ZERO_MODE, 0.0), axis=0)  # raw codes: no offset


@triton.jit
def _packed_gemv_kernel(
    x_ptr, aux_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, clear_ptr, ss_ptr,
    N, K, group_size, stride_wk, stride_sg, CLEAR_N, norm_dim, eps,
    BITS: tl.constexpr, ZERO_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE: tl.constexpr,
    PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr, GROUPS: tl.constexpr,
    CHAIN: tl.constexpr, EVEN: tl.constexpr, SOURCE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr, PIECE: tl.constexpr, CLEAR_CHUNK: tl.constexpr, NORM_SCALE: tl.constexpr,
    XQ_MAX: tl.constexpr,
):
    """Decode GEMV, M = 1, no act-order: out (fp32) += x @ W.T with integer dot products; x is the
    fp16 row [K], or formed from what precedes the GEMV in the decode step (SOURCE,
    `slice_activations`): silu(gate) * up (NORM_SCALE: of gate and up times the deferred RMSNorm
    scale read from ss_ptr), the merged flash-decoding splits, or h * w (the programs of column
    tile 0 add their K slice's sum of h^2 to ss_ptr).

    Each program owns one K slice of BLOCK_K (BLOCK_K / EPW word rows) and TILES consecutive column
    tiles of BLOCK_N. The slice's activations are read, quantized to 16-bit integers (at most
    XQ_MAX in magnitude: activation_levels) and regrouped into the pairs each word row multiplies
    once (`_tile_pairs`, a pass through shared memory), and serve every tile; the next tile's
    words, scales and zeros are requested before the current one is multiplied, so the program
    keeps loads in flight while it computes. Every word is multiplied by its EPW activations
    (`_chain_products`), CHAIN consecutive word rows (MAX_CHAIN, fewer when a group's rows are not a
    multiple of it) into one int32; each tile's outputs are added to `out` with fp32 atomics. The
    slice spans GROUPS whole groups (or lies inside one: GROUPS = 1). EVEN: every tile is whole (no
    masks). The first tile, and a deferred norm's weight, are requested before waiting for the
    previous kernel (PDL, kernels.pdl): no kernel of the step writes weights."""
    EPW: tl.constexpr = 32 // BITS
    SLOTS: tl.constexpr = BLOCK_K // EPW // CHAIN         # chains of the slice
    PAIRS: tl.constexpr = EPW // 2                        # pairs of x per word
    release_dependents(PDL)
    n0 = tl.program_id(0) * TILES * BLOCK_N
    k0 = tl.program_id(1) * BLOCK_K
    ra = k0 // EPW + CHAIN * tl.arange(0, SLOTS)          # first word row of each chain
    ra_ok = ra < K // EPW
    g = k0 // group_size + tl.arange(0, GROUPS)
    g_ok = g * group_size < K
    n = n0 + tl.arange(0, BLOCK_N)
    w, s, z = _load_tile(w_ptr, s_ptr, z_ptr, ra, ra_ok, g, g_ok, n, n < N, stride_wk, stride_sg, K // EPW,
                         ZERO_MODE, CHAIN, EVEN)
    norm_w = norm_weight_slice(aux_ptr, k0, K, SOURCE, BLOCK_K)
    wait_for_producer(PDL)
    xk = decode_gemv_input(x_ptr, aux_ptr, norm_w, clear_ptr, CLEAR_N, ss_ptr, norm_dim, eps, k0, K, SOURCE,
                           NUM_SPLITS, HEAD_DIM, PIECE, BLOCK_K, CLEAR_CHUNK, NORM_SCALE)
    xq, step = _quantize_slice(xk, XQ_MAX)
    x = _tile_pairs(xq, SLOTS, CHAIN, PAIRS, BLOCK_K, BLOCK_N)
    xk = xq.to(tl.float32) * step  # the activations the products saw, for the zero points' sums
    if GROUPS == 1:
        xs = tl.sum(xk, axis=0)
    else:
        xs = tl.sum(tl.reshape(xk, (GROUPS, BLOCK_K // GROUPS)), axis=1)[:, None]
    for i in tl.static_range(TILES):
        n = n0 + i * BLOCK_N + tl.arange(0, BLOCK_N)
        if i + 1 < TILES:  # in flight while tile i is multiplied
            n_next = n + BLOCK_N
            next_w, next_s, next_z = _load_tile(w_ptr, s_ptr, z_ptr, ra, ra_ok, g, g_ok, n_next, n_next < N,
                                                stride_wk, stride_sg, K // EPW, ZERO_MODE, CHAIN, EVEN)
        acc = _tile_outputs(w, s, z, x, xs, step, BITS, ZERO_MODE, EMULATE, BLOCK_N, GROUPS, SLOTS, CHAIN)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32) * (k0 == 0).to(tl.float32)
        tl.atomic_add(out_ptr + n, acc, mask=n < N, sem="relaxed")
        if i + 1 < TILES:
            w, s, z = next_w, next_s, next_z


def _packed_gemv_applies(x2: torch.Tensor, lin) -> bool:
    """Whether the packed GEMV applies: one fp16 row, K a multiple of the codes per word, no act-order."""
    return (x2.shape[0] == 1 and x2.dtype == torch.float16 and lin.in_features % (32 // lin.bits) == 0
            and lin.perm is None and x2.is_contiguous())


# Word rows per chain (one int32 sum per output), at most: a longer chain adds fewer int32 per word.
# Chosen with the fp16x2 math this kernel had before (int4 chains of 4 against 2: 8B w4 decode
# 1.325 -> 1.317 ms/token on an H200, benchmarks/results/h200/ab_chain4_e2e.log; int8 gained nothing
# measurable from 4), and kept: with integer sums a chain has no overflow to guard against.
MAX_CHAIN = {4: 4, 8: 2}


def activation_levels(block_k: int, bits: int) -> int:
    """The largest |x| of a K slice's activations as integers: 2^14 - 1 (15 bits), or less where a
    slice's int32 sum of block_k codes times x could overflow (int8 codes, block_k > 512)."""
    return min(16383, (2 ** 31 - 1) // (block_k * ((1 << bits) - 1)))


def _packed_gemv_tile(lin, block_k: int) -> tuple[int, int] | None:
    """(BLOCK_K, GROUPS) for the packed GEMV: the K tile (at most block_k, a power of two)
    must hold whole groups (GROUPS = BLOCK_K / group size) or lie inside one group (GROUPS = 1);
    None when no tile of at least one word does."""
    group, k = lin.group_size_eff, lin.in_features
    epw = 32 // lin.bits
    while block_k >= epw:
        if group >= k or group % block_k == 0:
            return block_k, 1
        if block_k % group == 0:
            return block_k, block_k // group
        block_k //= 2
    return None


def _launch_packed_gemv(x2: torch.Tensor, lin, out2: torch.Tensor, bn: int, tile: tuple[int, int], tiles: int, nw: int,
                        source: int = FROM_X, aux: torch.Tensor | None = None, clear: torch.Tensor | None = None,
                        norm: DeferredNorm | None = None, add_bias: bool = True) -> None:
    """norm: for FROM_RESIDUAL, where the row's sum of squares goes; for FROM_SWIGLU, the deferred
    norm of gate|up's input, applied to gate and up."""
    block_k, groups = tile
    k = lin.in_features
    n = lin.out_features
    tiles = max(1, min(tiles, triton.cdiv(n, bn)))  # no program of tiles wholly past N
    rows = block_k * lin.bits // 32
    # a chain stays inside one group
    chain = next(c for c in (4, 2, 1) if c <= MAX_CHAIN[lin.bits] and rows % c == 0 and (rows // groups) % c == 0)
    grid = (triton.cdiv(n, bn * tiles), triton.cdiv(k, block_k))
    _packed_gemv_kernel[grid](
        x2, aux, lin.words, lin.scales, lin.zeros_or_offsets, lin.bias, out2,
        N=n, K=k, group_size=lin.group_size_eff, stride_wk=lin.words.stride(0), stride_sg=lin.scales.stride(0),
        BITS=lin.bits, ZERO_MODE=lin.zero_mode_id, HAS_BIAS=add_bias and lin.bias is not None, EMULATE=INTERPRET,
        BLOCK_N=bn, BLOCK_K=block_k, TILES=tiles, GROUPS=groups, CHAIN=chain,
        EVEN=n % (bn * tiles) == 0 and k % block_k == 0, num_warps=nw,
        XQ_MAX=activation_levels(block_k, lin.bits),
        **decode_input_args(source, aux, clear, norm, k, block_k, grid), **pdl_launch(x2),
    )


def decode_input_args(source: int, aux: torch.Tensor | None, clear: torch.Tensor | None, norm: DeferredNorm | None,
                      k: int, block_k: int, grid: tuple[int, int]) -> dict:
    """The arguments decode_gemv_input reads, as keywords of a decode GEMV launch (this module's and
    kernels.gemv_dense's kernels name them alike): the source, the buffer to clear and each
    program's chunk of it, the deferred norm's sum of squares, dim and eps, the splits' count and
    head size, and the pieces (inside one head) a K slice of block_k merges them in."""
    head_dim = k // aux.shape[1] if source == FROM_SPLITS else 1
    clear_n = 0 if clear is None else clear.numel()
    return dict(
        clear_ptr=clear, ss_ptr=None if norm is None else norm.sum_squares, CLEAR_N=clear_n,
        norm_dim=1 if norm is None else norm.dim, eps=0.0 if norm is None else norm.eps, SOURCE=source,
        NUM_SPLITS=aux.shape[0] if source == FROM_SPLITS else 1, HEAD_DIM=head_dim, PIECE=math.gcd(block_k, head_dim),
        CLEAR_CHUNK=triton.next_power_of_2(triton.cdiv(clear_n, grid[0] * grid[1])) if clear_n else 0,
        NORM_SCALE=norm is not None and source == FROM_SWIGLU,
    )


def packed_gemv_serves(lin, config: tuple[int, int, int, int, bool | str] | None = None) -> bool:
    """Whether `lin`'s decode GEMV is the packed one (K a multiple of the codes per word, no
    act-order, a K tile of whole groups exists), and so can form its own input:
    qmatmul_accumulate_swiglu, qmatmul_accumulate_attention and qmatmul_accumulate_deferred_norm
    serve it."""
    _, bk, _, _, path = config or lin.splitk_config(1)
    return (path == "packed" and lin.in_features % (32 // lin.bits) == 0 and lin.perm is None
            and _packed_gemv_tile(lin, bk) is not None)


def _decode_gemv_config(caller: str, lin, out: torch.Tensor, config, alternative: str) -> tuple:
    """The checks the decode step's input-forming GEMVs share; returns (BLOCK_N, tile, tiles, warps)."""
    if out.dtype != torch.float32 or out.numel() != lin.out_features:
        raise ValueError(f"{caller}: out must be fp32 [1, {lin.out_features}], got {out.dtype} {tuple(out.shape)}")
    if not packed_gemv_serves(lin, config):
        raise ValueError(f"{caller}: no packed GEMV for this linear (bits {lin.bits}, K {lin.in_features}, "
                         f"act-order {lin.perm is not None}, config {config or lin.splitk_config(1)}); use {alternative}")
    bn, bk, tiles, nw, _ = config or lin.splitk_config(1)
    return bn, _packed_gemv_tile(lin, bk), tiles, nw


def qmatmul_accumulate_swiglu(gate_up: torch.Tensor, lin, out: torch.Tensor,
                              config: tuple[int, int, int, int, bool | str] | None = None,
                              norm: DeferredNorm | None = None) -> torch.Tensor:
    """out [1, N] (fp32) += (silu(gate) * up) @ W.T (+ bias) for one decode row, gate_up the fp32
    [1, 2K] gate|up accumulator: the activation is formed inside the packed GEMV, as the
    swiglu kernel would form it, so the decode step needs no swiglu launch. gate_up is only read
    (the caller zeroes it before its next accumulation). `norm`: gate_up was accumulated from an
    un-normalized input (qmatmul_accumulate_deferred_norm), and gate and up are first multiplied
    by its deferred RMSNorm scale. Returns out."""
    check_gate_up("qmatmul_accumulate_swiglu", gate_up, lin.in_features, norm)
    bn, tile, tiles, nw = _decode_gemv_config("qmatmul_accumulate_swiglu", lin, out, config, "swiglu + qmatmul_accumulate")
    _launch_packed_gemv(gate_up, lin, out.view(1, lin.out_features), bn, tile, tiles, nw, source=FROM_SWIGLU, norm=norm)
    return out


# The input checks of the decode GEMVs that form their own input (shared with kernels.gemv_dense)
def _check_norm(caller: str, norm: DeferredNorm | None) -> None:
    if norm is not None and (norm.sum_squares.dtype != torch.float32 or norm.sum_squares.numel() != 1):
        raise ValueError(f"{caller}: the deferred norm's sum of squares must be one fp32 element, got "
                         f"{norm.sum_squares.dtype} {tuple(norm.sum_squares.shape)}")


def check_gate_up(caller: str, gate_up: torch.Tensor, k: int, norm: DeferredNorm | None) -> None:
    if gate_up.dtype != torch.float32 or gate_up.shape != (1, 2 * k) or not gate_up.is_contiguous():
        raise ValueError(f"{caller}: gate_up must be contiguous fp32 [1, {2 * k}], got {gate_up.dtype} {tuple(gate_up.shape)}")
    _check_norm(caller, norm)


def check_residual(caller: str, h: torch.Tensor, norm_weight: torch.Tensor, k: int, norm: DeferredNorm,
                   bias: torch.Tensor | None, bias_to_reader: bool) -> None:
    if h.dtype != torch.float32 or h.shape != (1, k) or not h.is_contiguous():
        raise ValueError(f"{caller}: h must be contiguous fp32 [1, {k}], got {h.dtype} {tuple(h.shape)}")
    if norm_weight.shape != (k,) or not norm_weight.is_contiguous():
        raise ValueError(f"{caller}: the norm weight must be contiguous [{k}], got {tuple(norm_weight.shape)}")
    if bias is not None and not bias_to_reader:
        raise ValueError(f"{caller}: the linear has a bias, which the deferred scale would multiply; leave it to "
                         "the reader (bias_to_reader) or launch the RMSNorm and the plain GEMV")
    _check_norm(caller, norm)


def check_splits(caller: str, splits: tuple[torch.Tensor, torch.Tensor], k: int, clear: torch.Tensor | None) -> None:
    o, lse = splits
    if o.dtype != torch.float32 or lse.dtype != torch.float32 or o.dim() != 3 or lse.shape != o.shape[:2] \
            or o.shape[1] * o.shape[2] != k or not (o.is_contiguous() and lse.is_contiguous()):
        raise ValueError(f"{caller}: splits must be contiguous fp32 o [S, H, hd] and lse [S, H] with H * hd = {k}, "
                         f"got {tuple(o.shape)} {o.dtype} and {tuple(lse.shape)} {lse.dtype}")
    if o.shape[0] & (o.shape[0] - 1):
        raise ValueError(f"{caller}: the split count {o.shape[0]} must be a power of two")
    if clear is not None and (clear.dtype != torch.float32 or not clear.is_contiguous()):
        raise ValueError(f"{caller}: the buffer to clear must be contiguous fp32")


def qmatmul_accumulate_deferred_norm(h: torch.Tensor, norm_weight: torch.Tensor, lin, out: torch.Tensor,
                                     norm: DeferredNorm, config: tuple[int, int, int, int, bool | str] | None = None,
                                     bias_to_reader: bool = False) -> torch.Tensor:
    """out [1, N] (fp32) += (h * norm_weight) @ W.T for one decode row h (fp32 [1, K], the residual
    stream), and norm.sum_squares += sum(h^2): RMSNorm(h) @ W.T without its scale, which the kernel
    reading `out` applies (kernels.rmsnorm.deferred_rms_scale), so the decode step needs no norm
    launch. A bias would be scaled too: a linear with one is refused unless bias_to_reader, where
    the bias is left out and the reader adds it after the scale (flash-decoding's
    RopeInput.qkv_bias). Returns out."""
    check_residual("qmatmul_accumulate_deferred_norm", h, norm_weight, lin.in_features, norm, lin.bias, bias_to_reader)
    bn, tile, tiles, nw = _decode_gemv_config("qmatmul_accumulate_deferred_norm", lin, out, config,
                                              "rmsnorm + qmatmul_accumulate")
    _launch_packed_gemv(h, lin, out.view(1, lin.out_features), bn, tile, tiles, nw, source=FROM_RESIDUAL,
                        aux=norm_weight, norm=norm, add_bias=False)
    return out


def try_packed_gemv(x2: torch.Tensor, lin, out2: torch.Tensor, config: tuple) -> bool:
    """Runs out2 += x2 @ W.T with the packed GEMV when `config` (BLOCK_N, BLOCK_K, K_ITERS
    column tiles per program, num_warps, path) selects it ("packed") and it applies (one fp16 row, K a multiple of the codes
    per word, no act-order, a K tile of whole groups); returns whether it ran."""
    bn, bk, iters, nw, path = config
    if path != "packed" or not _packed_gemv_applies(x2, lin):
        return False
    tile = _packed_gemv_tile(lin, bk)
    if tile is None:
        return False
    _launch_packed_gemv(x2, lin, out2, bn, tile, iters, nw)
    return True


def qmatmul_accumulate_attention(splits: tuple[torch.Tensor, torch.Tensor], lin, out: torch.Tensor,
                                 clear: torch.Tensor | None = None,
                                 config: tuple[int, int, int, int, bool | str] | None = None) -> torch.Tensor:
    """out [1, N] (fp32) += attn @ W.T (+ bias) for one decode row, attn the merge of flash-decoding's
    splits (o [S, H, hd], lse [S, H]: kernels.flash_decode.flash_decode_splits): each program merges
    the splits of its own K slice as the combine kernel would (rounded to fp16 as its output), so
    the decode step needs no combine launch. `clear` (contiguous fp32), if given, is zeroed by the
    programs after the previous kernel has completed: the accumulators the step has read by then,
    which the combine kernel would have zeroed. Returns out."""
    check_splits("qmatmul_accumulate_attention", splits, lin.in_features, clear)
    o, lse = splits
    bn, tile, tiles, nw = _decode_gemv_config("qmatmul_accumulate_attention", lin, out, config,
                                              "flash_decode's combine and qmatmul_accumulate")
    _launch_packed_gemv(o, lin, out.view(1, lin.out_features), bn, tile, tiles, nw,
                        source=FROM_SPLITS, aux=lse, clear=clear)
    return out
