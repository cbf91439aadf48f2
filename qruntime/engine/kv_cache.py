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


def padded_head_dim(head_dim: int, at_least: int = 1) -> int:
    """The head size the triton runner's cache and attention kernels lay a head out in: head_dim
    rounded up to a power of two (their tl.arange ranges), and at least `at_least` (a GPU's tensor
    cores take 16 columns). Equal to head_dim for every Llama and Qwen release (64 or 128)."""
    return max(at_least, 1 << (head_dim - 1).bit_length())
