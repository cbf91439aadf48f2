"""Random packed linears in every zero mode, for the matmul kernels' tests."""

import torch

from qruntime.checkpoint import PackedLinear
from qruntime.quantizers.rtn import quantize_rtn


def make_linear(n, k, bits, group, zero_mode, act_order=False, bias=True, seed=0) -> PackedLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    lin = quantize_rtn(w, bits, group, symmetric=zero_mode == "symmetric",
                       bias=torch.randn(n, generator=g) if bias else None)
    if zero_mode == "float":  # GGUF-style: w = s q + m with m = -s z (any float offset works)
        lin.offsets = (-lin.scales.float() * lin.zeros.float() + 0.01).to(torch.float16)
        lin.zeros = None
    if act_order:
        lin.perm = torch.randperm(k, generator=g).to(torch.int32)
    lin.validate("test")
    return lin
