"""Least-squares fit of per-token latency against context length: latency = (n - 1) / W + B."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyFit:
    b_ms: float             # intercept: latency at an empty cache
    w_tokens_per_ms: float  # 1 / slope
    r2: float


def fit_latency(contexts, latencies_ms) -> LatencyFit:
    """Fits latency_ms = (n - 1) * slope + B over the measured points (at least two distinct n)."""
    x = np.asarray(contexts, dtype=np.float64) - 1.0
    y = np.asarray(latencies_ms, dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("fit_latency needs at least two distinct context lengths")
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    w = float("inf") if slope <= 0 else 1.0 / slope
    return LatencyFit(b_ms=float(intercept), w_tokens_per_ms=w, r2=r2)
