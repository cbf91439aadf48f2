"""The form in which the Triton kernels read a linear, prepared once at load from a PackedLinear.

int4 `qweight` is already int32 words [N, ceil(K/8)] (docs/FORMAT.md 4.2). int8 `qweight` uint8
[N, K] is padded to a multiple of 4 columns and viewed as int32 words [N, ceil(K/4)] (little-endian,
so byte i of a word is column 4j + i: the same "low bits first" order as int4). Both are then
read by one kernel with BITS as a constexpr.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qruntime.checkpoint import PackedLinear, effective_group_size

from .gemv import ZERO_FLOAT, ZERO_INT, ZERO_SYMMETRIC
from .tuning import gemm_config, gemv_config, splitk_config

_ZERO_MODE_IDS = {"symmetric": ZERO_SYMMETRIC, "int": ZERO_INT, "float": ZERO_FLOAT}


@dataclass
class TritonLinear:
    in_features: int
    out_features: int
    bits: int
    group_size_eff: int
    zero_mode_id: int
    words: torch.Tensor                    # int32 [N, KW]
    scales: torch.Tensor                   # [N, G]
    zeros_or_offsets: torch.Tensor | None  # [N, G] uint8 zeros or float offsets
    perm: torch.Tensor | None              # int32 [K]
    bias: torch.Tensor | None              # [N] compute dtype

    def gemv_config(self, m: int) -> tuple[int, int, int]:
        return gemv_config(self.bits, self.out_features, self.in_features, m)

    def gemm_config(self, m: int) -> tuple[int, int, int, int, int]:
        return gemm_config(self.bits, self.out_features, self.in_features, m)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.scales, self.zeros_or_offsets, self.perm, self.bias)
                   if t is not None)


@dataclass
class SplitKLinear:
    """Transposed layout for `kernels.gemv_splitk`: words [K/EPW, N], scales/zeros [G, N]."""

    in_features: int
    out_features: int
    bits: int
    group_size_eff: int
    zero_mode_id: int
    words: torch.Tensor
    scales: torch.Tensor
    zeros_or_offsets: torch.Tensor | None
    perm: torch.Tensor | None

    def splitk_config(self, m: int = 1) -> tuple[int, int, int, int, bool]:
        return splitk_config(self.bits, self.out_features, self.in_features, m)


def prepare_splitk(lin: PackedLinear, device: torch.device) -> SplitKLinear:
    t = prepare(lin, device, torch.float32)
    return SplitKLinear(
        t.in_features, t.out_features, t.bits, t.group_size_eff, t.zero_mode_id,
        words=t.words.t().contiguous(), scales=t.scales.t().contiguous(),
        zeros_or_offsets=None if t.zeros_or_offsets is None else t.zeros_or_offsets.t().contiguous(),
        perm=t.perm,
    )


def prepare(lin: PackedLinear, device: torch.device, dtype: torch.dtype) -> TritonLinear:
    """PackedLinear (bits 4 or 8) -> TritonLinear on `device`."""
    if lin.bits not in (4, 8):
        raise ValueError(f"prepare: bits={lin.bits}; 16-bit linears use the dense path")
    words = lin.qweight
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
        words=words.to(device).contiguous(),
        scales=lin.scales.to(device).contiguous(),
        zeros_or_offsets=None if extra is None else extra.to(device).contiguous(),
        perm=None if lin.perm is None else lin.perm.to(device=device, dtype=torch.int32),
        bias=None if lin.bias is None else lin.bias.to(device=device, dtype=dtype),
    )
