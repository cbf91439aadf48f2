"""Flash-decoding: attention of one new token over the KV cache, split over the sequence.

Grid (KV heads, NUM_SPLITS): each program takes the G = H / KV query heads of one KV head (they
share every K/V load: GQA) and one contiguous chunk of the cache, and writes an unnormalised
partial output with its log-sum-exp; `_combine_kernel` merges the splits. The chunk size is
computed in the kernel from the sequence length held in device memory, so the grid is fixed and a
CUDA graph can replay the step at any length. Cache layout per layer: k, v [KV, S_max, hd]
(fp16/bf16, or int8 with fp32 scales [KV, S_max] per token and head, applied to the scores and
the probabilities instead of to every element).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import attend_block
from .pdl import pdl_launch, release_dependents, wait_for_producer


@triton.jit
def _flash_decode_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, seqlen_ptr, o_ptr, lse_ptr,
    stride_qh, stride_ckv, stride_cs, stride_skv, sm_scale,
    H: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_SPLITS: tl.constexpr, INT8: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    release_dependents(PDL)
    wait_for_producer(PDL)
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.load(seqlen_ptr)
    chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_S) * BLOCK_S
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    d = tl.arange(0, HD)
    heads = kvh * G + g
    q = tl.load(q_ptr + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    if INT8:
        q = q.to(tl.float16)
    else:
        q = q.to(k_ptr.dtype.element_ty)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HD], dtype=tl.float32)
    kv_base = kvh * stride_ckv
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < end
        m_i, l_i, acc = attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, ks_ptr, vs_ptr, kv_base, kvh * stride_skv,
                                     s, s_ok, s_ok[None, :], d, stride_cs, sm_scale, INT8, PRECISION)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(o_ptr + (split * H + heads)[:, None] * HD + d[None, :], out, mask=g_ok[:, None])
    tl.store(lse_ptr + split * H + heads, lse, mask=g_ok)


@triton.jit
def _combine_kernel(o_ptr, lse_ptr, out_ptr, H: tl.constexpr, HD: tl.constexpr, NUM_SPLITS: tl.constexpr,
                    PDL: tl.constexpr):
    release_dependents(PDL)
    wait_for_producer(PDL)
    h = tl.program_id(0)
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HD)
    lse = tl.load(lse_ptr + sp * H + h)
    w = tl.exp(lse - tl.max(lse, axis=0))          # empty splits have lse -inf: weight 0
    w = w / tl.sum(w, axis=0)
    o = tl.load(o_ptr + (sp * H + h)[:, None] * HD + d[None, :])
    tl.store(out_ptr + h * HD + d, tl.sum(o * w[:, None], axis=0).to(out_ptr.dtype.element_ty))


def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_len: torch.Tensor,
                 out: torch.Tensor, num_splits: int = 32, block_s: int = 128,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                 workspace: tuple[torch.Tensor, torch.Tensor] | None = None, num_warps: int = 4) -> torch.Tensor:
    """q [H, hd] over one layer's cache [KV, S, hd] for the first seq_len (int32 [1], device) positions.

    out [H * hd]. `workspace` (o [splits, H, hd] fp32, lse [splits, H] fp32) can be passed to avoid
    allocations (required under CUDA graph capture)."""
    h, hd = q.shape
    kv = k_cache.shape[0]
    if h % kv:
        raise ValueError(f"flash_decode: {h} query heads are not a multiple of {kv} KV heads")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("flash_decode: k and v caches must share a contiguous [KV, S, hd] layout")
    int8 = k_cache.dtype == torch.int8
    if int8 and (k_scale is None or v_scale is None):
        raise ValueError("flash_decode: an int8 cache needs k_scale and v_scale")
    if num_splits & (num_splits - 1):
        raise ValueError(f"flash_decode: num_splits={num_splits} must be a power of two")
    if workspace is None:
        workspace = (torch.empty((num_splits, h, hd), device=q.device, dtype=torch.float32),
                     torch.empty((num_splits, h), device=q.device, dtype=torch.float32))
    o, lse = workspace
    g = h // kv
    _flash_decode_kernel[(kv, num_splits)](
        q, k_cache, v_cache, k_scale, v_scale, seq_len, o, lse,
        q.stride(0), k_cache.stride(0), k_cache.stride(1), 0 if k_scale is None else k_scale.stride(0),
        hd ** -0.5,
        H=h, G=g, HD=hd, BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_S=block_s,
        NUM_SPLITS=num_splits, INT8=int8,
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",  # fp32 caches: exact dots
        num_warps=num_warps, **pdl_launch(q),
    )
    _combine_kernel[(h,)](o, lse, out, H=h, HD=hd, NUM_SPLITS=num_splits, **pdl_launch(q))
    return out
