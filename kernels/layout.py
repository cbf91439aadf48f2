"""The form in which the Triton kernels read a linear, prepared once at load from a PackedLinear.

The packed format stores int4 as int32 words [N, ceil(K/8)] (docs/FORMAT.md 4.2) and int8 as uint8
[N, K]. The kernels read them transposed, N contiguous, int4 nibbles pair-interleaved (below): int8 is padded to a multiple of 4 columns
and viewed as int32 words (little-endian, so byte i of word j is column 4j + i: the same "low bits
first" order as int4), then both become words [K / EPW, N]; scales and zeros/offsets become
[G, N]. One kernel then serves both bit widths with BITS as a constexpr. The repacking costs a
transpose at load time and nothing per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qruntime.checkpoint import PackedLinear, effective_group_size
from qruntime.quantizers.packing import pack_int4, unpack_int4

from .tuning import gemm_config, splitk_config

ZERO_SYMMETRIC, ZERO_INT, ZERO_FLOAT = 0, 1, 2
_ZERO_MODE_IDS = {"symmetric": ZERO_SYMMETRIC, "int": ZERO_INT, "float": ZERO_FLOAT}
_ZERO_MODE_NAMES = {i: name for name, i in _ZERO_MODE_IDS.items()}


@dataclass
class TritonLinear:
    in_features: int
    out_features: int
    bits: int
    group_size_eff: int
    zero_mode_id: int
    words: torch.Tensor                    # int32 [K / EPW, N]
    scales: torch.Tensor                   # [G, N]
    zeros_or_offsets: torch.Tensor | None  # [G, N] uint8 zeros or float offsets
    perm: torch.Tensor | None              # int32 [K]
    bias: torch.Tensor | None              # [N]
    in_decode_step: bool = False           # a linear of the engine's decode step: its tiles come from the step's entries
    # TMA descriptors of the words (kernels.tma_frag_gemm), made on first use
    tma_descriptors: dict = field(default_factory=dict, repr=False, compare=False)

    def splitk_config(self, m: int = 1) -> tuple[int, int, int, int, bool]:
        return splitk_config(self.bits, self.out_features, self.in_features, m, self.words.device, self.in_decode_step,
                             self.group_size_eff, _ZERO_MODE_NAMES[self.zero_mode_id])

    def gemm_config(self, m: int) -> tuple[int, int, int, int, int]:
        return gemm_config(self.bits, self.out_features, self.in_features, m, self.words.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.scales, self.zeros_or_offsets, self.perm, self.bias)
                   if t is not None)


# int4: within each block of 8 columns, columns 2i and 2i+1 go to nibbles i and i + 4, so that one
# "& 0x000F000F" yields the fp16x2 pair (q_2i, q_2i+1) matching two adjacent fp16 activations (the
# slot kernel's unpacking; the packed GEMV's dp2a pairs come from one PRMT and two ANDs).
_NIBBLE_SOURCE = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])


def _pair_interleave_int4(words: torch.Tensor, k: int) -> torch.Tensor:
    codes = unpack_int4(words, k)
    pad = (-k) % 8
    codes = torch.nn.functional.pad(codes, (0, pad)).view(codes.shape[0], -1, 8)
    codes = codes[:, :, _NIBBLE_SOURCE.to(codes.device)].reshape(codes.shape[0], -1)
    return pack_int4(codes)


def prepare(lin: PackedLinear, device: torch.device, dtype: torch.dtype) -> TritonLinear:
    """PackedLinear (bits 4 or 8) -> TritonLinear on `device`."""
    if lin.bits not in (4, 8):
        raise ValueError(f"prepare: bits={lin.bits}; 16-bit linears use the dense path")
    words = lin.qweight.to(device)
    if lin.bits == 4:
        words = _pair_interleave_int4(words, lin.in_features)
    if lin.bits == 8:
        pad = (-lin.in_features) % 4
        words = torch.nn.functional.pad(words, (0, pad)).contiguous().view(torch.int32)
    extra = lin.zeros if lin.zeros is not None else lin.offsets
    return TritonLinear(
        in_features=lin.in_features,
        out_features=lin.out_features,
        bits=lin.bits,
        group_size_eff=effective_group_size(lin.group_size, lin.in_features),
        zero_mode_id=_ZERO_MODE_IDS[lin.zero_mode],
        words=words.t().contiguous(),
        scales=lin.scales.to(device).t().contiguous(),
        zeros_or_offsets=None if extra is None else extra.to(device).t().contiguous(),
        perm=None if lin.perm is None else lin.perm.to(device=device, dtype=torch.int32),
        bias=None if lin.bias is None else lin.bias.to(device=device, dtype=torch.float32),
    )


def concat_out_features(lins: list[PackedLinear]) -> PackedLinear:
    """Stacks linears that read the same input (q/k/v, gate/up) into one, so one launch serves all.

    Possible when they share bits, group size, zero mode and act-order permutation; raises
    ValueError otherwise (the caller then keeps them separate)."""
    first = lins[0]
    for other in lins[1:]:
        if (other.bits, other.group_size, other.zero_mode, other.in_features) != (first.bits, first.group_size, first.zero_mode, first.in_features):
            raise ValueError("linears differ in bits/group/zero mode")
        if (other.perm is None) != (first.perm is None) or (first.perm is not None and not torch.equal(other.perm, first.perm)):
            raise ValueError("linears differ in act-order permutation")

    def cat(field: str):
        parts = [getattr(l, field) for l in lins]
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):  # e.g. only some have a bias: zero-fill the others
            parts = [p if p is not None else torch.zeros(l.out_features, dtype=next(q for q in parts if q is not None).dtype)
                     for p, l in zip(parts, lins)]
        return torch.cat(parts, dim=0)

    return PackedLinear(
        first.in_features, sum(l.out_features for l in lins), first.bits, first.group_size,
        qweight=cat("qweight"), scales=cat("scales"), zeros=cat("zeros"), offsets=cat("offsets"),
        perm=first.perm, bias=cat("bias"),
    )
