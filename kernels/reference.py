"""Deliberately slow and obvious PyTorch references, shared by the torch backend and the tests."""

from __future__ import annotations

import torch

from qruntime.checkpoint import PackedLinear, effective_group_size
from qruntime.quantizers.packing import unpack


def _per_column(t: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """[N, G] per-group values -> [N, K] per-column values."""
    return t.repeat_interleave(group_size, dim=1)[:, :k]


def dequantize(lin: PackedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The stored weight W_stored [N, K] (columns in stored order; see PackedLinear.perm)."""
    if lin.bits == 16:
        return lin.qweight.to(dtype)
    k = lin.in_features
    gs = effective_group_size(lin.group_size, k)
    q = unpack(lin.qweight, lin.bits, k).to(torch.float32)
    s = _per_column(lin.scales.to(torch.float32), gs, k)
    if lin.zero_mode == "symmetric":
        w = s * (q - 2 ** (lin.bits - 1))
    elif lin.zero_mode == "int":
        w = s * (q - _per_column(lin.zeros.to(torch.float32), gs, k))
    else:
        w = s * q + _per_column(lin.offsets.to(torch.float32), gs, k)
    return w.to(dtype)


def dequantize_original_order(lin: PackedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] with columns in the model's input order (act-order permutation undone)."""
    w = dequantize(lin, dtype)
    if lin.perm is None:
        return w
    out = torch.empty_like(w)
    out[:, lin.perm.long()] = w
    return out


def linear(x: torch.Tensor, lin: PackedLinear) -> torch.Tensor:
    """y = x @ W.T + bias, dequantizing on every call (the reference for the GEMV/GEMM kernels)."""
    if lin.perm is not None:
        x = x.index_select(-1, lin.perm.to(x.device).long())
    w = dequantize(lin, x.dtype)
    bias = None if lin.bias is None else lin.bias.to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as HF Llama computes it: in fp32, cast back, then scale."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
