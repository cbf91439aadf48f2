"""Compute backends. One is chosen at load time and every QuantLinear dispatches to it.

`torch` is the reference (CPU and GPU): it dequantizes with `kernels.reference` on every call.
The Triton backend registers here when it lands; a miss names the ones available.
"""

from __future__ import annotations

from typing import Protocol

import torch

from qruntime.checkpoint import PackedLinear
from qruntime.errors import InvalidOptionError
from qruntime.kernels import reference


class Backend(Protocol):
    name: str

    def prepare_linear(self, lin: PackedLinear, device: torch.device, dtype: torch.dtype) -> PackedLinear:
        """Moves/re-lays a linear's tensors once at load, in the form `linear` wants."""

    def linear(self, x: torch.Tensor, lin: PackedLinear) -> torch.Tensor:
        """y = x @ W.T + bias for x [..., K]."""


class TorchBackend:
    name = "torch"

    def prepare_linear(self, lin: PackedLinear, device: torch.device, dtype: torch.dtype) -> PackedLinear:
        def move(t: torch.Tensor | None, cast: bool) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if cast else t.dtype)

        return PackedLinear(
            lin.in_features, lin.out_features, lin.bits, lin.group_size,
            qweight=move(lin.qweight, cast=lin.bits == 16),
            scales=move(lin.scales, False), zeros=move(lin.zeros, False), offsets=move(lin.offsets, False),
            perm=move(lin.perm, False), bias=move(lin.bias, True),
        )

    def linear(self, x: torch.Tensor, lin: PackedLinear) -> torch.Tensor:
        if lin.bits == 16:
            return torch.nn.functional.linear(x, lin.qweight, lin.bias)
        return reference.linear(x, lin)


BACKENDS: dict[str, type] = {"torch": TorchBackend}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise InvalidOptionError(f"backend {name!r} is not available; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]()
