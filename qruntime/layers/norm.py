"""RMSNorm (Llama/Qwen): y = w * x / sqrt(mean(x^2) + eps), computed in fp32."""

from __future__ import annotations

import torch
from torch import nn

from qruntime.kernels.reference import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
