"""RoPE for q and k in one pass, writing k and v into the KV cache (fp16, or int8 + scale).

Used by prefill (the decode step does the same inside kernels.flash_decode). Input: the fused
q|k|v matmul output [M, (H + 2 KV) * hd], token positions [M] (int32, on the device), cos/sin
tables [S_max, hd/2] (fp32, rope scaling already applied). One program per (token, head):
  q heads  -> optional RMSNorm over the head (Qwen3) -> rotate -> q_out [M, H, hd]
  k heads  -> optional RMSNorm -> rotate -> cache k[kv, pos]   (int8: per-token-per-head scale)
  v heads  -> cache v[kv, pos]
The decode step does the same inside kernels.flash_decode with `rope_factors`, `roped_heads` (a tile of heads) and
`write_new_position` (one cache row) below, sharing this file's int8 quantization.
Rotation is the "rotate_half" convention: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
int8 cache: scale = max|x| / 127, stored as round(x / scale); dequantized as code * scale.

Padded heads: the attention kernels lay a head out as one power-of-two range (tl.arange), so a
model whose head_dim is not a power of two (OpenLLaMA 3B: 100) runs with heads of HD = the next
power of two: each half of a head (x1, x2) starts a half of the padded head (padded_head_slots),
zeros fill the rest, and the cos/sin tables get cos 1, sin 0 there. Rotation, attention and the
int8 scale (max |x|) then see the real dims and zeros: only the softmax scale (head_dim ** -0.5)
and the output's layout (head_dims_of_slots) need the real head_dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, release_dependents, wait_for_producer


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, bias_ptr, pos_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr,
    q_out_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    stride_qkv, stride_qo, stride_ckv, stride_cs, stride_skv, eps,
    H: tl.constexpr, KV: tl.constexpr, HD: tl.constexpr,
    HAS_BIAS: tl.constexpr, QK_NORM: tl.constexpr, INT8: tl.constexpr, PDL: tl.constexpr,
):
    release_dependents(PDL)
    wait_for_producer(PDL)
    m = tl.program_id(0)
    head = tl.program_id(1)                    # 0..H-1 q, H..H+KV-1 k, then v
    HALF: tl.constexpr = HD // 2
    i = tl.arange(0, HALF)
    base = m * stride_qkv + head * HD
    x1 = tl.load(qkv_ptr + base + i).to(tl.float32)
    x2 = tl.load(qkv_ptr + base + HALF + i).to(tl.float32)
    if HAS_BIAS:
        x1 += tl.load(bias_ptr + head * HD + i).to(tl.float32)
        x2 += tl.load(bias_ptr + head * HD + HALF + i).to(tl.float32)
    pos = tl.load(pos_ptr + m)
    if head < H + KV:                          # q or k: (norm) + rotate
        if QK_NORM:
            rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HD + eps)
            nw_ptr = qn_ptr if head < H else kn_ptr
            x1 = x1 * rstd * tl.load(nw_ptr + i).to(tl.float32)
            x2 = x2 * rstd * tl.load(nw_ptr + HALF + i).to(tl.float32)
        c = tl.load(cos_ptr + pos * HALF + i)
        s = tl.load(sin_ptr + pos * HALF + i)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        if head < H:
            qo = m * stride_qo + head * HD
            tl.store(q_out_ptr + qo + i, y1.to(q_out_ptr.dtype.element_ty))
            tl.store(q_out_ptr + qo + HALF + i, y2.to(q_out_ptr.dtype.element_ty))
        else:
            kvh = head - H
            _store_cache(k_cache_ptr, k_scale_ptr, kvh * stride_skv + pos, kvh * stride_ckv + pos * stride_cs, i,
                         y1, y2, HALF, INT8)
    else:                                      # v: straight into the cache
        kvh = head - H - KV
        _store_cache(v_cache_ptr, v_scale_ptr, kvh * stride_skv + pos, kvh * stride_ckv + pos * stride_cs, i,
                     x1, x2, HALF, INT8)


@triton.jit
def _store_cache(cache_ptr, scale_ptr, scale_off, offs, i, x1, x2, HALF: tl.constexpr, INT8: tl.constexpr):
    """Writes one head vector (two halves) at cache offset `offs`; int8: with its scale."""
    if INT8:
        scale = _int8_scale(tl.maximum(tl.max(tl.abs(x1), axis=0), tl.max(tl.abs(x2), axis=0)))
        tl.store(cache_ptr + offs + i, _int8_codes(x1, scale).to(tl.int8))
        tl.store(cache_ptr + offs + HALF + i, _int8_codes(x2, scale).to(tl.int8))
        tl.store(scale_ptr + scale_off, scale)
    else:
        tl.store(cache_ptr + offs + i, x1.to(cache_ptr.dtype.element_ty))
        tl.store(cache_ptr + offs + HALF + i, x2.to(cache_ptr.dtype.element_ty))


@triton.jit
def _int8_scale(amax):
    """The int8 cache's per-token-per-head scale: max|x| / 127 (kept above 0 for a zero vector)."""
    return tl.maximum(amax, 1e-8) / 127.0


@triton.jit
def _int8_codes(x, scale):
    """round(x / scale), halves up, as float (the caller casts to int8)."""
    return tl.floor(x / scale + 0.5)


def padded_head_slots(head_dim: int, padded: int) -> torch.Tensor:
    """Where each of a head's head_dim dims sits in a head padded to `padded` dims: the first half
    at 0.., the second at padded / 2.. (so "rotate_half" pairs stay halves apart). int64 [head_dim]."""
    half = head_dim // 2
    dims = torch.arange(head_dim)
    return torch.where(dims < half, dims, dims - half + padded // 2)


@triton.jit
def head_dims_of_slots(d, HD: tl.constexpr, REAL_HD: tl.constexpr):
    """padded_head_slots' inverse for slots d of a head padded to HD dims: (the real dim each slot
    holds, whether it holds one)."""
    HALF: tl.constexpr = HD // 2
    REAL_HALF: tl.constexpr = REAL_HD // 2
    in_half = d % HALF
    return tl.where(d < HALF, d, d - HALF + REAL_HALF), in_half < REAL_HALF


@triton.jit
def rope_factors(cos_ptr, sin_ptr, pos, d, HD: tl.constexpr):
    """cos and sin of position `pos` for each of the HD dims of a head ("rotate_half" order): [1, HD]."""
    HALF: tl.constexpr = HD // 2
    c = tl.load(cos_ptr + pos * HALF + d % HALF)[None, :]
    s = tl.load(sin_ptr + pos * HALF + d % HALF)[None, :]
    return c, s


@triton.jit
def roped_heads(qkv_ptr, rows, row_ok, scale, bias_ptr, c, s, norm_ptr, eps, d, HD: tl.constexpr,
                QK_NORM: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Head vectors `rows` of the q|k|v accumulator times `scale` (plus the bias, HAS_BIAS),
    RMSNorm-ed over the head (QK_NORM) and rotated by the factors c, s of rope_factors
    ("rotate_half", as kernels.rope): [rows, HD] fp32."""
    HALF: tl.constexpr = HD // 2
    partner = (d + HALF) % HD                                  # x2 for the first half, x1 for the second
    offs = rows[:, None] * HD + d[None, :]
    offs_p = rows[:, None] * HD + partner[None, :]
    x = tl.load(qkv_ptr + offs, mask=row_ok[:, None], other=0.0) * scale
    xp = tl.load(qkv_ptr + offs_p, mask=row_ok[:, None], other=0.0) * scale
    if HAS_BIAS:
        x += tl.load(bias_ptr + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        xp += tl.load(bias_ptr + offs_p, mask=row_ok[:, None], other=0.0).to(tl.float32)
    if QK_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HD + eps)
        x = x * rstd[:, None] * tl.load(norm_ptr + d).to(tl.float32)[None, :]
        xp = xp * rstd[:, None] * tl.load(norm_ptr + partner).to(tl.float32)[None, :]
    return x * c + tl.where((d < HALF)[None, :], -xp, xp) * s


@triton.jit
def write_new_position(cache_ptr, scale_ptr, x, cache_off, scale_off, d, INT8: tl.constexpr):
    """Stores the new token's k or v ([1, HD] fp32) in the cache (int8: with its scale, as
    kernels.rope) and returns it as the cache now holds it, for this step's attention."""
    if INT8:
        scale = _int8_scale(tl.max(tl.abs(x), axis=1))                        # [1]
        codes = _int8_codes(x, scale[:, None])
        tl.store(cache_ptr + cache_off + d[None, :], codes.to(tl.int8))
        tl.store(scale_ptr + scale_off + tl.arange(0, 1), scale)
        return codes * scale[:, None]
    else:
        stored = x.to(cache_ptr.dtype.element_ty)
        tl.store(cache_ptr + cache_off + d[None, :], stored)
        return stored.to(tl.float32)


def rope_qkv_to_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      q_out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      num_heads: int, num_kv_heads: int, head_dim: int,
                      bias: torch.Tensor | None = None, q_norm: torch.Tensor | None = None,
                      k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """qkv [M, (H+2KV)*hd] -> q_out [M, H, hd]; k/v written to one layer's cache [KV, S, hd] at positions.

    int8 caches (k_cache.dtype == int8) need k_scale/v_scale [KV, S] fp32."""
    m = qkv.shape[0]
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"rope: qkv width {qkv.shape[1]} != (H + 2KV) * hd")
    int8 = k_cache.dtype == torch.int8
    if int8 and (k_scale is None or v_scale is None):
        raise ValueError("rope: an int8 cache needs k_scale and v_scale")
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("rope: k and v caches must share a contiguous [KV, S, hd] layout")
    _rope_cache_kernel[(m, num_heads + 2 * num_kv_heads)](
        qkv, bias, positions, cos, sin, q_norm, k_norm, q_out, k_cache, v_cache, k_scale, v_scale,
        qkv.stride(0), q_out.stride(0), k_cache.stride(0), k_cache.stride(1),
        0 if k_scale is None else k_scale.stride(0), eps,
        H=num_heads, KV=num_kv_heads, HD=head_dim, HAS_BIAS=bias is not None, QK_NORM=q_norm is not None,
        INT8=int8, **pdl_launch(qkv),
    )
