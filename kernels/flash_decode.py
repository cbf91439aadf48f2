"""Flash-decoding: attention of one new token over the KV cache, split over the sequence.

Grid (KV heads, NUM_SPLITS): each program takes the G = H / KV query heads of one KV head (they
share every K/V load: GQA) and one contiguous chunk of the cache, and writes an unnormalised
partial output with its log-sum-exp; `_combine_kernel` merges the splits (`merge_splits`). In
the decode step (ROPE) the programs also do kernels.rope's work for the new token: each rotates
its q heads from the fp32 q|k|v accumulator, and the program whose chunk holds the new position
writes the rotated k and v there and attends to them from registers (no other program reads that
position), so the step has no RoPE launch; and when the q|k|v GEMV deferred the layer's input
RMSNorm (RopeInput.input_norm), they apply its scale to q, k and v first, so the step has no norm
launch there. The decode step has no combine launch either: its
o_proj GEMV merges the splits of its own K slice (flash_decode_splits, then
kernels.gemv_packed.qmatmul_accumulate_attention; 8B w4 -6.6% per token at 384 positions, -13.6%
at 8k on an H200), and zeroes the accumulators the combine would (`clear`). (Merging the splits
in the last program to finish instead was measured slower: one program per KV head merges
serially.) The chunk size is
computed in the kernel from the sequence length held in device memory, so the grid is fixed and a
CUDA graph can replay the step at any length. Cache layout per layer: k, v [KV, S_max, hd]
(fp16/bf16, or int8 with fp32 scales [KV, S_max] per token and head, applied to the scores and
the probabilities instead of to every element).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import attend_block, attend_loaded, attend_loaded_heads_last, load_block
from .pdl import pdl_launch, release_dependents, wait_for_producer
from .rmsnorm import DeferredNorm, deferred_rms_scale
from .rope import head_dims_of_slots, rope_factors, roped_heads, write_new_position


@dataclass(frozen=True)
class RopeInput:
    """The decode step's q|k|v accumulator and what RoPE needs: given it, flash_decode rotates q and
    the new token's k itself and writes the new k/v into the cache (what kernels.rope does in
    prefill), so the decode step needs no RoPE launch."""
    qkv: torch.Tensor                      # fp32 [1, (H + 2 KV) * hd]: q heads, k heads, v heads (bias included)
    cos: torch.Tensor                      # fp32 [S_max, hd / 2], rope scaling applied
    sin: torch.Tensor
    q_norm: torch.Tensor | None = None     # per-head RMSNorm weights [hd] (Qwen3), or None
    k_norm: torch.Tensor | None = None
    eps: float = 1e-6
    # the layer's input RMSNorm, when the q|k|v GEMV left its scale to this kernel
    # (kernels.gemv_packed.qmatmul_accumulate_deferred_norm): q, k and v are scaled first, then
    # qkv_bias ([(H + 2 KV) * hd], any float dtype) is added when that GEMV left its bias out too
    input_norm: DeferredNorm | None = None
    qkv_bias: torch.Tensor | None = None


COMBINE_PIECE = 32  # dims of one head a combine program merges (ab_combine_pieces.log: 32 of 128, 7 of 8 tiles faster)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _flash_decode_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, seqlen_ptr, o_ptr, lse_ptr,
    qkv_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, eps, ss_ptr, norm_dim, norm_eps, qkv_bias_ptr,
    stride_qh, stride_ckv, stride_cs, stride_skv, sm_scale,
    H: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr, NUM_SPLITS: tl.constexpr, INT8: tl.constexpr, PRECISION: tl.constexpr,
    ROPE: tl.constexpr, QK_NORM: tl.constexpr, DEFERRED_NORM: tl.constexpr, QKV_BIAS: tl.constexpr,
    HEADS_LAST: tl.constexpr, PDL: tl.constexpr,
):
    release_dependents(PDL)
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    # In the decode step (ROPE), the sequence length, the cache's earlier positions and the RoPE
    # tables were all written before the step began (its first kernel is an ordinary launch), and
    # no kernel of the step writes them: the first block of the chunk is requested before waiting
    # for the previous kernel (PDL), and its latency overlaps the q|k|v GEMV's end; only q waits.
    # (With the decode step's 32 splits of 64 positions, that block is the whole chunk up to 2048
    # positions.) Called alone, q and the cache may both come from the previous kernel: wait first.
    if not ROPE:
        wait_for_producer(PDL)
    length = tl.load(seqlen_ptr)
    chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_S) * BLOCK_S
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    d = tl.arange(0, HD)
    heads = kvh * G + g
    kv_base = kvh * stride_ckv
    if ROPE:
        # the new token (position length - 1) is not in the cache yet: this launch writes it
        pos = length - 1
        cached_end = tl.minimum(end, pos)
        rope_cos, rope_sin = rope_factors(cos_ptr, sin_ptr, pos, d, HD)
        s = start + tl.arange(0, BLOCK_S)
        s_ok = s < cached_end
        k0, v0 = load_block(k_ptr, v_ptr, kv_base, s, s_ok, d, stride_cs)
        wait_for_producer(PDL)
        if DEFERRED_NORM:  # q|k|v was accumulated from h * w: the input RMSNorm's scale applies here
            norm_scale = deferred_rms_scale(ss_ptr, norm_dim, norm_eps)
        else:
            norm_scale = 1.0
        # q, and the new token's k and v, from the accumulator the q|k|v GEMV just filled; the
        # program whose chunk holds the new position requests k and v with q, not after its
        # attention over the cache: that program is the step's slowest
        q = roped_heads(qkv_ptr, heads, g_ok, norm_scale, qkv_bias_ptr, rope_cos, rope_sin, qn_ptr, eps, d, HD,
                        QK_NORM, QKV_BIAS)
        holds_new = (start <= pos) & (pos < end)
        one = tl.arange(0, 1)
        new_ok = (start + one <= pos) & (pos < end + one)                               # holds_new, as [1]
        k_new = roped_heads(qkv_ptr, H + kvh + one, new_ok, norm_scale, qkv_bias_ptr, rope_cos, rope_sin, kn_ptr, eps,
                            d, HD, QK_NORM, QKV_BIAS)
        v_off = (H + KV + kvh) * HD + d[None, :]
        v_new = tl.load(qkv_ptr + v_off, mask=new_ok[:, None], other=0.0) * norm_scale
        if QKV_BIAS:
            v_new += tl.load(qkv_bias_ptr + v_off, mask=new_ok[:, None], other=0.0).to(tl.float32)
    else:
        cached_end = end
        q = tl.load(q_ptr + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    dot_type = tl.float16 if INT8 else k_ptr.dtype.element_ty
    # HEADS_LAST (attend_loaded_heads_last): scores, m_i and the log-sum-exp in log2 units, acc is [HD, G]
    qt = tl.trans((q.to(tl.float32) * (sm_scale * LOG2E)).to(dot_type))
    q = q.to(dot_type)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    if HEADS_LAST:
        acc = tl.zeros([HD, BLOCK_G], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_G, HD], dtype=tl.float32)
    if ROPE and cached_end - start <= BLOCK_S:  # the chunk is one block at most: the one requested above
        if start < cached_end:
            if HEADS_LAST:
                m_i, l_i, acc = attend_loaded_heads_last(qt, m_i, l_i, acc, k0, v0, ks_ptr, vs_ptr, kvh * stride_skv,
                                                         s, s_ok, INT8, PRECISION)
            else:
                m_i, l_i, acc = attend_loaded(q, m_i, l_i, acc, k0, v0, ks_ptr, vs_ptr, kvh * stride_skv, s, s_ok,
                                              s_ok[None, :], sm_scale, INT8, PRECISION)
    else:  # longer chunks: the whole loop, which Triton pipelines (peeling its first block costs a stall)
        for s0 in range(start, cached_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < cached_end
            if HEADS_LAST:
                k, v = load_block(k_ptr, v_ptr, kv_base, s, s_ok, d, stride_cs)
                m_i, l_i, acc = attend_loaded_heads_last(qt, m_i, l_i, acc, k, v, ks_ptr, vs_ptr, kvh * stride_skv,
                                                         s, s_ok, INT8, PRECISION)
            else:
                m_i, l_i, acc = attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, ks_ptr, vs_ptr, kv_base, kvh * stride_skv,
                                             s, s_ok, s_ok[None, :], d, stride_cs, sm_scale, INT8, PRECISION)
    if ROPE:
        if holds_new:  # this program's chunk holds the new token: write it, attend to it
            cache_off = kv_base + pos * stride_cs
            k_new = write_new_position(k_ptr, ks_ptr, k_new, cache_off, kvh * stride_skv + pos, d, INT8)
            v_new = write_new_position(v_ptr, vs_ptr, v_new, cache_off, kvh * stride_skv + pos, d, INT8)
            score = tl.sum(q.to(tl.float32) * k_new, axis=1) * sm_scale                  # [BLOCK_G]
            if HEADS_LAST:
                score *= LOG2E
                m_new = tl.maximum(m_i, score)
                p = tl.math.exp2(score - m_new)
                alpha = tl.math.exp2(m_i - m_new)
                acc = acc * alpha[None, :] + tl.trans(v_new) * p[None, :]
            else:
                m_new = tl.maximum(m_i, score)
                p = tl.exp(score - m_new)
                alpha = tl.exp(m_i - m_new)
                acc = acc * alpha[:, None] + p[:, None] * v_new
            l_i = l_i * alpha + p
            m_i = m_new
    empty = l_i == 0.0
    safe_l = tl.where(empty, 1.0, l_i)
    # an empty split (past the sequence: most of them at short contexts) leaves its o unwritten;
    # the combine does not read it
    if HEADS_LAST:
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(safe_l)) * LN2)
        tl.store(o_ptr + (split * H + heads)[None, :] * HD + d[:, None], acc / safe_l[None, :],
                 mask=(g_ok & ~empty)[None, :])
    else:
        lse = tl.where(empty, float("-inf"), m_i + tl.log(safe_l))
        tl.store(o_ptr + (split * H + heads)[:, None] * HD + d[None, :], acc / safe_l[:, None],
                 mask=(g_ok & ~empty)[:, None])
    tl.store(lse_ptr + split * H + heads, lse, mask=g_ok)


@triton.jit
def merge_splits(o_ptr, lse_ptr, o_offs, lse_offs, ok, o_split_stride, lse_split_stride,
                 NUM_SPLITS: tl.constexpr, CHUNK: tl.constexpr):
    """The splits' partial outputs merged by their log-sum-exps, for NH pieces of W dims, each piece
    inside one head: o_offs [NH, W] and lse_offs [NH] index split 0 (split s adds s times the
    strides), ok [NH] masks pieces; returns fp32 [NH, W]. Empty splits (lse -inf) weigh 0 and their
    o is not read. Used by the combine kernel and by the decode step's o_proj GEMV, which merges
    the splits of its own K slice (kernels.gemv_packed).

    The non-empty splits are a prefix (a split is empty when its chunk starts past the sequence),
    and o is read only over that prefix, CHUNK splits at a time: at a few hundred positions one
    chunk holds them all, while the split count stays what long contexts want (a [NUM_SPLITS, NH, W]
    block would also spill in one warp)."""
    sp = tl.arange(0, NUM_SPLITS)[:, None]
    lse = tl.load(lse_ptr + sp * lse_split_stride + lse_offs[None, :], mask=ok[None, :], other=0.0)  # [S, NH]
    top = tl.max(lse, axis=0)[None, :]
    total = tl.sum(tl.exp(lse - top), axis=0)[None, :]
    used = tl.max(tl.sum(((lse > float("-inf")) & ok[None, :]).to(tl.int32), axis=0), axis=0)
    merged = tl.zeros(o_offs.shape, dtype=tl.float32)
    for c in tl.range(0, used, CHUNK, num_stages=1):
        spc = c + tl.arange(0, CHUNK)[:, None]
        lse_c = tl.load(lse_ptr + spc * lse_split_stride + lse_offs[None, :], mask=ok[None, :], other=0.0)  # [C, NH]
        w = tl.exp(lse_c - top) / total
        o = tl.load(o_ptr + spc[:, :, None] * o_split_stride + o_offs[None, :, :],
                    mask=((lse_c > float("-inf")) & ok[None, :])[:, :, None], other=0.0)             # [C, NH, W]
        merged += tl.sum(o * w[:, :, None], axis=0)
    return merged


@triton.jit
def _combine_kernel(o_ptr, lse_ptr, out_ptr, clear_ptr, CLEAR_N, H: tl.constexpr, HD: tl.constexpr,
                    PIECE: tl.constexpr, NUM_SPLITS: tl.constexpr, CLEAR_CHUNK: tl.constexpr, PDL: tl.constexpr,
                    OUT_HD: tl.constexpr):
    """Grid (H, HD / PIECE): a program merges PIECE dims of one head over every split. Pieces, not
    whole heads, so that the splits' o (a 32k-position cache's 128 splits: 64 KB a head) is read
    from L2 by 4x more programs at once."""
    release_dependents(PDL)
    wait_for_producer(PDL)
    h = tl.program_id(0)
    piece = tl.program_id(1)
    if CLEAR_CHUNK > 0:  # each program zeroes its chunk of `clear` (accumulators read by the step so far)
        offs = (h * (HD // PIECE) + piece) * CLEAR_CHUNK + tl.arange(0, CLEAR_CHUNK)
        tl.store(clear_ptr + offs, tl.zeros([CLEAR_CHUNK], dtype=clear_ptr.dtype.element_ty), mask=offs < CLEAR_N)
    d = piece * PIECE + tl.arange(0, PIECE)
    one = tl.arange(0, 1)
    # all splits in one chunk: [NUM_SPLITS, PIECE] fits a program's registers without spilling, and
    # at long contexts (every split used) chunks would be dependent rounds of loads
    out = merge_splits(o_ptr, lse_ptr, (h + one[:, None]) * HD + d[None, :], h + one, one == 0, H * HD, H,
                       NUM_SPLITS, NUM_SPLITS)
    if OUT_HD == HD:
        tl.store(out_ptr + h * HD + d[None, :], out.to(out_ptr.dtype.element_ty))
    else:  # heads padded to HD dims (kernels.rope.padded_head_slots): the real OUT_HD dims, packed
        real, is_real = head_dims_of_slots(d, HD, OUT_HD)
        tl.store(out_ptr + h * OUT_HD + real[None, :], out.to(out_ptr.dtype.element_ty), mask=is_real[None, :])


def flash_decode_splits(q: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_len: torch.Tensor,
                        num_splits: int = 32, block_s: int = 128,
                        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                        workspace: tuple[torch.Tensor, torch.Tensor] | None = None, num_warps: int = 4,
                        rope: RopeInput | None = None, num_stages: int | None = None,
                        heads_last: bool | None = None, head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first launch of flash_decode alone: each split's unnormalised output and log-sum-exp,
    returned as (o [splits, H, hd] fp32, lse [splits, H] fp32) (the workspace); an empty split's o
    is left unwritten and its lse is -inf. For a consumer that merges the splits itself
    (merge_splits: the decode step's o_proj GEMV). Arguments as flash_decode's."""
    kv, hd = k_cache.shape[0], k_cache.shape[-1]
    if rope is not None:
        if q is not None:
            raise ValueError("flash_decode: with rope, q comes from rope.qkv; pass q=None")
        width = rope.qkv.shape[-1]
        h = width // hd - 2 * kv
        if rope.qkv.dtype != torch.float32 or rope.qkv.numel() != width or width != (h + 2 * kv) * hd \
                or not rope.qkv.is_contiguous():
            raise ValueError(f"flash_decode: rope.qkv must be contiguous fp32 [1, (H + 2 * {kv}) * {hd}], got "
                             f"{rope.qkv.dtype} {tuple(rope.qkv.shape)}")
        if rope.qkv_bias is not None and (rope.qkv_bias.numel() != width or not rope.qkv_bias.is_contiguous()):
            raise ValueError(f"flash_decode: rope.qkv_bias must be contiguous with {width} elements, got "
                             f"{tuple(rope.qkv_bias.shape)}")
        ref = rope.qkv
    else:
        h, hd = q.shape
        ref = q
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
        workspace = (torch.empty((num_splits, h, hd), device=ref.device, dtype=torch.float32),
                     torch.empty((num_splits, h), device=ref.device, dtype=torch.float32))
    o, lse = workspace
    g = h // kv
    if heads_last is None:
        heads_last = int8 or rope is not None
    norm = rope.input_norm if rope else None
    _flash_decode_kernel[(kv, num_splits)](
        q, k_cache, v_cache, k_scale, v_scale, seq_len, o, lse,
        *((rope.qkv, rope.cos, rope.sin, rope.q_norm, rope.k_norm, rope.eps) if rope else (None,) * 5 + (0.0,)),
        *((norm.sum_squares, norm.dim, norm.eps) if norm else (None, 1, 0.0)), rope.qkv_bias if rope else None,
        0 if q is None else q.stride(0), k_cache.stride(0), k_cache.stride(1),
        0 if k_scale is None else k_scale.stride(0), (head_dim or hd) ** -0.5,
        H=h, KV=kv, G=g, HD=hd, BLOCK_G=max(8 if heads_last else 16, triton.next_power_of_2(g)), BLOCK_S=block_s,
        NUM_SPLITS=num_splits, INT8=int8,
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",  # fp32 caches: exact dots
        ROPE=rope is not None, QK_NORM=rope is not None and rope.q_norm is not None, DEFERRED_NORM=norm is not None,
        QKV_BIAS=rope is not None and rope.qkv_bias is not None, HEADS_LAST=heads_last,
        num_warps=num_warps, **({} if num_stages is None else dict(num_stages=num_stages)), **pdl_launch(ref),
    )
    return o, lse


def flash_decode(q: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_len: torch.Tensor,
                 out: torch.Tensor, num_splits: int = 32, block_s: int = 128,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                 workspace: tuple[torch.Tensor, torch.Tensor] | None = None, num_warps: int = 4,
                 rope: RopeInput | None = None, clear: torch.Tensor | None = None,
                 num_stages: int | None = None, heads_last: bool | None = None,
                 head_dim: int | None = None) -> torch.Tensor:
    """q [H, hd] over one layer's cache [KV, S, hd] for the first seq_len (int32 [1], device) positions.

    out [H * hd]; with head_dim (the model's head size, which hd pads: kernels.rope.padded_head_slots)
    out [H * head_dim], the real dims only, and the scores scaled by head_dim ** -0.5. `workspace`
    (o [splits, H, hd] fp32, lse [splits, H] fp32) can be passed to avoid allocations (required
    under CUDA graph capture). With `rope` (the decode step), q is None: q and
    the new token's k and v come from rope.qkv at position seq_len - 1; the new k/v are written into
    the cache and attended to in the same launch. `clear`, a contiguous buffer, is zeroed by the
    second launch (after every read of the first): the decode step's split-K accumulators.
    num_stages: K/V blocks Triton's pipeline keeps in flight plus one (its default when None); long
    contexts want more bytes in flight per program than the default's one block.
    heads_last: the query heads as the tensor cores' N dimension (attend_loaded_heads_last). The
    default (None) takes it for int8 caches (32k context on an H200: 28.2 -> 24.7 us) and in the
    decode step (rope; 1B w4 -4%, 8B w4 at 8k positions -1.4%, 8B at a few hundred equal); an fp16
    cache alone keeps the heads as M (attend_loaded), 3-5% faster at 32k."""
    if clear is not None and not clear.is_contiguous():
        raise ValueError("flash_decode: the buffer to clear must be contiguous")
    o, lse = flash_decode_splits(q, k_cache, v_cache, seq_len, num_splits, block_s, k_scale, v_scale, workspace,
                                 num_warps, rope, num_stages, heads_last, head_dim)
    h, hd = lse.shape[1], o.shape[2]
    clear_n = 0 if clear is None else clear.numel()
    piece = min(hd, COMBINE_PIECE)
    pieces = hd // piece
    _combine_kernel[(h, pieces)](o, lse, out, clear, clear_n, H=h, HD=hd, PIECE=piece, NUM_SPLITS=num_splits,
                                 CLEAR_CHUNK=triton.next_power_of_2(triton.cdiv(clear_n, h * pieces)) if clear_n else 0,
                                 OUT_HD=head_dim or hd, **pdl_launch(lse))
    return out
