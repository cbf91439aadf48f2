"""Packed-fp16 decode GEMV: out (fp32) += x @ W.T for ONE activation row over packed int4/int8
weights (the layout of kernels.layout), with fp16x2 arithmetic instead of fp32 FMAs.

Why a kernel of its own: at M = 1 the dequant-fused GEMV is bound by instructions and latency on
Hopper, not by its loads (Nsight Compute, benchmarks/results/h200/ncu_gemv_w4_4096x14336*.txt; a
kernel that only reads the same tiles reaches the full bandwidth, probe_gemv.json). So what counts
is instructions per packed word and keeping loads in flight while computing. Here the codes become
fp16x2 pairs by bit tricks (no conversion instruction, see `_f16x2_dot_asm`), two products per
HFMA2, a chain of word rows (4 for int4, 2 for int8: MAX_CHAIN) per fp16x2 accumulator, one
fp32 convert per chain; a program takes one K slice across several column tiles, so the slice's
activations are regrouped into the pairs once and the next tile loads while the current one is
multiplied. The fp16 lane sums are kept below
overflow by scaling large activations by 2^-e (exact).
Used by kernels.qmatmul.qmatmul_accumulate when the tuned config picks the "f16x2" path
(BLOCK_N, BLOCK_K, K_ITERS = column tiles per program, num_warps), and by the decode step where
a GEMV forms its own input, saving the launch that would have written it: down_proj with the
SwiGLU (`qmatmul_accumulate_swiglu`), o_proj with flash-decoding's splits merged
(`qmatmul_accumulate_attention`), q|k|v and gate|up with the RMSNorm before them deferred
(`qmatmul_accumulate_deferred_norm`: h times the norm's weight, and the sum of h^2 for the
kernel that applies the norm's scale to the output).
On the CPU interpreter (no PTX) the EMULATE branch computes the same sums in plain Triton.
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


# int4 codes -> exact fp16 (q - 8), the recipe of this kernel and of kernels.slot_gemm: LOP3 or-s a
# low nibble (lo4) or a high one (hi4) of each half into the mantissa of 1024.0 (m), giving 1024 + q
# or 1024 + 16 q; minus 1032 (c), or times 1/16 (r16) minus 72 (k72), leaves q - 8. The constants
# live in registers (f16x2 arithmetic takes no immediates); ptxas folds them.
INT4_CONSTANT_REGS = "m, c, lo4, hi4, r16, k72"
INT4_CONSTANTS = ["mov.b32 m, 0x64006400;", "mov.b32 c, 0x64086408;", "mov.b32 lo4, 0x000F000F;",
                  "mov.b32 hi4, 0x00F000F0;", "mov.b32 r16, 0x2C002C00;", "mov.b32 k72, 0xD480D480;"]


def int4_to_centered(dst: str, src: str, mask: str) -> tuple[str, str]:
    """The two PTX lines that make fp16x2 dst (q - 8 of the nibbles `mask` selects in each half of
    src: "lo4" or "hi4"): the LOP3, then the centering (callers may put other lines between)."""
    center = f"sub.f16x2 {dst}, {dst}, c;" if mask == "lo4" else f"fma.rn.f16x2 {dst}, {dst}, r16, k72;"
    return f"lop3.b32 {dst}, {src}, {mask}, m, 0xEA;", center


def _f16x2_dot_asm(bits: int, words: int) -> str:
    """PTX for one output: sum over `words` packed words (operands $1..) of (q - center) x, each
    word's activations given as fp16 pairs (operands after the words, PAIRS per word, in order).

    The codes become exact fp16x2 without a conversion instruction, already centered (q - 8 for
    int4, q - 128 for int8, so the fp16 partial sums stay small: no cancellation against
    center * sum x later), and all products of the words accumulate in one fp16x2 register that
    leaves as a single fp32: chaining words divides the converts and adds per word.
    int4 (pair-interleaved, kernels.layout): nibble pairs (i, i + 4) become fp16x2 with one LOP3
    each, or-ing them into the mantissa of 1024.0, straight from the word (pairs 0, 1) or from one
    shift of it by 8 (pairs 2, 3); the low nibble of a byte gives 1024 + q (one HSUB2 of 1032
    leaves q - 8), the high one 1024 + 16 q (one HFMA2 by 1/16 and -72 leaves q - 8), exactly.
    int8: PRMT places bytes (0, 1) and (2, 3) into the mantissas of 1024.0; one HSUB2 of 1152."""
    pairs = 4 if bits == 4 else 2
    body = [f".reg .b32 acc, t0, t1, t2, t3, w8, {INT4_CONSTANT_REGS};", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;"]
    # constants in registers (f16x2 arithmetic takes no immediates); ptxas folds them
    if bits == 4:
        body += INT4_CONSTANTS
    else:
        body += ["mov.b32 m, 0x64646464;", "mov.b32 c, 0x64806480;"]
    first = True
    for i in range(words):
        w = f"${1 + i}"
        x = [f"${1 + words + i * pairs + p}" for p in range(pairs)]
        if bits == 4:
            # pairs 0, 1 from the word, 2, 3 from its shift by 8: the four LOP3s, then the centerings
            steps = [int4_to_centered(f"t{p}", w if p < 2 else "w8", "lo4" if p % 2 == 0 else "hi4") for p in range(4)]
            body += [f"shr.u32 w8, {w}, 8;"] + [lop for lop, _ in steps] + [center for _, center in steps]
        else:
            # bytes (0, 1) and (2, 3) under the 0x64 high bytes of 1024.0; then - 1152
            body += [f"prmt.b32 t0, {w}, m, 0x4140;",
                     f"prmt.b32 t1, {w}, m, 0x4342;",
                     "sub.f16x2 t0, t0, c;",
                     "sub.f16x2 t1, t1, c;"]
        for p in range(pairs):
            if first:
                body.append(f"mul.rn.f16x2 acc, t{p}, {x[p]};")
                first = False
            else:
                body.append(f"fma.rn.f16x2 acc, t{p}, {x[p]}, acc;")
    body += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", "add.f32 $0, flo, fhi;"]
    return "{\n" + "\n".join(body) + "\n}"


_DOT_W4 = tl.constexpr(_f16x2_dot_asm(4, 1))
_DOT_W4_CHAIN2 = tl.constexpr(_f16x2_dot_asm(4, 2))
_DOT_W4_CHAIN4 = tl.constexpr(_f16x2_dot_asm(4, 4))
_DOT_W8 = tl.constexpr(_f16x2_dot_asm(8, 1))
_DOT_W8_CHAIN2 = tl.constexpr(_f16x2_dot_asm(8, 2))


@triton.jit
def _center(BITS: tl.constexpr):
    """What the packed-fp16 products subtract from each code (see _f16x2_dot_asm)."""
    return 8.0 if BITS == 4 else 128.0


@triton.jit
def _word_products(w, xp0, xp1, xp2, xp3, BITS: tl.constexpr):
    """Plain-Triton sum_j (q_j - center) x_j of each word and its fp16 pairs (the interpreter's path)."""
    if BITS == 4:
        return _pair(w, xp0, 0, 4, 16) + _pair(w, xp1, 4, 4, 16) + _pair(w, xp2, 8, 4, 16) + _pair(w, xp3, 12, 4, 16)
    else:
        return _pair(w, xp0, 0, 8, 8) + _pair(w, xp1, 16, 8, 8)


@triton.jit
def _pair(w, xp, lo_shift: tl.constexpr, BITS: tl.constexpr, hi_gap: tl.constexpr):
    """(q_lo - center) x_lo + (q_hi - center) x_hi for the codes at bits lo_shift and lo_shift + hi_gap."""
    mask: tl.constexpr = (1 << BITS) - 1
    q_lo = ((w >> lo_shift) & mask).to(tl.float32) - _center(BITS)
    q_hi = ((w >> (lo_shift + hi_gap)) & mask).to(tl.float32) - _center(BITS)
    x_lo = (xp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    x_hi = ((xp >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return q_lo * x_lo + q_hi * x_hi


@triton.jit
def _f16x2_products(w, x, BITS: tl.constexpr, CHAIN: tl.constexpr, EMULATE: tl.constexpr):
    """sum (q - center) x over the CHAIN word rows of each chain, w (a tuple of 4 word tensors, the
    first CHAIN used), each with its fp16 pairs: x[4 r + p] is pair p of row r (int8 words use
    two pairs; int8 chains are at most 2 rows, MAX_CHAIN). EMULATE: the same sum in plain Triton
    for the CPU interpreter, which cannot run PTX (it does not round to fp16 as the GPU does)."""
    if EMULATE:
        d = _word_products(w[0], x[0], x[1], x[2], x[3], BITS)
        for r in tl.static_range(1, CHAIN):
            d += _word_products(w[r], x[4 * r], x[4 * r + 1], x[4 * r + 2], x[4 * r + 3], BITS)
        return d
    elif BITS == 4:
        if CHAIN == 4:
            return tl.inline_asm_elementwise(_DOT_W4_CHAIN4, "=f" + ",r" * 20,
                                             [w[0], w[1], w[2], w[3], x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7],
                                              x[8], x[9], x[10], x[11], x[12], x[13], x[14], x[15]],
                                             dtype=tl.float32, is_pure=True, pack=1)
        elif CHAIN == 2:
            return tl.inline_asm_elementwise(_DOT_W4_CHAIN2, "=f" + ",r" * 10,
                                             [w[0], w[1], x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(_DOT_W4, "=f" + ",r" * 5, [w[0], x[0], x[1], x[2], x[3]],
                                             dtype=tl.float32, is_pure=True, pack=1)
    else:
        if CHAIN == 2:
            return tl.inline_asm_elementwise(_DOT_W8_CHAIN2, "=f" + ",r" * 6, [w[0], w[1], x[0], x[1], x[4], x[5]],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(_DOT_W8, "=f" + ",r" * 3, [w[0], x[0], x[1]],
                                             dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _overflow_shift(xmax, BITS: tl.constexpr, CHAIN: tl.constexpr):
    """The e >= 0 for which 2^-e x keeps the fp16 lane sums of a chain below 2^15: each lane adds
    4 CHAIN products (q - 8) x with |q - 8| <= 8 (int4) or 2 CHAIN with |q - 128| <= 128 (int8)."""
    LIMIT: tl.constexpr = (1024.0 if BITS == 4 else 128.0) / CHAIN
    e = tl.where(xmax > LIMIT, tl.ceil(tl.log2(xmax / LIMIT)), 0.0)
    return tl.minimum(e, 14.0).to(tl.int32)  # 2^-14 is the smallest normal fp16


@triton.jit
def _pow2(e):
    """2^e as fp32 for an integer tensor e (within the normal range), by its exponent bits: exact."""
    return ((127 + e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp16_pair(lo, hi):
    """Two fp16 tensors -> int32 words holding (lo, hi)."""
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


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
def _tile_pairs(xk, e, SLOTS: tl.constexpr, CHAIN: tl.constexpr, PAIRS: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The K slice's activations xk [BLOCK_K] (fp32 holding fp16 values) times 2^-e as the fp16
    pairs each chain multiplies, [SLOTS, BLOCK_N] per (row in chain r, pair p), at 4 r + p of the
    tuple returned (rows past CHAIN repeat row 0, unused): formed once per program in a compact
    layout and regrouped by reshape/split (a pass through shared memory), not loaded or computed
    again by every thread for each of its rows, and kept for all the program's tiles."""
    scaled = (xk * _pow2(-e)).to(tl.float16)                                           # exact: 2^-e
    lo, hi = tl.split(tl.reshape(scaled, (BLOCK_K // 2, 2)))
    pairs = tl.reshape(_fp16_pair(lo, hi), (SLOTS, CHAIN, PAIRS))                       # [slot, row in chain, pair]
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
    slice (norm_w, fp32, loaded by the caller), in fp32 (not rounded: the kernel rounds it to fp16
    after its 2^-e scaling, so no value overflows); the programs of column tile 0 (one per K
    slice) add the slice's sum of h^2 to ss."""
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
def _tile_outputs(w, s, z, x, xs, e,
                  BITS: tl.constexpr, ZERO_MODE: tl.constexpr, EMULATE: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUPS: tl.constexpr, SLOTS: tl.constexpr, CHAIN: tl.constexpr):
    """One column tile's share of the outputs [BLOCK_N] (fp32) from its words, scales and zeros and
    the slice's activation pairs, scaled by 2^-e, and sums per group xs."""
    OFFSET: tl.constexpr = -8.0 if BITS == 4 else -128.0  # what the products carry besides q: -center
    per_chain = _f16x2_products(w, x, BITS, CHAIN, EMULATE)  # [SLOTS, BN]
    if GROUPS == 1:
        d = tl.sum(per_chain, axis=0)[None, :]
    else:  # one partial sum per group, each with its own scale
        d = tl.sum(tl.reshape(per_chain, (GROUPS, SLOTS // GROUPS, BLOCK_N)), axis=1)
    d = d * _pow2(e)
    return tl.sum(group_contribution(d, xs, s, z, BITS, ZERO_MODE, OFFSET), axis=0)


@triton.jit
def _qgemv_f16x2_kernel(
    x_ptr, aux_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, clear_ptr, ss_ptr,
    N, K, group_size, stride_wk, stride_sg, CLEAR_N, norm_dim, eps,
    BITS: tl.constexpr, ZERO_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE: tl.constexpr,
    PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr, GROUPS: tl.constexpr,
    CHAIN: tl.constexpr, EVEN: tl.constexpr, SOURCE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr, PIECE: tl.constexpr, CLEAR_CHUNK: tl.constexpr, NORM_SCALE: tl.constexpr,
):
    """Decode GEMV, M = 1, no act-order: out (fp32) += x @ W.T with packed fp16x2 math; x is the
    fp16 row [K], or formed from what precedes the GEMV in the decode step (SOURCE,
    `slice_activations`): silu(gate) * up (NORM_SCALE: of gate and up times the deferred RMSNorm
    scale read from ss_ptr), the merged flash-decoding splits, or h * w (the programs of column
    tile 0 add their K slice's sum of h^2 to ss_ptr).

    Each program owns one K slice of BLOCK_K (BLOCK_K / EPW word rows) and TILES consecutive column
    tiles of BLOCK_N. The slice's activations are read and regrouped into the fp16 pairs each word
    row multiplies once (`_tile_pairs`, a pass through shared memory) and serve every tile; the
    next tile's words, scales and zeros are requested before the current one is multiplied, so the
    program keeps loads in flight while it computes. Every word is multiplied by its EPW activations
    (`_f16x2_products`), CHAIN consecutive word rows (MAX_CHAIN, fewer when a group's rows are not
    a multiple of it) into one fp16x2 accumulator; each tile's outputs are added to `out` with fp32
    atomics. The slice spans GROUPS whole groups (or lies inside one: GROUPS = 1). EVEN: every
    tile is whole (no masks). The first tile, and a deferred norm's weight, are requested before waiting for the
    previous kernel (PDL, kernels.pdl): no kernel of the step writes weights."""
    EPW: tl.constexpr = 32 // BITS
    SLOTS: tl.constexpr = BLOCK_K // EPW // CHAIN         # chains of the slice
    PAIRS: tl.constexpr = EPW // 2                        # fp16 pairs of x per word
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
    # The fp16 lane sums of a chain overflow past 65504: large activations (a down_proj input
    # reaches thousands in some models) are scaled down by 2^-e first, and d back up by 2^e.
    e = _overflow_shift(tl.max(tl.abs(xk), axis=0), BITS, CHAIN)
    if SOURCE == 3:  # h * w was left in fp32: round it as the products will see it
        xk = (xk * _pow2(-e)).to(tl.float16).to(tl.float32) * _pow2(e)
    x = _tile_pairs(xk, e, SLOTS, CHAIN, PAIRS, BLOCK_K, BLOCK_N)
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
        acc = _tile_outputs(w, s, z, x, xs, e, BITS, ZERO_MODE, EMULATE, BLOCK_N, GROUPS, SLOTS, CHAIN)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32) * (k0 == 0).to(tl.float32)
        tl.atomic_add(out_ptr + n, acc, mask=n < N, sem="relaxed")
        if i + 1 < TILES:
            w, s, z = next_w, next_s, next_z


def _packed_fp16_path(x2: torch.Tensor, lin) -> bool:
    """Whether the fp16x2 GEMV applies: one fp16 row, K a multiple of the codes per word, no act-order."""
    return (x2.shape[0] == 1 and x2.dtype == torch.float16 and lin.in_features % (32 // lin.bits) == 0
            and lin.perm is None and x2.is_contiguous())


# Word rows per fp16x2 accumulator, at most. A longer chain converts and adds fewer fp32 per word
# (int4: 18.6 -> 17.6 instructions a word in sm_90 code at 4 column tiles, 23.5 -> 22.8 at one),
# and its fp16 lane sums take 4 CHAIN products. int4 chains of 4: 8B w4 decode 1.325 -> 1.317
# ms/token, 1B w4 0.375 -> 0.368 (H200, benchmarks/results/h200/ab_chain4_e2e.log); the outputs
# move by 6e-4 (relative) against chains of 2, both fp16 roundings of the same sums. int8 stays
# at 2: its products are 16 times larger (|q - 128| <= 128), and 4-row chains gained nothing
# measurable (ab_chain4_gemv.log, ab_chain4_e2e.log).
MAX_CHAIN = {4: 4, 8: 2}


def _packed_fp16_tile(lin, block_k: int) -> tuple[int, int] | None:
    """(BLOCK_K, GROUPS) for the packed-fp16 GEMV: the K tile (at most block_k, a power of two)
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


def _launch_packed_fp16(x2: torch.Tensor, lin, out2: torch.Tensor, bn: int, tile: tuple[int, int], tiles: int, nw: int,
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
    _qgemv_f16x2_kernel[grid](
        x2, aux, lin.words, lin.scales, lin.zeros_or_offsets, lin.bias, out2,
        N=n, K=k, group_size=lin.group_size_eff, stride_wk=lin.words.stride(0), stride_sg=lin.scales.stride(0),
        BITS=lin.bits, ZERO_MODE=lin.zero_mode_id, HAS_BIAS=add_bias and lin.bias is not None, EMULATE=INTERPRET,
        BLOCK_N=bn, BLOCK_K=block_k, TILES=tiles, GROUPS=groups, CHAIN=chain,
        EVEN=n % (bn * tiles) == 0 and k % block_k == 0, num_warps=nw,
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


def packed_fp16_serves(lin, config: tuple[int, int, int, int, bool | str] | None = None) -> bool:
    """Whether `lin`'s decode GEMV is the packed-fp16 one (K a multiple of the codes per word, no
    act-order, a K tile of whole groups exists), and so can form its own input:
    qmatmul_accumulate_swiglu, qmatmul_accumulate_attention and qmatmul_accumulate_deferred_norm
    serve it."""
    _, bk, _, _, path = config or lin.splitk_config(1)
    return (path == "f16x2" and lin.in_features % (32 // lin.bits) == 0 and lin.perm is None
            and _packed_fp16_tile(lin, bk) is not None)


def _decode_gemv_config(caller: str, lin, out: torch.Tensor, config, alternative: str) -> tuple:
    """The checks the decode step's input-forming GEMVs share; returns (BLOCK_N, tile, tiles, warps)."""
    if out.dtype != torch.float32 or out.numel() != lin.out_features:
        raise ValueError(f"{caller}: out must be fp32 [1, {lin.out_features}], got {out.dtype} {tuple(out.shape)}")
    if not packed_fp16_serves(lin, config):
        raise ValueError(f"{caller}: no packed-fp16 GEMV for this linear (bits {lin.bits}, K {lin.in_features}, "
                         f"act-order {lin.perm is not None}, config {config or lin.splitk_config(1)}); use {alternative}")
    bn, bk, tiles, nw, _ = config or lin.splitk_config(1)
    return bn, _packed_fp16_tile(lin, bk), tiles, nw


def qmatmul_accumulate_swiglu(gate_up: torch.Tensor, lin, out: torch.Tensor,
                              config: tuple[int, int, int, int, bool | str] | None = None,
                              norm: DeferredNorm | None = None) -> torch.Tensor:
    """out [1, N] (fp32) += (silu(gate) * up) @ W.T (+ bias) for one decode row, gate_up the fp32
    [1, 2K] gate|up accumulator: the activation is formed inside the packed-fp16 GEMV, as the
    swiglu kernel would form it, so the decode step needs no swiglu launch. gate_up is only read
    (the caller zeroes it before its next accumulation). `norm`: gate_up was accumulated from an
    un-normalized input (qmatmul_accumulate_deferred_norm), and gate and up are first multiplied
    by its deferred RMSNorm scale. Returns out."""
    check_gate_up("qmatmul_accumulate_swiglu", gate_up, lin.in_features, norm)
    bn, tile, tiles, nw = _decode_gemv_config("qmatmul_accumulate_swiglu", lin, out, config, "swiglu + qmatmul_accumulate")
    _launch_packed_fp16(gate_up, lin, out.view(1, lin.out_features), bn, tile, tiles, nw, source=FROM_SWIGLU, norm=norm)
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
    _launch_packed_fp16(h, lin, out.view(1, lin.out_features), bn, tile, tiles, nw, source=FROM_RESIDUAL,
                        aux=norm_weight, norm=norm, add_bias=False)
    return out


def try_packed_fp16_gemv(x2: torch.Tensor, lin, out2: torch.Tensor, config: tuple) -> bool:
    """Runs out2 += x2 @ W.T with the packed-fp16 GEMV when `config` (BLOCK_N, BLOCK_K, K_ITERS
    column tiles per program, num_warps, path) selects it ("f16x2") and it applies (one fp16 row, K a multiple of the codes
    per word, no act-order, a K tile of whole groups); returns whether it ran."""
    bn, bk, iters, nw, path = config
    if path != "f16x2" or not _packed_fp16_path(x2, lin):
        return False
    tile = _packed_fp16_tile(lin, bk)
    if tile is None:
        return False
    _launch_packed_fp16(x2, lin, out2, bn, tile, iters, nw)
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
    _launch_packed_fp16(o, lin, out.view(1, lin.out_features), bn, tile, tiles, nw,
                        source=FROM_SPLITS, aux=lse, clear=clear)
    return out
