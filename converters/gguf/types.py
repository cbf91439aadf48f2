"""GGUF tensor types -> the packed format: one decoder per block layout, one table of mappings.

Every quantized type dequantizes as `w = scale * q + offset` per group of its elements, with an
integer `q`. A decoder reads the raw blocks and returns exactly that triple (scale and offset in
float32, where the products of llama.cpp's two-level scales `d * sc` are exact); the table says how
the triple lands in the packed format:

    type   block/bytes  packed  group  zero mode   q range   packed code     scale        offset
    Q4_0   32/18        int4    32     symmetric   -8..7     q + 8           d            -
    Q4_1   32/20        int4    32     float       0..15     q               d            m
    Q5_0   32/22        int8    32     symmetric   -16..15   q + 128         d            -
    Q5_1   32/24        int8    32     float       0..31     q               d            m
    Q8_0   32/34        int8    32     symmetric   -128..127 q + 128         d            -
    Q2_K   256/84       int4    16     float       0..3      q               d*sc         -dmin*m
    Q3_K   256/110      int4    16     symmetric   -4..3     q + 8           d*(sc-32)    -
    Q4_K   256/144      int4    32     float       0..15     q               d*sc         -dmin*m
    Q5_K   256/176      int8    32     float       0..31     q               d*sc         -dmin*m
    Q6_K   256/210      int8    16     symmetric   -32..31   q + 128         d*sc         -

Block layouts are llama.cpp's (`ggml/src/ggml-common.h`, `dequantize_row_*` in
`ggml/src/ggml-quants.c`); each decoder's comment gives its layout. Scales are stored in fp16:
exact for the one-level types (d and m are fp16 in the file); for the K types `d*sc` and
`dmin*m` are rounded to fp16 (docs/FORMAT.md, "GGUF", states and tests the bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T


class Decoded(NamedTuple):
    """w[b, e] = scale[b, e // group] * q[b, e] + (offset[b, e // group] or 0)."""

    q: np.ndarray               # int16 [n_blocks, block]
    scale: np.ndarray           # float32 [n_blocks, block // group]
    offset: np.ndarray | None   # float32 [n_blocks, block // group]


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """float32 [n_blocks, 1] from the fp16 at byte `at` of each block."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [..., n] -> [..., 2, n]: all low nibbles, then all high nibbles."""
    return np.stack([qs & 0x0F, qs >> 4], axis=-2)


def _bit_planes(b: np.ndarray) -> np.ndarray:
    """uint8 [n_blocks, n] -> [n_blocks, 8, n]: plane i holds bit i of every byte."""
    return np.unpackbits(b[:, :, None], axis=2, bitorder="little").transpose(0, 2, 1)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """uint8 [n_blocks, h, 32] -> [n_blocks, h, 4, 32]: 2-bit fields at shifts 0, 2, 4, 6."""
    return (qs[:, :, None, :] >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3


def _one_level(blocks: np.ndarray, qs_at: int, with_min: bool, qh_at: int | None, center: int) -> Decoded:
    """Q4_0, Q4_1, Q5_0, Q5_1: d f16 @0 [, m f16 @2] [, qh u32 @qh_at], qs[16] @qs_at.
    qs byte j holds element j (low nibble) and element j+16 (high nibble); bit j of qh is
    element j's fifth bit."""
    nb = len(blocks)
    q = _nibbles(blocks[:, qs_at:qs_at + 16]).reshape(nb, 32)
    if qh_at is not None:
        q = q | (np.unpackbits(blocks[:, qh_at:qh_at + 4], axis=1, bitorder="little") << 4)
    offset = _f16(blocks, 2) if with_min else None
    return Decoded(q.astype(np.int16) - center, _f16(blocks, 0), offset)


def _q8_0(blocks: np.ndarray) -> Decoded:
    """Q8_0: d f16 @0, int8 qs[32] @2."""
    return Decoded(blocks[:, 2:34].view(np.int8).astype(np.int16), _f16(blocks, 0), None)


def _q2_k(blocks: np.ndarray) -> Decoded:
    """Q2_K: scales[16] @0 (low nibble sc, high nibble m, one per 16 elements), qs[64] @16,
    d f16 @80, dmin f16 @82. Element 128h + 32j + l is bits 2j..2j+1 of qs[32h + l]."""
    nb = len(blocks)
    sc = blocks[:, 0:16]
    q = _crumbs(blocks[:, 16:80].reshape(nb, 2, 32)).reshape(nb, 256)
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    return Decoded(q.astype(np.int16), d * (sc & 0x0F), -(dmin * (sc >> 4)))


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """12 bytes -> 16 six-bit scales: low 4 bits of scale i are nibble i//8 of byte i%8, the high
    2 bits are bits 2*(i//4).. of byte 8 + i%4."""
    nb = len(s)
    low = _nibbles(s[:, 0:8]).reshape(nb, 16)
    high = (s[:, None, 8:12] >> np.array([0, 2, 4, 6], np.uint8)[None, :, None]) & 3
    return (low | (high.reshape(nb, 16) << 4)).astype(np.int16) - 32


def _q3_k(blocks: np.ndarray) -> Decoded:
    """Q3_K: hmask[32] @0, qs[64] @32, scales[12] @96 (6-bit, minus 32), d f16 @108.
    Element 128h + 32j + l: low 2 bits at shift 2j of qs[32h + l]; minus 4 unless bit 4h + j of
    hmask[l] is set."""
    nb = len(blocks)
    low = _crumbs(blocks[:, 32:96].reshape(nb, 2, 32)).reshape(nb, 256)
    high = _bit_planes(blocks[:, 0:32]).reshape(nb, 256)  # plane 4h + j, position l
    q = low.astype(np.int16) - 4 * (1 - high.astype(np.int16))
    return Decoded(q, _f16(blocks, 108) * _q3_k_scales(blocks[:, 96:108]), None)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12 bytes -> 8 six-bit (sc, m): j < 4: sc = s[j] & 63, m = s[j+4] & 63;
    j >= 4: sc = s[j+4] & 15 | (s[j-4] >> 6) << 4, m = s[j+4] >> 4 | (s[j] >> 6) << 4."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _qk_mins(blocks: np.ndarray, qs_at: int, qh_at: int | None) -> Decoded:
    """Q4_K (qs[128] @16) and Q5_K (qh[32] @16, qs[128] @48): d f16 @0, dmin f16 @2, scales[12]
    @4. Element 64c + 32h + l is nibble h of qs[32c + l]; Q5_K's fifth bit is bit 2c + h of qh[l]."""
    nb = len(blocks)
    q = _nibbles(blocks[:, qs_at:qs_at + 128].reshape(nb, 4, 32)).reshape(nb, 256)
    if qh_at is not None:
        q = q | (_bit_planes(blocks[:, qh_at:qh_at + 32]).reshape(nb, 256) << 4)
    sc, m = _k4_scales(blocks[:, 4:16])
    return Decoded(q.astype(np.int16), _f16(blocks, 0) * sc, -(_f16(blocks, 2) * m))


def _q6_k(blocks: np.ndarray) -> Decoded:
    """Q6_K: ql[128] @0, qh[64] @128, int8 scales[16] @192, d f16 @208. Element 128h + 32k + l:
    low 4 bits are nibble k//2 of ql[64h + 32(k%2) + l], high 2 bits at shift 2k of qh[32h + l]."""
    nb = len(blocks)
    # [n, h, k%2, nibble, l] -> [n, h, nibble, k%2, l] so that k = 2 * nibble + k%2
    low = _nibbles(blocks[:, 0:128].reshape(nb, 2, 2, 32)).transpose(0, 1, 3, 2, 4).reshape(nb, 2, 4, 32)
    high = _crumbs(blocks[:, 128:192].reshape(nb, 2, 32))
    q = (low | (high << 4)).reshape(nb, 256).astype(np.int16) - 32
    return Decoded(q, _f16(blocks, 208) * blocks[:, 192:208].view(np.int8), None)


@dataclass(frozen=True)
class QuantMapping:
    """How one GGUF quantized type lands in the packed format (see the module table)."""

    ggml_type: T
    bits: int               # packed code width: 4 or 8
    group_size: int         # elements per scale
    zero_mode: str          # "symmetric" (code = q + 2^(bits-1)) or "float" (code = q, + offset)
    exact_fp16: bool        # scale/offset are the file's own fp16 values: fp16 storage is lossless
    decode: Callable[[np.ndarray], Decoded]

    @property
    def name(self) -> str:
        return self.ggml_type.name

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][1]

    @property
    def center(self) -> int:
        """Added to q to make the unsigned packed code."""
        return 2 ** (self.bits - 1) if self.zero_mode == "symmetric" else 0


def _m(t: T, bits: int, group: int, zero_mode: str, exact: bool, decode) -> tuple[T, QuantMapping]:
    return t, QuantMapping(t, bits, group, zero_mode, exact, decode)


QUANT_TYPES: dict[T, QuantMapping] = dict([
    _m(T.Q4_0, 4, 32, "symmetric", True, lambda b: _one_level(b, 2, False, None, 8)),
    _m(T.Q4_1, 4, 32, "float", True, lambda b: _one_level(b, 4, True, None, 0)),
    _m(T.Q5_0, 8, 32, "symmetric", True, lambda b: _one_level(b, 6, False, 2, 16)),
    _m(T.Q5_1, 8, 32, "float", True, lambda b: _one_level(b, 8, True, 4, 0)),
    _m(T.Q8_0, 8, 32, "symmetric", True, _q8_0),
    _m(T.Q2_K, 4, 16, "float", False, _q2_k),
    _m(T.Q3_K, 4, 16, "symmetric", False, _q3_k),
    _m(T.Q4_K, 4, 32, "float", False, lambda b: _qk_mins(b, 16, None)),
    _m(T.Q5_K, 8, 32, "float", False, lambda b: _qk_mins(b, 48, 16)),
    _m(T.Q6_K, 8, 16, "symmetric", False, _q6_k),
])

# float types: numpy dtype of the stored values (BF16 is read as raw 16-bit words, see tensors.py)
FLOAT_TYPES: dict[T, str] = {T.F32: "<f4", T.F16: "<f2", T.BF16: "<u2"}

SUPPORTED = tuple(t.name for t in (*FLOAT_TYPES, *QUANT_TYPES))
