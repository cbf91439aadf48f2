"""The decode figures of ../shared/reference/THEORY.md.

    latency(n) = (n - 1) / W + B,   B = P_w / BW,   W = BW * 1 ms / P_kv

P_w: bytes read per decoded token for weights: every decoder-layer linear plus lm_head (codes,
scales, zeros, act-order permutation, biases: real bytes), not the embedding (one row per token).
P_kv: KV-cache bytes per token of context: 2 * layers * kv_heads * head_dim * bytes per element
(+ the per-token, per-head scales of an int8 cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qruntime import memory
from qruntime.checkpoint import QuantizedCheckpoint, expected_linear_shapes
from qruntime.config import ModelConfig

DATASHEET_BANDWIDTH = {  # bytes/s, as printed by the vendors (SI units)
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H200": 4.8e12,
    "A100-SXM4-80GB": 2.039e12,
    "RTX 4090": 1.008e12,
}


@dataclass(frozen=True)
class DecodeTheory:
    weight_bytes: float     # P_w
    kv_bytes_per_token: float  # P_kv
    bandwidth: float        # bytes/s

    @property
    def b_ms(self) -> float:
        """Latency of one decoded token at an empty cache, ms."""
        return self.weight_bytes / self.bandwidth * 1e3

    @property
    def w_tokens_per_ms(self) -> float:
        """Tokens of context that add 1 ms of latency."""
        return self.bandwidth * 1e-3 / self.kv_bytes_per_token

    def latency_ms(self, n: int) -> float:
        return (n - 1) / self.w_tokens_per_ms + self.b_ms


def linear_params(cfg: ModelConfig) -> int:
    """Weights of every decoder linear plus lm_head (what P_w counts at 16 bits)."""
    return sum(n * k for _, (n, k) in expected_linear_shapes(cfg, has_lm_head=True))


def weight_bytes(ckpt: QuantizedCheckpoint) -> int:
    """Real bytes of all linears, lm_head included (a tied, unquantized lm_head reads the embedding)."""
    total = sum(lin.nbytes() for lin in ckpt.linears.values())
    if "lm_head" not in ckpt.linears:
        emb = ckpt.dense["model.embed_tokens.weight"]
        total += emb.numel() * emb.element_size()
    return total


def bits_per_weight(ckpt: QuantizedCheckpoint) -> float:
    """Honest BPW: 8 * P_w / number of weights in the linears and lm_head."""
    return 8 * weight_bytes(ckpt) / linear_params(ckpt.config)


def kv_bytes_per_token(cfg: ModelConfig, kv: str) -> int:
    """kv16: 2 bytes per element; kv8: 1 byte per element + one fp32 scale per token, head and K/V
    (the engine's own figures, qruntime.memory)."""
    if kv not in ("kv16", "kv8"):
        raise ValueError(f"kv={kv!r}; choose kv16 or kv8")
    return memory.kv_bytes_per_token(cfg, torch.float16, int8=kv == "kv8")
