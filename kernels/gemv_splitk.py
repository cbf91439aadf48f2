"""Split-K dequant-fused GEMV for decode (M = 1..16), accumulating into an fp32 output with atomics.

Layout read (prepared by `kernels.layout.prepare_splitk`): the packed format's int32 words
transposed to [K / EPW, N] (N contiguous: a thread's 16-byte load covers 4 consecutive outputs),
scales and zeros/offsets transposed to [G, N]. Each program reduces K_ITERS tiles of
BLOCK_K x BLOCK_N and adds its partial sums to `out` (fp32) with one atomic per output. Many short
programs keep all SMs busy on short-N shapes, and the caller chooses what `out` starts from
(zeros, the bias, or the fp32 residual stream itself, so "h += x @ W.T" needs no extra pass).

Rows k // EPW of a tile repeat EPW times (L1 hits); each element takes its own shift, so codes
unpack straight into a [BLOCK_K, BLOCK_N] tile with no reshape.

Two ways to multiply, chosen by USE_DOT:
- FMA (M = 1): codes -> exact fp32 with the 2^23 mantissa trick, then multiply-reduce over K.
- DOT: codes -> fp16 "1024 + q" by or-ing them into the mantissa of 1024.0 (0x6400; exact for
  q < 1024, no conversion instruction), then tensor-core tl.dot with x padded to 16 rows. The
  1024 is removed with the zero point: sum x (1024 + q) - (1024 + z) sum x = sum x (q - z).
Tile math, BLOCK_K inside one group:
    D = sum_k x_k q_k,  X = sum_k x_k,  y += s (D - z X)   or   y += s D + m X   (float zeros)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import int_to_float_exact


@triton.jit
def _gemv_splitk_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, out_ptr,
    M, N, K, group_size, stride_xm, stride_wk, stride_sg, stride_om,
    BITS: tl.constexpr, ZERO_MODE: tl.constexpr, HAS_PERM: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr,
):
    EPW: tl.constexpr = 32 // BITS
    offset: tl.constexpr = 1024.0 if USE_DOT else 0.0  # what the fp16 codes carry besides q
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in tl.static_range(K_ITERS):
        k0 = (pid_k * K_ITERS + it) * BLOCK_K
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(w_ptr + (k // EPW)[:, None] * stride_wk + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0)
        codes = (w >> ((k % EPW) * BITS)[:, None]) & ((1 << BITS) - 1)                       # [BK, BN]
        if HAS_PERM:
            src = tl.load(perm_ptr + k, mask=k_ok, other=0)
        else:
            src = k
        x = tl.load(x_ptr + rm[:, None] * stride_xm + src[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_DOT:
            wf = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)                    # 1024 + q
            d = tl.dot(x.to(tl.float16), wf)                                                   # [BM, BN]
            xs = tl.sum(x.to(tl.float16).to(tl.float32), axis=1)                               # what the dot saw
        else:
            q = int_to_float_exact(codes)
            d = tl.sum(x.to(tl.float32)[:, :, None] * q[None, :, :], axis=1)
            xs = tl.sum(x.to(tl.float32), axis=1)
        g = k0 // group_size
        sm = n_ok & ((k0 + tl.zeros([BLOCK_N], dtype=tl.int32)) < K)
        s = tl.load(s_ptr + g * stride_sg + n, mask=sm, other=0.0).to(tl.float32)[None, :]
        if ZERO_MODE == 0:
            acc += s * (d - (offset + (1 << (BITS - 1))) * xs[:, None])
        elif ZERO_MODE == 1:
            z = tl.load(z_ptr + g * stride_sg + n, mask=sm, other=0).to(tl.float32)[None, :]
            acc += s * (d - (offset + z) * xs[:, None])
        else:
            off = tl.load(z_ptr + g * stride_sg + n, mask=sm, other=0.0).to(tl.float32)[None, :]
            acc += s * (d - offset * xs[:, None]) + off * xs[:, None]
    tl.atomic_add(out_ptr + rm[:, None] * stride_om + n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")


def gemv_splitk_accumulate(x: torch.Tensor, lin, out: torch.Tensor,
                           config: tuple[int, int, int, int, bool] | None = None) -> torch.Tensor:
    """out[M, N] (fp32) += x[M, K] @ W.T for a `kernels.layout.SplitKLinear`, M <= 16; returns out."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    if k != lin.in_features or m > 16:
        raise ValueError(f"gemv_splitk: x must be [M <= 16, K={lin.in_features}], got {tuple(x.shape)}")
    if x2.stride(-1) != 1:
        raise ValueError("gemv_splitk: x must be contiguous along K")
    out2 = out.view(m, lin.out_features)
    if out.dtype != torch.float32:
        raise ValueError(f"gemv_splitk: out must be fp32, got {out.dtype}")
    bn, bk, iters, nw, use_dot = config or lin.splitk_config(m)
    use_dot = use_dot or m > 1
    bk = min(bk, lin.group_size_eff)  # a tile must stay inside one group
    grid = (triton.cdiv(lin.out_features, bn), triton.cdiv(k, bk * iters))
    _gemv_splitk_kernel[grid](
        x2, lin.words, lin.scales, lin.zeros_or_offsets, lin.perm, out2,
        m, lin.out_features, k, lin.group_size_eff, x2.stride(0), lin.words.stride(0), lin.scales.stride(0),
        out2.stride(0),
        BITS=lin.bits, ZERO_MODE=lin.zero_mode_id, HAS_PERM=lin.perm is not None, USE_DOT=use_dot,
        BLOCK_M=16 if use_dot else 1, BLOCK_N=bn, BLOCK_K=bk, K_ITERS=iters, num_warps=nw,
    )
    return out
