"""Dequant-fused matrix multiply over packed int4/int8 weights: y = x @ W.T, x [M, K], W [N, K].

One kernel serves decode (M = 1..16, split over K, fp32 atomics into an accumulator the caller
owns) and prefill (M large, whole K per program, stored with bias/residual in the epilogue).

Layout read (`kernels.layout.prepare`): the packed format's int32 words transposed to
[K / EPW, N] (EPW = 32 / bits codes per word, low bits first; N contiguous, so a thread's 16-byte
load covers 4 consecutive outputs), scales and zeros/offsets transposed to [G, N]. Rows k // EPW
of a tile repeat EPW times (L1 hits) and each element gets its own shift, so the codes unpack
straight into a [BLOCK_K, BLOCK_N] tile without a reshape.

Two ways to multiply (USE_DOT):
- FMA (BLOCK_M = 1): codes -> exact fp32 with the 2^23 mantissa trick (no I2F), multiply-reduce
  over K inside each thread.
- DOT: codes -> fp16 "1024 + q" by or-ing them into the mantissa of 1024.0 (0x6400; exact for
  q < 1024, no conversion instruction), then tensor-core tl.dot. The 1024 is removed together
  with the zero point: sum x (1024 + q) - (1024 + z) sum x = sum x (q - z).
Per tile (BLOCK_K stays inside one group), in fp32:
    D = sum_k x_k q_k,  X = sum_k x_k,   y += s (D - z X)   (symmetric: z = 2^(bits-1))
                                         y += s D + m X     (float zero mode, m = offset)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, int_to_float_exact
from .pdl import pdl_launch, release_dependents, wait_for_producer


@triton.jit
def _nibble_slot(k, BITS: tl.constexpr):
    """Where column k sits in its word. int8: byte k % 4. int4 (pair-interleaved layout, see
    kernels.layout): columns 2i and 2i+1 of each block of 8 sit in nibbles i and i + 4."""
    if BITS == 4:
        c = k % 8
        return c // 2 + 4 * (c % 2)
    else:
        return k % 4


_DOT8_F16X2 = tl.constexpr("""
{
.reg .b32 m, msk, mskh, r16, n64, w8, t0, t1, t2, t3, acc;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 m, 0x64006400;
mov.b32 msk, 0x000F000F;
mov.b32 mskh, 0x00F000F0;
mov.b32 r16, 0x2C002C00;
mov.b32 n64, 0xD400D400;
shr.u32 w8, $1, 8;
lop3.b32 t0, $1, msk, m, 0xEA;
lop3.b32 t1, $1, mskh, m, 0xEA;
lop3.b32 t2, w8, msk, m, 0xEA;
lop3.b32 t3, w8, mskh, m, 0xEA;
sub.f16x2 t0, t0, m;
fma.rn.f16x2 t1, t1, r16, n64;
sub.f16x2 t2, t2, m;
fma.rn.f16x2 t3, t3, r16, n64;
mul.rn.f16x2 acc, t0, $2;
fma.rn.f16x2 acc, t1, $3, acc;
fma.rn.f16x2 acc, t2, $4, acc;
fma.rn.f16x2 acc, t3, $5, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}
""")


_DOT4_I8_F16X2 = tl.constexpr("""
{
.reg .b32 m, c, sel0, sel1, t0, t1, acc;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 m, 0x64806480;
mov.b32 c, 0x64646464;
mov.b32 sel0, 0x4140;
mov.b32 sel1, 0x4342;
prmt.b32 t0, $1, c, sel0;
prmt.b32 t1, $1, c, sel1;
sub.f16x2 t0, t0, m;
sub.f16x2 t1, t1, m;
mul.rn.f16x2 acc, t0, $2;
fma.rn.f16x2 acc, t1, $3, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}
""")


@triton.jit
def _dot4_i8(w, xp0, xp1, EMULATE: tl.constexpr):
    """sum_{j<4} (q_j - 128) x_j for each int8 word w (byte j = column 4r + j) and its 4 fp16
    activations as two int32 words of fp16 pairs. On the GPU, PRMT places bytes (0, 1) and (2, 3)
    into the mantissas of an fp16x2 1024.0 (exact 1024 + q), one HSUB2 of 1152 leaves q - 128
    exactly, and two HFMA2 multiply-add: ~2 instructions per weight. Subtracting 128 before the
    products keeps the fp16 partial sums small (no cancellation against 128 * sum x later)."""
    if EMULATE:
        return _pair8(w, xp0, 0) + _pair8(w, xp1, 1)
    else:
        return tl.inline_asm_elementwise(_DOT4_I8_F16X2, "=f,r,r,r", [w, xp0, xp1],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _pair8(w, xp, j: tl.constexpr):
    q_lo = ((w >> (16 * j)) & 0xFF).to(tl.float32) - 128.0
    q_hi = ((w >> (16 * j + 8)) & 0xFF).to(tl.float32) - 128.0
    x_lo = (xp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    x_hi = ((xp >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return q_lo * x_lo + q_hi * x_hi


@triton.jit
def _dot8(w, xp0, xp1, xp2, xp3, EMULATE: tl.constexpr):
    """sum_{j<8} q_j x_j for each int4 word w (pair-interleaved) and its 8 fp16 activations, given as
    four int32 words each holding the fp16 pair (x_2i, x_2i+1).

    On the GPU: nibble pairs (i, i + 4) become fp16x2 with one LOP3 each, or-ing them into the
    mantissa of 1024.0, straight from the word (pairs 0, 1) or from one shift of it by 8 (pairs 2, 3):
    the low nibble of a byte gives 1024 + q (one HSUB2 of 1024 leaves q), the high one 1024 + 16 q
    (one HFMA2 by 1/16 and -64 leaves q, exactly); four HFMA2 multiply-add two products each. Nine
    instructions unpack the 8 codes instead of eleven with a shift per pair; the int4 GEMV is
    issue-bound on the H200 (benchmarks/results/h200/ncu_gemv_w4_4096x14336.txt). The 8 products
    accumulate in fp16 (relative error ~1e-3 of the word's partial sum) and leave as one fp32.
    EMULATE computes the same sum in plain Triton for the CPU interpreter (which cannot run PTX)."""
    if EMULATE:
        return _pair(w, xp0, 0) + _pair(w, xp1, 1) + _pair(w, xp2, 2) + _pair(w, xp3, 3)
    else:
        return tl.inline_asm_elementwise(_DOT8_F16X2, "=f,r,r,r,r,r", [w, xp0, xp1, xp2, xp3],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _pair(w, xp, i: tl.constexpr):
    q_lo = ((w >> (4 * i)) & 0xF).to(tl.float32)
    q_hi = ((w >> (4 * i + 16)) & 0xF).to(tl.float32)
    x_lo = (xp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    x_hi = ((xp >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return q_lo * x_lo + q_hi * x_hi


@triton.jit
def _accumulate_tile(acc, k0, x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, rm, m_ok, n, n_ok, pid_m,
                     K, group_size, stride_xm, stride_wk, stride_sg,
                     BITS: tl.constexpr, ZERO_MODE: tl.constexpr, HAS_PERM: tl.constexpr, USE_DOT: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x[:, k0:k0+BLOCK_K] @ W[n, k0:k0+BLOCK_K].T for one tile inside one group."""
    EPW: tl.constexpr = 32 // BITS
    offset: tl.constexpr = 1024.0 if USE_DOT else 0.0  # what the fp16 codes carry besides q
    k = k0 + tl.arange(0, BLOCK_K)
    k_ok = k < K
    w = tl.load(w_ptr + (k // EPW)[:, None] * stride_wk + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0)
    codes = (w >> (_nibble_slot(k, BITS) * BITS)[:, None]) & ((1 << BITS) - 1)                # [BK, BN]
    if HAS_PERM:
        src = tl.load(perm_ptr + k, mask=k_ok, other=0)
    else:
        src = k
    if USE_DOT:
        x = tl.load(x_ptr + rm[:, None] * stride_xm + src[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        x = x.to(tl.float16)
        d = tl.dot(x, (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True))              # [BM, BN]
        xs = tl.sum(x.to(tl.float32), axis=1)[:, None]                                         # what the dot saw
    else:  # BLOCK_M == 1: a 2-D multiply-reduce keeps the reduction over K inside each thread
        x = tl.load(x_ptr + pid_m * stride_xm + src, mask=k_ok, other=0.0).to(tl.float32)
        d = tl.sum(int_to_float_exact(codes) * x[:, None], axis=0)[None, :]
        xs = tl.sum(x, axis=0)
    return _apply_group(acc, d, xs, k0, K, group_size, s_ptr, z_ptr, n, n_ok, stride_sg, BITS, ZERO_MODE, offset, BLOCK_N)


@triton.jit
def _apply_group(acc, d, xs, k0, K, group_size, s_ptr, z_ptr, n, n_ok, stride_sg,
                 BITS: tl.constexpr, ZERO_MODE: tl.constexpr, offset: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc += the tile's contribution given D = sum x (offset + q) and X = sum x (see module doc)."""
    g = k0 // group_size
    sm = n_ok & ((k0 + tl.zeros([BLOCK_N], dtype=tl.int32)) < K)
    s = tl.load(s_ptr + g * stride_sg + n, mask=sm, other=0.0).to(tl.float32)[None, :]
    if ZERO_MODE != 0:
        z = tl.load(z_ptr + g * stride_sg + n, mask=sm, other=0).to(tl.float32)[None, :]
    else:
        z = s  # unused
    return acc + _group_contribution(d, xs, s, z, BITS, ZERO_MODE, offset)


@triton.jit
def _group_contribution(d, xs, s, z, BITS: tl.constexpr, ZERO_MODE: tl.constexpr, offset: tl.constexpr):
    """s (D - (offset + zero) X) for the zero modes (float mode: z is the offset m, s (D - offset X) + m X)."""
    if ZERO_MODE == 0:
        return s * (d - (offset + (1 << (BITS - 1))) * xs)
    elif ZERO_MODE == 1:
        return s * (d - (offset + z) * xs)
    else:
        return s * (d - offset * xs) + z * xs


@triton.jit
def _overflow_shift(xmax, BITS: tl.constexpr):
    """The e >= 0 for which 2^-e x keeps a word's fp16 lane sums below 2^15: each lane adds 4
    products q x with q <= 15 (int4) or 2 with |q - 128| <= 128 (int8)."""
    LIMIT: tl.constexpr = 512.0 if BITS == 4 else 128.0
    e = tl.where(xmax > LIMIT, tl.ceil(tl.log2(xmax / LIMIT)), 0.0)
    return tl.minimum(e, 14.0).to(tl.int32)  # 2^-14 is the smallest normal fp16


@triton.jit
def _fp16_pair(lo, hi):
    """Two fp16 tensors -> int32 words holding (lo, hi)."""
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _load_pairs(xw_ptr, r, i: tl.constexpr, PAIRS: tl.constexpr, r_ok, e, BLOCK_N: tl.constexpr, EMULATE: tl.constexpr):
    """Pair i (fp16 x_{2i}, x_{2i+1} as one int32) of each word row r, times 2^-e, as [RW, BLOCK_N]."""
    xp = tl.load(xw_ptr + r * PAIRS + i, mask=r_ok, other=0)
    if EMULATE:
        f = ((127 - e) << 23).to(tl.float32, bitcast=True)   # 2^-e
        lo = ((xp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * f).to(tl.float16)
        hi = (((xp >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * f).to(tl.float16)
        xp = _fp16_pair(lo, hi)
    else:
        h = (15 - e) << 10                                   # fp16 bits of 2^-e
        hh = tl.zeros_like(xp) + (h | (h << 16))
        xp = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [xp, hh], dtype=tl.int32,
                                       is_pure=True, pack=1)
    return tl.broadcast_to(xp[:, None], (xp.shape[0], BLOCK_N))


@triton.jit
def _qgemv_f16x2_kernel(
    x_ptr, xw_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    N, K, group_size, stride_wk, stride_sg,
    BITS: tl.constexpr, ZERO_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE: tl.constexpr,
    PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS: tl.constexpr,
):
    """Decode GEMV, M = 1, fp16 x, no act-order: out (fp32) += x @ W.T with packed fp16x2 math.

    Each program reads one [BLOCK_K / EPW, BLOCK_N] tile of words once and multiplies every word by
    its EPW activations (`_dot8` for int4, `_dot4_i8` for int8); x is also read as int32 words `xw`
    of fp16 pairs. The tile spans GROUPS whole groups (or lies inside one: GROUPS = 1).
    Weights, scales, zeros and bias are requested before waiting for the previous kernel (PDL,
    kernels.pdl): they are most of the bytes, and no kernel of the step writes them."""
    EPW: tl.constexpr = 32 // BITS
    RW: tl.constexpr = BLOCK_K // EPW
    PAIRS: tl.constexpr = EPW // 2                        # fp16 pairs of x per word
    offset: tl.constexpr = 0.0 if BITS == 4 else -128.0  # int8 products are formed with q - 128
    release_dependents(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k0 = pid_k * BLOCK_K
    r = k0 // EPW + tl.arange(0, RW)
    r_ok = r < K // EPW
    w = tl.load(w_ptr + r[:, None] * stride_wk + n[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0)
    g = k0 // group_size + tl.arange(0, GROUPS)
    sm = ((g * group_size) < K)[:, None] & n_ok[None, :]
    s = tl.load(s_ptr + g[:, None] * stride_sg + n[None, :], mask=sm, other=0.0).to(tl.float32)   # [GROUPS, BN]
    if ZERO_MODE != 0:
        z = tl.load(z_ptr + g[:, None] * stride_sg + n[None, :], mask=sm, other=0).to(tl.float32)
    else:
        z = s  # unused
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32) * (pid_k == 0).to(tl.float32)
    wait_for_producer(PDL)
    k = k0 + tl.arange(0, BLOCK_K)
    xk = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    # The fp16 lane sums of one word overflow past 65504: large activations (a down_proj input
    # reaches thousands in some models) are scaled down by 2^-e first, and d back up by 2^e.
    e = _overflow_shift(tl.max(tl.abs(xk), axis=0), BITS)
    xp0 = _load_pairs(xw_ptr, r, 0, PAIRS, r_ok, e, BLOCK_N, EMULATE)
    xp1 = _load_pairs(xw_ptr, r, 1, PAIRS, r_ok, e, BLOCK_N, EMULATE)
    if BITS == 4:
        xp2 = _load_pairs(xw_ptr, r, 2, PAIRS, r_ok, e, BLOCK_N, EMULATE)
        xp3 = _load_pairs(xw_ptr, r, 3, PAIRS, r_ok, e, BLOCK_N, EMULATE)
        per_word = _dot8(w, xp0, xp1, xp2, xp3, EMULATE)                                    # [RW, BN]
    else:
        per_word = _dot4_i8(w, xp0, xp1, EMULATE)
    if GROUPS == 1:
        d = tl.sum(per_word, axis=0)[None, :]
        xs = tl.sum(xk, axis=0)
    else:  # one partial sum per group, each with its own scale
        d = tl.sum(tl.reshape(per_word, (GROUPS, RW // GROUPS, BLOCK_N)), axis=1)
        xs = tl.sum(tl.reshape(xk, (GROUPS, BLOCK_K // GROUPS)), axis=1)[:, None]
    d = d * ((127 + e) << 23).to(tl.float32, bitcast=True)                               # * 2^e
    acc = tl.sum(_group_contribution(d, xs, s, z, BITS, ZERO_MODE, offset), axis=0)
    if HAS_BIAS:
        acc += bias
    tl.atomic_add(out_ptr + n, acc, mask=n_ok, sem="relaxed")


@triton.jit
def _qmatmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K, group_size, stride_xm, stride_wk, stride_sg, stride_om, stride_rm,
    BITS: tl.constexpr, ZERO_MODE: tl.constexpr, HAS_PERM: tl.constexpr, USE_DOT: tl.constexpr,
    ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr,
):
    release_dependents(PDL)
    wait_for_producer(PDL)  # loads of x and W interleave here: nothing to issue early
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ATOMIC:  # this program's K_ITERS tiles, unrolled so their loads are in flight together
        for it in tl.static_range(K_ITERS):
            acc = _accumulate_tile(acc, (pid_k * K_ITERS + it) * BLOCK_K, x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr,
                                   rm, m_ok, n, n_ok, pid_m, K, group_size, stride_xm, stride_wk, stride_sg,
                                   BITS, ZERO_MODE, HAS_PERM, USE_DOT, BLOCK_N, BLOCK_K)
    else:  # all of K
        for k0 in range(0, K, BLOCK_K):
            acc = _accumulate_tile(acc, k0, x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr,
                                   rm, m_ok, n, n_ok, pid_m, K, group_size, stride_xm, stride_wk, stride_sg,
                                   BITS, ZERO_MODE, HAS_PERM, USE_DOT, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if ATOMIC:
            acc += bias * (pid_k == 0).to(tl.float32)  # added once, by the first K split
        else:
            acc += bias
    omask = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + rm[:, None] * stride_om + n[None, :], acc, mask=omask, sem="relaxed")
    else:
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + rm[:, None] * stride_rm + n[None, :], mask=omask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rm[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


def _packed_fp16_path(x2: torch.Tensor, lin) -> bool:
    """Whether the fp16x2 GEMV applies: one fp16 row, K a multiple of the codes per word, no act-order."""
    return (x2.shape[0] == 1 and x2.dtype == torch.float16 and lin.in_features % (32 // lin.bits) == 0
            and lin.perm is None and x2.is_contiguous())


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


def _check(x: torch.Tensor, lin) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] != lin.in_features:
        raise ValueError(f"qmatmul: x has K={x2.shape[1]}, the weight has in_features={lin.in_features}")
    if x2.stride(-1) != 1:
        raise ValueError("qmatmul: x must be contiguous along K")
    return x2


def qmatmul_accumulate(x: torch.Tensor, lin, out: torch.Tensor,
                       config: tuple[int, int, int, int, bool | str] | None = None) -> torch.Tensor:
    """out [M, N] (fp32) += x [M <= 16, K] @ W.T (+ bias), split over K with atomics; returns out.

    config = (BLOCK_N, BLOCK_K, K_ITERS, num_warps, path) with path False (fp32 FMA, M = 1), True
    (tensor cores) or "f16x2" (packed-fp16 GEMV, M = 1, fp16 x, K a multiple of 32 / bits, no
    act-order; otherwise the FMA path)."""
    x2 = _check(x, lin)
    m, k = x2.shape
    if m > 16:
        raise ValueError(f"qmatmul_accumulate: M={m} > 16; use qmatmul")
    if out.dtype != torch.float32 or out.numel() != m * lin.out_features:
        raise ValueError(f"qmatmul_accumulate: out must be fp32 [{m}, {lin.out_features}], got {out.dtype} {tuple(out.shape)}")
    out2 = out.view(m, lin.out_features)
    bn, bk, iters, nw, use_dot = config or lin.splitk_config(m)
    tile = _packed_fp16_tile(lin, bk * iters) if use_dot == "f16x2" and _packed_fp16_path(x2, lin) else None
    if tile is not None:  # one K tile of bk * iters per program
        block_k, groups = tile
        _qgemv_f16x2_kernel[(triton.cdiv(lin.out_features, bn), triton.cdiv(k, block_k))](
            x2, x2.view(torch.int32), lin.words, lin.scales, lin.zeros_or_offsets, lin.bias, out2,
            lin.out_features, k, lin.group_size_eff, lin.words.stride(0), lin.scales.stride(0),
            BITS=lin.bits, ZERO_MODE=lin.zero_mode_id, HAS_BIAS=lin.bias is not None, EMULATE=INTERPRET,
            BLOCK_N=bn, BLOCK_K=block_k, GROUPS=groups, num_warps=nw, **pdl_launch(x2),
        )
        return out
    use_dot = use_dot is True or m > 1
    bk = min(bk, lin.group_size_eff)  # a tile must stay inside one group
    grid = (1, triton.cdiv(lin.out_features, bn), triton.cdiv(k, bk * iters))
    _qmatmul_kernel[grid](
        x2, lin.words, lin.scales, lin.zeros_or_offsets, lin.perm, lin.bias, None, out2,
        m, lin.out_features, k, lin.group_size_eff, x2.stride(0), lin.words.stride(0), lin.scales.stride(0),
        out2.stride(0), 0,
        BITS=lin.bits, ZERO_MODE=lin.zero_mode_id, HAS_PERM=lin.perm is not None, USE_DOT=use_dot,
        ATOMIC=True, HAS_BIAS=lin.bias is not None, HAS_RESIDUAL=False,
        BLOCK_M=16 if use_dot else 1, BLOCK_N=bn, BLOCK_K=bk, K_ITERS=iters, num_warps=nw, **pdl_launch(x2),
    )
    return out


def qmatmul(x: torch.Tensor, lin, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
            config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) (+ residual) -> [M, N] in x's dtype (or out's); for prefill."""
    x2 = _check(x, lin)
    m, k = x2.shape
    n = lin.out_features
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    bm, bn, bk, nw, ns = config or lin.gemm_config(m)
    bk = min(bk, lin.group_size_eff)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), 1)
    _qmatmul_kernel[grid](
        x2, lin.words, lin.scales, lin.zeros_or_offsets, lin.perm, lin.bias, residual, out,
        m, n, k, lin.group_size_eff, x2.stride(0), lin.words.stride(0), lin.scales.stride(0),
        out.stride(0), 0 if residual is None else residual.stride(0),
        BITS=lin.bits, ZERO_MODE=lin.zero_mode_id, HAS_PERM=lin.perm is not None, USE_DOT=True,
        ATOMIC=False, HAS_BIAS=lin.bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, K_ITERS=1, num_warps=nw, num_stages=ns, **pdl_launch(x2),
    )
    return out
