"""Causal flash attention for prefill, reading K/V from the cache (already written by the RoPE
kernel), so a prompt can be processed in chunks: query i sits at position start + i and sees
cache positions 0 .. start + i. GQA: query head h reads KV head h // (H / KV). fp16/bf16 or int8
cache (scales as in `kernels.flash_decode`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import attend_block
from .rope import head_dims_of_slots


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr,
    M, start, stride_qm, stride_qh, stride_ckv, stride_cs, stride_skv, stride_om, sm_scale,
    G: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INT8: tl.constexpr, PRECISION: tl.constexpr,
    OUT_HD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_ok = i < M
    d = tl.arange(0, HD)
    q = tl.load(q_ptr + i[:, None] * stride_qm + h * stride_qh + d[None, :], mask=i_ok[:, None], other=0.0)
    if INT8:
        q = q.to(tl.float16)
    else:
        q = q.to(k_ptr.dtype.element_ty)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HD], dtype=tl.float32)
    q_pos = start + i
    last = tl.minimum(start + (pid_m + 1) * BLOCK_M, start + M)   # keys beyond the block's last query are masked
    kv_base = kvh * stride_ckv
    for j0 in range(0, last, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < last
        visible = j_ok[None, :] & (j[None, :] <= q_pos[:, None])
        m_i, l_i, acc = attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, ks_ptr, vs_ptr, kv_base, kvh * stride_skv,
                                     j, j_ok, visible, d, stride_cs, sm_scale, INT8, PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if OUT_HD == HD:
        tl.store(out_ptr + i[:, None] * stride_om + h * HD + d[None, :], out.to(out_ptr.dtype.element_ty), mask=i_ok[:, None])
    else:  # heads padded to HD dims (kernels.rope.padded_head_slots): the real OUT_HD dims, packed
        real, is_real = head_dims_of_slots(d, HD, OUT_HD)
        tl.store(out_ptr + i[:, None] * stride_om + h * OUT_HD + real[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=i_ok[:, None] & is_real[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                      out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64,
                      head_dim: int | None = None) -> torch.Tensor:
    """q [M, H, hd] at positions start..start+M-1 over one layer's cache [KV, S, hd] -> [M, H * hd].
    head_dim: the model's head size when hd pads it (kernels.rope.padded_head_slots): the scores are
    scaled by head_dim ** -0.5 and the output is [M, H * head_dim], the real dims only."""
    m, h, hd = q.shape
    real_hd = head_dim or hd
    kv = k_cache.shape[0]
    if h % kv:
        raise ValueError(f"prefill_attention: {h} query heads are not a multiple of {kv} KV heads")
    int8 = k_cache.dtype == torch.int8
    if int8 and (k_scale is None or v_scale is None):
        raise ValueError("prefill_attention: an int8 cache needs k_scale and v_scale")
    if out is None:
        out = torch.empty((m, h * real_hd), device=q.device, dtype=q.dtype)
    block_m = min(block_m, max(16, triton.next_power_of_2(m)))
    _prefill_attention_kernel[(triton.cdiv(m, block_m), h)](
        q, k_cache, v_cache, k_scale, v_scale, out,
        m, start, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        0 if k_scale is None else k_scale.stride(0), out.stride(0), real_hd ** -0.5,
        G=h // kv, HD=hd, BLOCK_M=block_m, BLOCK_N=block_n, INT8=int8,
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",  # fp32 caches: exact dots
        OUT_HD=real_hd,
    )
    return out
