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


def rtn_params(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = torch.float16
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scales in `scale_dtype`, float32 integer zero points) over the last dim of `w`.

    Shared by RTN, GPTQ (one group at a time) and AWQ's search (fake quantization), so every
    method makes codes the same way from a group's range.
    """
    qmax = 2**bits - 1
    if symmetric:
        amax = w.abs().amax(dim=-1)
        scales = (amax / (2 ** (bits - 1) - 1)).clamp(min=_MIN_SCALE).to(scale_dtype)
        zeros = torch.full_like(amax, 2 ** (bits - 1))
    else:
        wmin = w.amin(dim=-1).clamp(max=0)
        wmax = w.amax(dim=-1).clamp(min=0)
        scales = ((wmax - wmin) / qmax).clamp(min=_MIN_SCALE).to(scale_dtype)
        zeros = torch.round(-wmin / scales.to(torch.float32)).clamp(0, qmax)
    return scales, zeros


def rtn_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(w / s) + z, 0, 2^b - 1) as float32; scales/zeros broadcast against w."""
    return (torch.round(w / scales.to(torch.float32)) + zeros).clamp(0, 2**bits - 1)


def fake_quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """The float32 weight RTN's codes dequantize to (what quantize_rtn stores, unpacked)."""
    n, k = weight.shape
    w = _grouped(weight.detach().to(torch.float32), effective_group_size(group_size, k))
    scales, zeros = rtn_params(w, bits, symmetric)
    s, z = scales.to(torch.float32).unsqueeze(-1), zeros.unsqueeze(-1)
    return (s * (rtn_codes(w, s, z, bits) - z)).view(n, -1)[:, :k]


# Rows are quantized this many weights at a time. RTN works row by row, and a block's float32
# temporaries (the weight, w / s, the codes: a few copies) stay near 0.3 GB whatever the tensor.
# A whole 128256 x 2048 lm_head at once took 3.4 GB above its own 0.5 GB.
_BLOCK_ELEMENTS = 1 << 24


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
    step = max(1, _BLOCK_ELEMENTS // max(k, 1))
    words, scales, zeros = [], [], []
    for r in range(0, n, step):
        w = _grouped(weight[r:r + step].detach().to(torch.float32), gs)
        s, z = rtn_params(w, bits, symmetric, scale_dtype)
        codes = rtn_codes(w, s.unsqueeze(-1), z.unsqueeze(-1), bits)
        words.append(pack(codes.view(w.shape[0], -1)[:, :k].to(torch.uint8), bits))
        scales.append(s)
        zeros.append(z)
    return PackedLinear(
        in_features=k,
        out_features=n,
        bits=bits,
        group_size=group_size,
        qweight=torch.cat(words),
        scales=torch.cat(scales),
        zeros=None if symmetric else torch.cat(zeros).to(torch.uint8),
        bias=None if bias is None else bias.detach().clone(),
    )
