"""Dequant-fused GEMV for decode: y[M, N] = x[M, K] @ W[N, K].T (+ bias) (+ residual), M small.

Layout read (prepared once by the triton backend, see `kernels.layout`): codes as int32 words
[N, K / EPW] (EPW = 32 / bits elements per word, low bits first), scales [N, G], zeros [N, G]
uint8 or offsets [N, G] float, optional act-order perm [K] applied to x in the kernel.

Math per group g of one row (q codes, x activations), all in fp32:
    D_g = sum_k x_k q_k,  X_g = sum_k x_k
    symmetric/int:  y += s_g * (D_g - z_g * X_g)        float: y += s_g * D_g + m_g * X_g
so the inner loop is only unpack (SHF+LOP3), one FADD and one FFMA per weight; scales and zeros are
read once per group and row. The same identity holds on any sub-chunk of a group, which lets one
tile size serve every group size (per-channel included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import unpack_words

ZERO_SYMMETRIC, ZERO_INT, ZERO_FLOAT = 0, 1, 2


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K, KW, group_size,
    stride_xm, stride_wn, stride_sn, stride_om,
    BITS: tl.constexpr, ZERO_MODE: tl.constexpr, GROUP_K: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    EPW: tl.constexpr = 32 // BITS              # codes per int32 word
    GPT: tl.constexpr = BLOCK_K // GROUP_K      # (sub)groups per tile
    WPG: tl.constexpr = GROUP_K // EPW          # words per (sub)group
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    gi = tl.arange(0, GPT)
    wi = tl.arange(0, WPG)
    ei = tl.arange(0, EPW)
    for m in tl.static_range(BLOCK_M):
        if m < M:
            acc = tl.zeros([BLOCK_N, GPT], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                # words of this tile: [BLOCK_N, GPT, WPG]
                word = k0 // EPW + gi[:, None] * WPG + wi[None, :]                      # [GPT, WPG]
                w = tl.load(w_ptr + rows[:, None, None] * stride_wn + word[None],
                            mask=row_ok[:, None, None] & (word[None] < KW), other=0)
                q = unpack_words(w, BITS)                                              # [BN, GPT, WPG, EPW]
                k = word[:, :, None] * EPW + ei[None, None, :]                         # [GPT, WPG, EPW]
                if HAS_PERM:
                    src = tl.load(perm_ptr + k, mask=k < K, other=0)
                else:
                    src = k
                x = tl.load(x_ptr + m * stride_xm + src, mask=k < K, other=0.0).to(tl.float32)
                d = tl.sum(tl.sum(q * x[None], axis=3), axis=2)                       # [BN, GPT]
                xs = tl.sum(tl.sum(x, axis=2), axis=1)                                 # [GPT]
                col = (k0 + gi * GROUP_K) // group_size                                # scale column
                sm = row_ok[:, None] & (k0 + gi[None, :] * GROUP_K < K)
                s = tl.load(s_ptr + rows[:, None] * stride_sn + col[None, :], mask=sm, other=0.0).to(tl.float32)
                if ZERO_MODE == 0:
                    acc += s * (d - (1 << (BITS - 1)) * xs[None, :])
                elif ZERO_MODE == 1:
                    z = tl.load(z_ptr + rows[:, None] * stride_sn + col[None, :], mask=sm, other=0).to(tl.float32)
                    acc += s * (d - z * xs[None, :])
                else:
                    off = tl.load(z_ptr + rows[:, None] * stride_sn + col[None, :], mask=sm, other=0.0).to(tl.float32)
                    acc += s * d + off * xs[None, :]
            y = tl.sum(acc, axis=1)
            if HAS_BIAS:
                y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                y += tl.load(res_ptr + m * stride_om + rows, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + m * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, lin, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
         block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16) @ W.T for a `kernels.layout.TritonLinear`; returns [M, N] in x's dtype.

    `residual` [M, N] is added in the epilogue (out may alias it)."""
    m, k = x.shape
    if k != lin.in_features:
        raise ValueError(f"gemv: x has K={k}, the weight has in_features={lin.in_features}")
    if m > 16:
        raise ValueError(f"gemv: M={m} > 16; use kernels.gemm")
    if x.stride(-1) != 1:
        raise ValueError("gemv: x must be contiguous along K")
    n = lin.out_features
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    cfg = lin.gemv_config(m)
    bn, bk, nw = block_n or cfg[0], block_k or cfg[1], num_warps or cfg[2]
    group_k = min(lin.group_size_eff, bk)
    grid = (triton.cdiv(n, bn),)
    _gemv_kernel[grid](
        x, lin.words, lin.scales, lin.zeros_or_offsets, lin.perm, lin.bias, residual, out,
        m, n, k, lin.words.shape[1], lin.group_size_eff,
        x.stride(0), lin.words.stride(0), lin.scales.stride(0), out.stride(0),
        BITS=lin.bits, ZERO_MODE=lin.zero_mode_id, GROUP_K=group_k,
        HAS_PERM=lin.perm is not None, HAS_BIAS=lin.bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=bn, BLOCK_K=bk, num_warps=nw,
    )
    return out
