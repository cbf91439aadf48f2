"""The one place codes are packed into and unpacked from the packed format's integer layout.

int4: codes [N, K] uint8 in [0, 16) -> int32 [N, ceil(K/8)], packed along K, low nibble first:
      word[n, j] = sum_i code[n, 8j + i] << (4 i), i = 0..7 (padding codes are 0).
int8: codes stored as they are, uint8 [N, K].
"""

from __future__ import annotations

import sys

import torch

_SHIFTS4 = torch.arange(0, 32, 4, dtype=torch.int64)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes: uint8 [N, K] with values < 16 -> int32 [N, ceil(K / 8)]."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"pack_int4 expects 2-D uint8 codes, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_int4: a code is >= 16")
    n, k = codes.shape
    pad = (-k) % 8
    if codes.numel() == 0:  # no rows or no columns: nothing to pack (views below cannot infer a size)
        return torch.zeros(n, (k + pad) // 8, dtype=torch.int32, device=codes.device)
    if sys.byteorder == "little":
        # code pairs (2b, 2b + 1) -> byte b, low nibble first: a word's bytes in memory order
        pairs = torch.nn.functional.pad(codes, (0, pad)).view(n, -1, 2)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous().view(torch.int32)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).view(n, -1, 8)
    words = (c << _SHIFTS4.to(c.device)).sum(dim=-1)  # < 2^32, fits int64
    # reinterpret the unsigned 32-bit value as int32 (two's complement wrap)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int4(words: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [N, ceil(K/8)] -> uint8 codes [N, K]."""
    n = words.shape[0]
    if words.numel() == 0:
        return torch.zeros(n, k, dtype=torch.uint8, device=words.device)
    if sys.byteorder != "little":
        w = words.to(torch.int64) & 0xFFFFFFFF
        return ((w.unsqueeze(-1) >> _SHIFTS4.to(w.device)) & 0xF).reshape(n, -1)[:, :k].to(torch.uint8)
    # A little-endian word's byte b holds codes 2b (low nibble) and 2b + 1 (high nibble). Widened to
    # 16 bits, a byte hl becomes 0h0l (b | b << 4, masked), whose two bytes in memory are l, h: the
    # codes in order, from a few whole-tensor operations and no 64-bit temporaries.
    b = words.contiguous().view(torch.uint8).to(torch.int16)
    codes = (b | (b << 4)).bitwise_and_(0x0F0F).view(torch.uint8)
    return codes.view(n, -1)[:, :k].contiguous()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 4:
        return pack_int4(codes)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    raise ValueError(f"pack: bits={bits}; supported: 4, 8")


def unpack(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    if bits == 4:
        return unpack_int4(qweight, k)
    if bits == 8:
        return qweight
    raise ValueError(f"unpack: bits={bits}; supported: 4, 8")
