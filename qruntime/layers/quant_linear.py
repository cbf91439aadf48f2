"""QuantLinear: one linear layer over packed weights, computed by the backend chosen at load."""

from __future__ import annotations

import torch
from torch import nn

from qruntime.backends import Backend
from qruntime.checkpoint import PackedLinear


class QuantLinear(nn.Module):
    def __init__(self, packed: PackedLinear, backend: Backend, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.bits = packed.bits
        self.backend = backend
        self.packed = backend.prepare_linear(packed, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features]
        return self.backend.linear(x, self.packed)

    def nbytes(self) -> int:
        return self.packed.nbytes()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, backend={self.backend.name}"
