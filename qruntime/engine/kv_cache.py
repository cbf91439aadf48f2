"""Static KV cache, allocated once at load for `max_seq_len` positions."""

from __future__ import annotations

import torch

from qruntime.config import ModelConfig


class KVCache:
    """k, v: [num_layers, batch, num_kv_heads, max_seq_len, head_dim] in the compute dtype."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_seq_len = max_seq_len

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
