"""Normalized error bounds, ||out - ref|| / ||ref||, per compute path, and a helper that names the
worst elements on failure."""

import torch

# fp32 FMA paths are exact up to summation order; the tensor-core paths round x to fp16; the int8
# KV cache adds its own quantization error (scale / 2 per element, ~0.4% of the vector's max).
TOL = {"fp32": 1e-5, "fp16_dot": 2e-3, "int8_kv": 2e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, path: str) -> None:
    out, ref = out.float(), ref.float()
    assert not torch.isnan(out).any(), f"unwritten/NaN outputs at {torch.isnan(out).nonzero()[:5].tolist()}"
    err = ((out - ref).norm() / ref.norm().clamp(min=1e-12)).item()
    if err > TOL[path]:
        worst = (out - ref).abs().flatten().topk(min(5, out.numel())).indices
        raise AssertionError(f"relative error {err:.2e} > {TOL[path]:.0e} ({path}); worst flat indices "
                             f"{worst.tolist()}: out {out.flatten()[worst].tolist()} ref {ref.flatten()[worst].tolist()}")
