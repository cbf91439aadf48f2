"""Block sizes per shape, chosen from tables measured on the GPU (benchmarks/tune_gemv.py).

No autotuning at run time: the first token must not wait minutes. A shape missing from the table
gets the rule below, which the tables were built to refine.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

_TABLE = Path(__file__).with_name("tuned_configs.json")


@lru_cache(maxsize=1)
def _table() -> dict:
    if _TABLE.is_file():
        return json.loads(_TABLE.read_text())
    return {}


def gemm_config(bits: int, n: int, k: int, m: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the whole-K (prefill) kernel."""
    key = f"gemm/w{bits}/m{min(m, 128)}/n{n}/k{k}"
    hit = _table().get(key)
    if hit:
        return tuple(hit)
    if m <= 16:
        return 16, 64, 128, 4, 3
    if m <= 64:
        return 64, 64, 64, 4, 3
    return 128, 128, 64, 8, 3


def splitk_config(bits: int, n: int, k: int, m: int = 1) -> tuple[int, int, int, int, bool | str]:
    """(BLOCK_N, BLOCK_K, K_ITERS, num_warps, USE_DOT) for the split-K GEMV kernel."""
    hit = _table().get(f"splitk/w{bits}/m{1 if m == 1 else 16}/n{n}/k{k}")
    if hit:
        return tuple(hit)
    if m > 1:
        return 64, 128, 1, 4, True
    # the packed-fp16 path won every measured shape but the smallest int8 one
    # (benchmarks/results/gemv_sweep_w4.json, gemv_sweep_w8.json)
    return (256, 64, 2, 2, "f16x2") if bits == 4 else (256, 128, 1, 2, "f16x2")
