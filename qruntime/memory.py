"""Device memory: what a loaded model holds, and the longest static KV cache a memory budget leaves
room for (THEORY.md: context = (memory - weights - workspace) / KV bytes per token).

Used by `qruntime.load(..., memory_budget=...)` (the engine's cache sized from a budget) and by
`qruntime bench --memory-budget` (the longest context a smaller card would hold)."""

from __future__ import annotations

import torch

from qruntime.config import ModelConfig
from qruntime.engine.kv_cache import KVCache, padded_head_dim
from qruntime.errors import InvalidOptionError

# Reserved beside the weights and the cache: one prefill piece's activations (the triton runner
# prefills long prompts in pieces of PREFILL_CHUNK tokens, ~0.3 GB at Llama-3.1-8B's widths),
# the decode step's buffers, the CUDA graph's pool and the allocator's slack.
WORKSPACE_BYTES = 1 << 30

_UNITS = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "kib": 2**10, "kb": 10**3, "b": 1}


def parse_size(size: str | int | float) -> int:
    """24GB -> 24e9 bytes, 20GiB -> 20 * 2^30, 512MiB, or a number of bytes (int, float or digits)."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        value, multiplier = float(size), 1
    else:
        text = str(size).strip().lower()
        for suffix, unit in _UNITS.items():  # longest suffixes first: "gib" before "b"
            if text.endswith(suffix):
                text, multiplier = text[: -len(suffix)].strip(), unit
                break
        else:
            multiplier = 1
        try:
            value = float(text)
        except ValueError:
            value = -1.0
    if not 1 <= value * multiplier < float("inf"):  # also refuses nan
        raise InvalidOptionError(f"memory budget {size!r}: expected a positive size like 24GB, 20GiB or 512MiB")
    return int(value * multiplier)


def max_context(budget_bytes: float, weight_total_bytes: float, workspace_bytes: float, kv_per_token: float) -> int:
    """THEORY.md: (card memory - weights - activations/workspace) / P_kv, floored at 0."""
    return max(0, int((budget_bytes - weight_total_bytes - workspace_bytes) // kv_per_token))


def weight_bytes_on_device(ckpt, dtype: torch.dtype) -> int:
    """Bytes of the checkpoint's weights once loaded: packed linears as stored, 16-bit linears and
    the dense tensors (embedding, norms) in the compute dtype."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for lin in ckpt.linears.values():
        if lin.bits == 16:
            total += size * (lin.qweight.numel() + (0 if lin.bias is None else lin.bias.numel()))
        else:
            total += lin.nbytes()
    return total + size * sum(t.numel() for t in ckpt.dense.values())


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, int8: bool) -> int:
    """K and V of every layer for one position: int8 codes with an fp32 scale per head (the triton
    runner's int8 cache), or elements in `dtype` (KVCache's). A head_dim that is not a power of two
    counts as the triton runner's padded heads (kv_cache.padded_head_dim): the larger of the two caches."""
    head = padded_head_dim(cfg.head_dim)
    if int8:
        return 2 * cfg.num_layers * cfg.num_kv_heads * (head + 4)
    return KVCache.bytes_per_token(cfg, dtype) * head // cfg.head_dim


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, int8: bool) -> int:
    """Bytes one position of the static cache takes: its K and V (kv_bytes_per_token) and the RoPE
    tables' row (cos and sin, fp32)."""
    return kv_bytes_per_token(cfg, dtype, int8) + 2 * (padded_head_dim(cfg.head_dim) // 2) * 4


def format_size(nbytes: float) -> str:
    """Bytes as GB, or as MB under a GB (errors about tiny models stay readable)."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def context_for_budget(budget_bytes: int, ckpt, dtype: torch.dtype, int8: bool) -> int:
    """The longest cache (positions) that fits `budget_bytes` beside the weights and the workspace
    (not capped by the model's max_position_embeddings); InvalidOptionError when not one position fits."""
    weights = weight_bytes_on_device(ckpt, dtype)
    per_token = cache_bytes_per_token(ckpt.config, dtype, int8)
    fits = max_context(budget_bytes, weights, WORKSPACE_BYTES, per_token)
    if fits < 1:
        raise InvalidOptionError(
            f"memory budget {format_size(budget_bytes)} leaves no room for a KV cache: the weights take "
            f"{format_size(weights)} and the runtime reserves {format_size(WORKSPACE_BYTES)} of workspace"
        )
    return fits
