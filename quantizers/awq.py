"""AWQ (Lin et al., 2023): activation-aware weight quantization, the two searches.

Input channels that see large activations matter most. Scaling such a channel's weight column up
by s (and its input down by s, folded into the preceding RMSNorm or linear so the float model is
unchanged) gives it finer quantization steps relative to its values. Per group of linears that
share one input X [T, K] (q/k/v, gate/up, o, down):

  scale search: s = mean|X|^a / mean|W_normalized|^(1-a), normalized to geometric mean 1, for a
    on a grid of `n_grid` points in [0, 1), plus s = 1; keep the s whose fake-quantized
    Q(W * s) / s minimizes ||X W^T - X (Q(W s)/s)^T||^2 over the group's linears;
  clip search: per output row and group, shrink the clipping range max|w| by up to
    `max_shrink`, keeping the one that minimizes the group's output error (no shrink included).

Both searches include the identity (s = 1, no clipping), so on the calibration data neither can
do worse than RTN for the error it measures. The objective is the group's own linear outputs
(AutoAWQ measures whole blocks for some groups; the linear outputs keep this module small).
"""

from __future__ import annotations

import torch

from qruntime.checkpoint import effective_group_size

from .rtn import _grouped, fake_quantize_rtn, rtn_codes, rtn_params


def search_scales(x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int, symmetric: bool,
                  n_grid: int = 20) -> torch.Tensor:
    """x [T, K], weights [N_i, K] sharing that input -> per-input-channel scales s [K] (float32)."""
    w = torch.cat([wi.to(torch.float32) for wi in weights], dim=0)
    k = w.shape[1]
    x = x.to(torch.float32)
    x_mean = x.abs().mean(dim=0)
    g = _grouped(w.abs(), effective_group_size(group_size, k))
    w_norm = (g / g.amax(dim=-1, keepdim=True).clamp(min=1e-12)).view(w.shape[0], -1)[:, :k]
    w_mean = w_norm.mean(dim=0)
    reference = x @ w.t()

    def loss(s: torch.Tensor) -> float:
        wq = fake_quantize_rtn(w * s, bits, group_size, symmetric) / s
        return (x @ wq.t() - reference).pow(2).mean().item()

    best_s, best = torch.ones(k, device=w.device), loss(torch.ones(k, device=w.device))
    for i in range(n_grid):
        a = i / n_grid
        s = (x_mean.pow(a) / w_mean.pow(1 - a).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if not torch.isfinite(s).all():
            continue
        current = loss(s)
        if current < best:
            best, best_s = current, s
    return best_s


def search_clip(x: torch.Tensor, weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                n_grid: int = 20, max_shrink: float = 0.5, rows_per_batch: int = 256) -> torch.Tensor:
    """x [T, K], weight [N, K] -> max|w| clip per (row, group) [N, G, 1] that minimizes the
    group's contribution to the output error."""
    n, k = weight.shape
    gs = effective_group_size(group_size, k)
    xg = _grouped(x.to(torch.float32), gs)  # [T, G, gs]
    best_max = []
    for r0 in range(0, n, rows_per_batch):
        w = _grouped(weight[r0: r0 + rows_per_batch].to(torch.float32), gs)  # [n, G, gs]
        org_max = w.abs().amax(dim=-1, keepdim=True)
        reference = torch.einsum("ngj,tgj->ngt", w, xg)
        best_err = torch.full(org_max.shape, float("inf"), device=w.device)
        chosen = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.clamp(w, -max_val, max_val)
            scales, zeros = rtn_params(cur, bits, symmetric)
            s, z = scales.to(torch.float32).unsqueeze(-1), zeros.unsqueeze(-1)
            q = s * (rtn_codes(cur, s, z, bits) - z)
            err = (torch.einsum("ngj,tgj->ngt", q, xg) - reference).pow(2).mean(dim=-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            chosen = torch.where(better, max_val, chosen)
        best_max.append(chosen)
    return torch.cat(best_max, dim=0)


def apply_clip(weight: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """weight [N, K] clamped to [-max_val, max_val] per (row, group)."""
    n, k = weight.shape
    w = _grouped(weight.to(torch.float32), effective_group_size(group_size, k))
    return torch.clamp(w, -max_val, max_val).view(n, -1)[:, :k].to(weight.dtype)
