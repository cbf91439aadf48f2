"""Grouped-query self-attention over a static KV cache (plain PyTorch reference path)."""

from __future__ import annotations

import torch
from torch import nn

from qruntime.config import ModelConfig

from .norm import RMSNorm
from .quant_linear import QuantLinear
from .rotary import apply_rotary


class Attention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        q_proj: QuantLinear,
        k_proj: QuantLinear,
        v_proj: QuantLinear,
        o_proj: QuantLinear,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm  # Qwen3 only

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        start: int,
    ) -> torch.Tensor:
        # x: [B, T, D]; cos/sin: [T, hd]; k_cache/v_cache: [B, n_kv, S_max, hd]; start: position of x[:, 0]
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        end = start + t
        k_cache[:, :, start:end] = k.transpose(1, 2)
        v_cache[:, :, start:end] = v.transpose(1, 2)
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
        # causal mask over the cache: query i (at position start+i) sees keys 0..start+i
        q_pos = torch.arange(start, end, device=x.device)[:, None]
        mask = torch.arange(end, device=x.device)[None, :] <= q_pos
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
