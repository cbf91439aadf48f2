"""Split-K dequant-fused GEMV (decode, M = 1) that accumulates into an fp32 output with atomics.

Layout read (prepared by `kernels.layout.prepare_splitk`): the packed format's words transposed to
[K / EPW, N] (N contiguous, so a warp's 16-byte loads cover 4 consecutive outputs), scales and
zeros/offsets transposed to [G, N]. Each program reduces K_ITERS tiles of BLOCK_K x BLOCK_N and
adds its partial sums to `out` (fp32) with one atomic per output: many short programs keep every
SM busy on short-N shapes, and the caller chooses what `out` starts from (zeros, the bias, or the
residual stream itself: then "y = residual + x @ W.T" costs no extra pass).

Tile math, BLOCK_K inside one group (BLOCK_K <= group_size):
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
    N, K, group_size, stride_wk, stride_sg,
    BITS: tl.constexpr, ZERO_MODE: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr,
):
    EPW: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for it in tl.static_range(K_ITERS):
        k0 = (pid_k * K_ITERS + it) * BLOCK_K
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        # rows k // EPW repeat EPW times: the repeats are L1 hits, and every element gets its own
        # shift, so the tile unpacks straight into [BLOCK_K, BLOCK_N] without a reshape
        w = tl.load(w_ptr + (k // EPW)[:, None] * stride_wk + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0)
        q = int_to_float_exact((w >> ((k % EPW) * BITS)[:, None]) & ((1 << BITS) - 1))
        if HAS_PERM:
            src = tl.load(perm_ptr + k, mask=k_ok, other=0)
        else:
            src = k
        x = tl.load(x_ptr + src, mask=k_ok, other=0.0).to(tl.float32)
        d = tl.sum(q * x[:, None], axis=0)
        xs = tl.sum(x, axis=0)
        g = k0 // group_size
        sm = n_ok & ((k0 + tl.zeros([BLOCK_N], dtype=tl.int32)) < K)
        s = tl.load(s_ptr + g * stride_sg + n, mask=sm, other=0.0).to(tl.float32)
        if ZERO_MODE == 0:
            acc += s * (d - (1 << (BITS - 1)) * xs)
        elif ZERO_MODE == 1:
            z = tl.load(z_ptr + g * stride_sg + n, mask=sm, other=0).to(tl.float32)
            acc += s * (d - z * xs)
        else:
            off = tl.load(z_ptr + g * stride_sg + n, mask=sm, other=0.0).to(tl.float32)
            acc += s * d + off * xs
    tl.atomic_add(out_ptr + n, acc, mask=n_ok, sem="relaxed")


def gemv_splitk_accumulate(x: torch.Tensor, lin, out: torch.Tensor, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """out[N] (fp32) += x[K] @ W.T for a `kernels.layout.SplitKLinear`; returns out."""
    k = x.shape[-1]
    if x.numel() != k or k != lin.in_features:
        raise ValueError(f"gemv_splitk: x must be one row of K={lin.in_features}, got shape {tuple(x.shape)}")
    if out.dtype != torch.float32 or out.numel() != lin.out_features:
        raise ValueError(f"gemv_splitk: out must be fp32 with {lin.out_features} elements, got {out.dtype} {tuple(out.shape)}")
    bn, bk, iters, nw = config or lin.splitk_config()
    if bk > lin.group_size_eff:
        bk = lin.group_size_eff  # a tile must stay inside one group
    grid = (triton.cdiv(lin.out_features, bn), triton.cdiv(k, bk * iters))
    _gemv_splitk_kernel[grid](
        x, lin.words, lin.scales, lin.zeros_or_offsets, lin.perm, out,
        lin.out_features, k, lin.group_size_eff, lin.words.stride(0), lin.scales.stride(0),
        BITS=lin.bits, ZERO_MODE=lin.zero_mode_id, HAS_PERM=lin.perm is not None,
        BLOCK_N=bn, BLOCK_K=bk, K_ITERS=iters, num_warps=nw,
    )
    return out
