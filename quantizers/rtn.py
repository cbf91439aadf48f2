"""Round-to-nearest quantization of one linear weight into the packed format.

Per group of `group_size` input columns (per output row):
  symmetric:  s = max|w| / (2^(b-1) - 1), z = 2^(b-1) implicit, q = clamp(round(w/s) + z)
  asymmetric: s = (max - min) / (2^b - 1), z = clamp(round(-min/s)), q = clamp(round(w/s) + z)
with min/max taken over the group including 0, so 0 is exactly representable. The scale is rounded
to its stored dtype *before* the codes are computed, so dequantization uses exactly the scale the
codes were made with.
"""

from __future__ import annotations

import torch

from qruntime.checkpoint import PackedLinear, effective_group_size

from .packing import pack

# The smallest positive fp16 (subnormal); a group whose range is below it is all zeros anyway.
_MIN_SCALE = 2.0**-24


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, gs], zero-padding the last group (padding never changes min/max incl. 0)."""
    n, k = w.shape
    pad = (-k) % group_size
    return torch.nn.functional.pad(w, (0, pad)).view(n, -1, group_size)


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = True,
    bias: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> PackedLinear:
    """weight [N, K] (any float dtype) -> PackedLinear with RTN codes."""
    n, k = weight.shape
    gs = effective_group_size(group_size, k)
    w = _grouped(weight.detach().to(torch.float32), gs)
    qmax = 2**bits - 1
    if symmetric:
        amax = w.abs().amax(dim=-1)
        scales = (amax / (2 ** (bits - 1) - 1)).clamp(min=_MIN_SCALE).to(scale_dtype)
        s = scales.to(torch.float32).unsqueeze(-1)
        codes = (torch.round(w / s) + 2 ** (bits - 1)).clamp(0, qmax)
        zeros = None
    else:
        wmin = w.amin(dim=-1).clamp(max=0)
        wmax = w.amax(dim=-1).clamp(min=0)
        scales = ((wmax - wmin) / qmax).clamp(min=_MIN_SCALE).to(scale_dtype)
        s = scales.to(torch.float32)
        zeros = torch.round(-wmin / s).clamp(0, qmax)
        codes = (torch.round(w / s.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, qmax)
        zeros = zeros.to(torch.uint8)
    codes = codes.view(n, -1)[:, :k].to(torch.uint8)
    return PackedLinear(
        in_features=k,
        out_features=n,
        bits=bits,
        group_size=group_size,
        qweight=pack(codes, bits),
        scales=scales.contiguous(),
        zeros=zeros,
        bias=None if bias is None else bias.detach().clone(),
    )
