"""Shared @triton.jit helpers: code unpacking and the exact int -> float trick."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's CPU interpreter (tests) cannot run inline PTX: kernels then take their EMULATE branch.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRETED = tl.constexpr(INTERPRET)  # the same, readable inside @triton.jit code


@triton.jit
def int_to_float_exact(q):
    """int32 q in [0, 2^23) -> float32 q without an I2F conversion.

    Or-ing q into the mantissa of 2^23 (0x4B000000) gives the float 2^23 + q exactly; one FADD
    removes the 2^23. I2F runs at a quarter of the FP32 rate on Hopper and would cap an int4
    GEMV below its bandwidth; LOP3 + FADD do not.
    """
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def nibble_slot(k, BITS: tl.constexpr):
    """Where column k sits in its word. int8: byte k % 4. int4 (pair-interleaved layout, see
    kernels.layout): columns 2i and 2i+1 of each block of 8 sit in nibbles i and i + 4."""
    if BITS == 4:
        c = k % 8
        return c // 2 + 4 * (c % 2)
    else:
        return k % 4


@triton.jit
def load_2d(ptr, r, r_ok, n, n_ok, stride, EVEN: tl.constexpr, STREAM: tl.constexpr = False):
    """ptr[r, n] (row stride `stride`), 0 outside the matrix unless the tile is whole (EVEN).

    STREAM: data read once per decode step (the packed GEMV's words, the dense GEMV's weights): L2
    is told to evict it first, so the weights streaming through do not push out what the next
    kernels read again (the step's accumulators, the KV cache). On an H200, 1B w4 -0.6% at 128 positions and -1.0% at 8192, 8B
    equal (benchmarks/results/h200/ab_evict_first.log); the M = 1 GEMVs alone, over rotating
    buffers, 2-7% faster (results/h200/decode.md against the tenth session's run). The dense GEMV's
    weights: 8B w16 -0.5%, 1B w16 -0.3% (same log)."""
    ptrs = ptr + r[:, None] * stride + n[None, :]
    policy: tl.constexpr = "evict_first" if STREAM else ""
    if EVEN:
        return tl.load(ptrs, eviction_policy=policy)
    else:
        return tl.load(ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0, eviction_policy=policy)


@triton.jit
def unpack_words(words, BITS: tl.constexpr):
    """int32 words [..., W] -> codes [..., W, 32 // BITS] as exact float32.

    Element i of a word sits in bits BITS*i .. BITS*i + BITS-1 (low bits first), matching
    docs/FORMAT.md 4.2 for int4 and little-endian byte order for int8 viewed as int32.
    """
    EPW: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, EPW) * BITS
    q = (tl.expand_dims(words, len(words.shape)) >> shifts) & ((1 << BITS) - 1)
    return int_to_float_exact(q)


# four int8 codes (one register) -> two fp16x2: xor 0x80 makes each byte code + 128, PRMT sets it
# under the 0x64 high byte of 1024.0 (the fp16 1152 + code, exactly), one HSUB2 per pair leaves the code
_INT8X4_TO_FP16 = tl.constexpr("""{
.reg .b32 b, m, c;
mov.b32 m, 0x64646464;
mov.b32 c, 0x64806480;
xor.b32 b, $2, 0x80808080;
prmt.b32 $0, b, m, 0x5140;
prmt.b32 $1, b, m, 0x7362;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
}""")


@triton.jit
def int8_to_fp16_exact(codes, IN_PLACE: tl.constexpr = False):
    """int8 codes -> fp16 without an I2F conversion: (code + 128) or-ed into the mantissa of 1024.0
    is the fp16 1152 + code exactly; one subtraction leaves the code. On the GPU four codes at a
    time in packed registers (5 instructions per 4 codes; the plain form costs about 4 per code).

    IN_PLACE: convert in the layout the codes were loaded in. Triton otherwise moves a dot
    operand's layout change above the conversion, to the narrower codes; for V (the B operand of
    p @ v, whose K is the cache position) that means reading the codes from shared memory one
    byte at a time (4 positions per register), where converting rows of 4 consecutive bytes and
    moving the fp16 tile costs a third of the instructions (flash-decoding's loop 1650 -> 1000
    instructions on sm_90). Marking the asm impure is what keeps Triton from moving it."""
    if _INTERPRETED:
        biased = (codes.to(tl.int16) + 128) | 0x6400
        return biased.to(tl.float16, bitcast=True) - 1152.0
    else:
        return tl.inline_asm_elementwise(_INT8X4_TO_FP16, "=r,=r,r", [codes], dtype=tl.float16, is_pure=not IN_PLACE, pack=4)


@triton.jit
def load_block(k_ptr, v_ptr, kv_base, j, j_ok, d, stride_cs):
    """K and V of cache positions j. V is requested with K, so the two cache reads overlap instead
    of V waiting for the scores."""
    k = tl.load(k_ptr + kv_base + j[:, None] * stride_cs + d[None, :], mask=j_ok[:, None], other=0)
    v = tl.load(v_ptr + kv_base + j[:, None] * stride_cs + d[None, :], mask=j_ok[:, None], other=0)
    return k, v


@triton.jit
def attend_loaded(q, m_i, l_i, acc, k, v, ks_ptr, vs_ptr, scale_base, j, j_ok, visible, sm_scale,
                  INT8: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step of flash attention over the K, V of positions j (from load_block):
    scores of q against k, running max m_i, running sum l_i, output acc.

    int8 caches: K and V become fp16 exactly (int8_to_fp16_exact); their per-position scales are
    applied to the scores and to the probabilities, not to every element."""
    if INT8:
        k = int8_to_fp16_exact(k)
    scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)
    if INT8:
        scores *= tl.load(ks_ptr + scale_base + j, mask=j_ok, other=0.0)[None, :]
    scores = tl.where(visible, scores * sm_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    p = tl.exp(scores - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if INT8:
        v = int8_to_fp16_exact(v, IN_PLACE=True)
        p = p * tl.load(vs_ptr + scale_base + j, mask=j_ok, other=0.0)[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def attend_loaded_heads_last(qt, m_i, l_i, acc, k, v, ks_ptr, vs_ptr, scale_base, j, j_ok, INT8: tl.constexpr,
                             PRECISION: tl.constexpr):
    """attend_loaded for one query token's G heads (flash-decoding), with the heads as the tensor
    cores' N dimension: scores^T = k qt^T is [positions, G] and acc^T = v^T p^T is [hd, G].

    An MMA tile has 16 rows but only 8 columns, so with G = 4 heads as rows (attend_loaded) three
    quarters of every score, probability and accumulator element are padding that each lane
    computes anyway; as columns, half. In sm_90 code the int8 loop over 32 positions takes 755
    instructions instead of 1037 (FMULs 166 -> 48, half the HMMAs); a 32k-position int8 cache on an
    H200 28.2 -> 24.7 us. flash_decode takes it for int8 caches and in the decode step; an fp16
    cache alone at 32k was 3-5% slower this way.

    qt [hd, G] is q^T already scaled by sm_scale * log2(e): the scores are in log2 units (exp2,
    no multiply per score), and so are m_i and the log-sum-exp built from it. acc [hd, G].
    The padded heads' columns (q = 0) get finite scores and are never stored."""
    if INT8:
        k = int8_to_fp16_exact(k)
    scores = tl.dot(k.to(qt.dtype), qt, input_precision=PRECISION)                    # [S, G]
    if INT8:
        scores *= tl.load(ks_ptr + scale_base + j, mask=j_ok, other=0.0)[:, None]
    scores = tl.where(j_ok[:, None], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=0))
    p = tl.math.exp2(scores - m_new[None, :])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    if INT8:
        v = int8_to_fp16_exact(v, IN_PLACE=True)
        p = p * tl.load(vs_ptr + scale_base + j, mask=j_ok, other=0.0)[:, None]
    acc = acc * alpha[None, :] + tl.dot(tl.trans(v.to(qt.dtype)), p.to(qt.dtype), input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, ks_ptr, vs_ptr, kv_base, scale_base, j, j_ok, visible, d,
                 stride_cs, sm_scale, INT8: tl.constexpr, PRECISION: tl.constexpr):
    """load_block then attend_loaded (shared by decode and prefill)."""
    k, v = load_block(k_ptr, v_ptr, kv_base, j, j_ok, d, stride_cs)
    return attend_loaded(q, m_i, l_i, acc, k, v, ks_ptr, vs_ptr, scale_base, j, j_ok, visible, sm_scale, INT8, PRECISION)


@triton.jit
def group_contribution(d, xs, s, z, BITS: tl.constexpr, ZERO_MODE: tl.constexpr, offset: tl.constexpr):
    """s (D - (offset + zero) X) for the zero modes (float mode: z is the offset m, s (D - offset X) + m X)."""
    if ZERO_MODE == 0:
        return s * (d - (offset + (1 << (BITS - 1))) * xs)
    elif ZERO_MODE == 1:
        return s * (d - (offset + z) * xs)
    else:
        return s * (d - offset * xs) + z * xs
