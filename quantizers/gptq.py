"""GPTQ (Frantar et al., 2022): quantize a linear's columns one at a time, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction loss ||X W^T - X Q^T||^2, H = 2/n * X^T X over the calibration inputs X [n, K].

Per linear:
  1. H from real inputs (`Hessian`), dead inputs (H_kk = 0) get H_kk = 1 and W[:, k] = 0;
  2. act-order: permute columns by decreasing H_kk (the stored column order, `perm`);
  3. damping: H += damp * mean(diag H) * I, then U = upper Cholesky factor of H^-1;
  4. blocks of `block_size` columns: within a block quantize column j (RTN with its group's
     scale/zero, found when the group starts, from the error-updated weights), propagate the
     error e = (w_j - q_j) / U_jj to the block's later columns; after the block, apply the
     block's errors to all later columns at once (the "lazy batch" update).
Groups are contiguous in the processing order, which with act-order is exactly the packed
format's stored order (docs/FORMAT.md 4.4): no g_idx indirection, nothing lost.
"""

from __future__ import annotations

import torch

from qruntime.checkpoint import PackedLinear, effective_group_size
from qruntime.errors import InvalidOptionError

from .packing import pack
from .rtn import rtn_codes, rtn_params


class Hessian:
    """Running H = 2/n * sum x x^T over the rows of every input batch (float32)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        # x: [..., K] -> running mean of 2 x x^T, rescaled so old and new rows weigh the same
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h += x.t() @ x


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    bias: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> PackedLinear:
    """weight [N, K], hessian [K, K] -> PackedLinear (with `perm` when act_order)."""
    n, k = weight.shape
    if not 0 < damp < 1:
        raise InvalidOptionError(f"GPTQ damp={damp}; choose a fraction in (0, 1), e.g. 0.01")
    gs = effective_group_size(group_size, k)
    w = weight.detach().to(torch.float32).clone()
    h = hessian.to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, device=w.device)
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise InvalidOptionError(
            f"GPTQ: the Hessian of a [{n}, {k}] linear is not positive definite even with damp={damp}; "
            "use more or longer calibration samples (--calib-samples, --calib-seqlen)"
        ) from None

    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    g = -(-k // gs)
    scales = torch.zeros(n, g, dtype=scale_dtype, device=w.device)
    zeros = torch.zeros(n, g, dtype=torch.float32, device=w.device)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        errs = torch.zeros_like(wb)
        for j in range(b1 - b0):
            col = b0 + j
            if col % gs == 0:  # a group starts: its range from the weights as updated so far
                group = torch.cat([wb[:, j:], w[:, b1:]], dim=1)[:, : min(gs, k - col)]
                scales[:, col // gs], zeros[:, col // gs] = rtn_params(group, bits, symmetric, scale_dtype)
            s, z = scales[:, col // gs].to(torch.float32), zeros[:, col // gs]
            q = rtn_codes(wb[:, j], s, z, bits)
            codes[:, col] = q.to(torch.uint8)
            err = (wb[:, j] - s * (q - z)) / ub[j, j]
            wb[:, j:] -= err.unsqueeze(1) * ub[j, j:].unsqueeze(0)
            errs[:, j] = err
        w[:, b1:] -= errs @ u[b0:b1, b1:]  # lazy batch update of every later column
    return PackedLinear(
        in_features=k, out_features=n, bits=bits, group_size=group_size,
        qweight=pack(codes.cpu(), bits), scales=scales.cpu(),
        zeros=None if symmetric else zeros.to(torch.uint8).cpu(),
        perm=None if perm is None else perm.to(torch.int32).cpu(),
        bias=None if bias is None else bias.detach().clone().cpu(),
    )
