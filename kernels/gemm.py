"""Dequant-fused GEMM for prefill (and M = 2..16): tiles of W are unpacked to the activation dtype
in registers and fed to tl.dot (tensor cores), accumulating in fp32.

Reads the same prepared layout as `kernels.gemv` (see `kernels.layout`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import unpack_words


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K, KW, group_size,
    stride_xm, stride_wn, stride_sn, stride_om,
    BITS: tl.constexpr, ZERO_MODE: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    EPW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // EPW
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        word = k0 // EPW + tl.arange(0, BKW)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + word[None, :],
                    mask=(rn[:, None] < N) & (word[None, :] < KW), other=0)
        q = tl.reshape(unpack_words(w, BITS), (BLOCK_N, BLOCK_K))                      # [BN, BK]
        k = k0 + tl.arange(0, BLOCK_K)
        col = k // group_size
        sm = (rn[:, None] < N) & (k[None, :] < K)
        s = tl.load(s_ptr + rn[:, None] * stride_sn + col[None, :], mask=sm, other=0.0).to(tl.float32)
        if ZERO_MODE == 0:
            wdq = s * (q - (1 << (BITS - 1)))
        elif ZERO_MODE == 1:
            z = tl.load(z_ptr + rn[:, None] * stride_sn + col[None, :], mask=sm, other=0).to(tl.float32)
            wdq = s * (q - z)
        else:
            off = tl.load(z_ptr + rn[:, None] * stride_sn + col[None, :], mask=sm, other=0.0).to(tl.float32)
            wdq = s * q + off
        if HAS_PERM:
            src = tl.load(perm_ptr + k, mask=k < K, other=0)
        else:
            src = k
        x = tl.load(x_ptr + rm[:, None] * stride_xm + src[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(wdq.to(x.dtype)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + rm[:, None] * stride_om + rn[None, :], mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


def gemm(x: torch.Tensor, lin, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
         config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16) @ W.T for a `kernels.layout.TritonLinear`; returns [M, N] in x's dtype."""
    m, k = x.shape
    if k != lin.in_features:
        raise ValueError(f"gemm: x has K={k}, the weight has in_features={lin.in_features}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gemm: x dtype {x.dtype} is not fp16/bf16/fp32")
    if x.stride(-1) != 1:
        raise ValueError("gemm: x must be contiguous along K")
    n = lin.out_features
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    bm, bn, bk, nw, ns = config or lin.gemm_config(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _gemm_kernel[grid](
        x, lin.words, lin.scales, lin.zeros_or_offsets, lin.perm, lin.bias, residual, out,
        m, n, k, lin.words.shape[1], lin.group_size_eff,
        x.stride(0), lin.words.stride(0), lin.scales.stride(0), out.stride(0),
        BITS=lin.bits, ZERO_MODE=lin.zero_mode_id,
        HAS_PERM=lin.perm is not None, HAS_BIAS=lin.bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns,
    )
    return out
