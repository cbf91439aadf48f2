"""Rotary position embedding, HF "rotate_half" convention (first half / second half of each head).

Frequencies follow transformers' rope initialisation for the types we support: default,
linear (positions divided by `factor`), llama3 (per-frequency smooth interpolation) and
frequency_factors (explicit per-frequency divisors, how GGUF files carry llama3 scaling).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qruntime.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies, after rope scaling."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    if rs.type == "linear":
        return inv_freq / rs.factor
    if rs.type == "frequency_factors":  # explicit per-frequency divisors (GGUF rope_freqs), as llama.cpp
        return inv_freq / torch.tensor(rs.factors, dtype=torch.float32)
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between blended.
    low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables [max_seq_len, head_dim] for positions 0..max_seq_len-1."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq = inv_frequencies(cfg).to(device)
        t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, head_dim]
        return self.cos[positions], self.sin[positions]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, T, H, head_dim]; cos/sin: [T, head_dim]
    # the tables are fp32; like transformers, rotate in the activations' dtype
    cos, sin = cos.to(x.dtype)[None, :, None, :], sin.to(x.dtype)[None, :, None, :]
    return x * cos + _rotate_half(x) * sin
