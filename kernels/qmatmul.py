"""Dequant-fused matrix multiply over packed int4/int8 weights: y = x @ W.T, x [M, K], W [N, K].

`_qmatmul_kernel` serves decode (M = 1..16, split over K, fp32 atomics into an accumulator the
caller owns) and prefill (M large, whole K per program, stored with bias/residual in the epilogue).
For one fp16 row the tuned config usually picks the faster packed GEMV of kernels.gemv_packed
(integer dot products) instead, and for 2-16 rows the fragment kernel of kernels.frag_gemm or the
slot kernel of kernels.slot_gemm (qmatmul_accumulate dispatches to them).

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

from ._common import group_contribution, int_to_float_exact, nibble_slot
from .frag_gemm import FRAG_PATH, try_frag_gemm
from .tma_frag_gemm import TMA_FRAG_PATH, TMA_PATHS, tma_grid, try_tma_frag_gemm
from .gemv_packed import try_packed_gemv
from .slot_gemm import try_slot_gemm
from .pdl import pdl_launch, release_dependents, wait_for_producer
from .tuning import FEW_ROWS_FALLBACK

STREAM_FALLBACK_SLICE = 512  # "tma-stream" configs run by the fragment kernel: its K slice


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
    codes = (w >> (nibble_slot(k, BITS) * BITS)[:, None]) & ((1 << BITS) - 1)                # [BK, BN]
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
    return acc + group_contribution(d, xs, s, z, BITS, ZERO_MODE, offset)


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


def _k_tile(block_k: int, lin, use_dot: bool) -> int:
    """The K tile of _qmatmul_kernel: a power of two (tl.arange) that stays inside one group, since
    a tile applies one group's scale. With one group (per-channel, or a group as long as K) any
    tile does, the last one masked: at most K rounded up to a power of two; else the group's largest
    power-of-two divisor, at most block_k. (min(block_k, group) was not a power of two for one
    group of K = 96, or a config whose field meant something else.) Tensor-core tiles need 16
    columns of K."""
    group = lin.group_size_eff
    if group >= lin.in_features:
        return min(block_k, max(16, triton.next_power_of_2(lin.in_features)))
    tile = min(block_k, group & -group)
    if use_dot and tile < 16:
        raise ValueError(f"qmatmul: groups of {group} columns hold no power-of-two tile of 16 or more, "
                         "which the tensor-core path needs")
    return tile


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
    (tensor cores), "packed" (the packed GEMV, M = 1, fp16 x, K a multiple of 32 / bits, no
    act-order; otherwise the FMA path), "slots" / "slots-unrolled" (kernels.slot_gemm: tensor
    cores, one dot per code slot, when a K slice of 16 word rows fits in a group; otherwise the
    tensor-core path) or "frags" (kernels.frag_gemm: the words as the MMAs' A fragments, integer or
    symmetric zero points, no act-order; otherwise the slot kernel's default tiles) or "tma-frags"
    (kernels.tma_frag_gemm: the fragment kernel's MMAs on operands staged by TMA, on Hopper and
    newer; where it cannot serve, the fragment kernel with the same tile and slice) or "tma-stream"
    (the same kernel, a tuned number of programs an SM sharing the work equally; where it cannot
    serve, the fragment kernel with the same tile and K slices of STREAM_FALLBACK_SLICE), either with
    the suffix "+scales" (the scales and zero points staged by TMA with the words). K_ITERS: K
    tiles per program, or for "packed" and the slot paths the column tiles each program's K slice
    spans; for "frags", BLOCK_K is the K slice and K_ITERS the K blocks whose loads are requested
    together; for "tma-frags", BLOCK_K is the K slice and K_ITERS the stages of its ring; for
    "tma-stream", BLOCK_K is the programs an SM and K_ITERS the stages."""
    x2 = _check(x, lin)
    m, k = x2.shape
    if m > 16:
        raise ValueError(f"qmatmul_accumulate: M={m} > 16; use qmatmul")
    if out.dtype != torch.float32 or out.numel() != m * lin.out_features:
        raise ValueError(f"qmatmul_accumulate: out must be fp32 [{m}, {lin.out_features}], got {out.dtype} {tuple(out.shape)}")
    out2 = out.view(m, lin.out_features)
    bn, bk, iters, nw, use_dot = config or lin.splitk_config(m)
    if try_packed_gemv(x2, lin, out2, (bn, bk, iters, nw, use_dot)):  # iters column tiles per program
        return out
    if try_slot_gemm(x2, lin, out2, (bn, bk, iters, nw, use_dot)):  # likewise
        return out
    if try_frag_gemm(x2, lin, out2, (bn, bk, iters, nw, use_dot)):  # bk: the K slice, iters: blocks at a time
        return out
    if try_tma_frag_gemm(x2, lin, out2, (bn, bk, iters, nw, use_dot)):  # bk: the K slice, iters: stages
        return out
    if use_dot in TMA_PATHS:  # no TMA, or not served: the fragment kernel, with a K slice in place of a stream's
        if tma_grid(use_dot) != TMA_FRAG_PATH:  # programs an SM
            bk, iters = STREAM_FALLBACK_SLICE, 1
        if try_frag_gemm(x2, lin, out2, (bn, bk, 1, nw, FRAG_PATH)):
            return out
    if use_dot in (FRAG_PATH,) + TMA_PATHS and try_slot_gemm(x2, lin, out2, FEW_ROWS_FALLBACK):
        return out
    use_dot = use_dot is True or m > 1
    bk = _k_tile(bk, lin, use_dot)
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
    bk = _k_tile(bk, lin, use_dot=True)
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
