"""The writing libraries' own packing and dequantization code, loaded for use as test oracles.

AutoGPTQ, AutoAWQ and compressed-tensors are in the `test` extra. AutoGPTQ's and AutoAWQ's
package `__init__` import whole model zoos (and break with current transformers), so their
single files are loaded by path: AutoGPTQ `auto_gptq/nn_modules/qlinear/qlinear_cuda.py` (its
CPU path packs and dequantizes in PyTorch), AutoAWQ `awq/modules/linear/gemm.py`, `gemv.py`,
`awq/utils/packing_utils.py`. GPTQModel needs torch >= 2.14 and cannot be installed beside the
pinned CPU torch; its v2 zero encoding is written by following its source (cited where used).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

import pytest
import torch


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (pip install -e '.[test]')")
    return Path(list(spec.submodule_search_locations)[0])


def _load_file(module_name: str, path: Path):
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def autogptq_quant_linear():
    """AutoGPTQ 0.7.1's `QuantLinear` (qlinear_cuda.py: v1 zeros, g_idx-aware CPU dequantization)."""
    root = _package_dir("auto_gptq")
    logging.getLogger("_oracle_autogptq_qlinear_cuda").setLevel(logging.ERROR)  # "CUDA extension not installed"
    return _load_file("_oracle_autogptq_qlinear_cuda", root / "nn_modules" / "qlinear" / "qlinear_cuda.py").QuantLinear


def awq_module(dotted: str):
    """An AutoAWQ module (e.g. "awq.modules.linear.gemm") without running `awq/__init__.py`."""
    if "awq" not in sys.modules:
        root = _package_dir("awq")
        stub = types.ModuleType("awq")
        stub.__path__ = [str(root)]  # submodules resolve from the real files; __init__ never runs
        sys.modules["awq"] = stub
    return importlib.import_module(dotted)


def autogptq_dequantize(module) -> torch.Tensor:
    """W [N, K] exactly as AutoGPTQ's CPU forward computes it: scales[g_idx] * (q - (qz + 1)).
    forward(x) = x @ W.T, so an identity input returns W.T (sums of one product each: exact)."""
    k = module.infeatures
    eye = torch.eye(k, dtype=module.scales.dtype)
    bias, module.bias = module.bias, None  # forward adds the bias in fp16 after the matmul
    try:
        with torch.no_grad():
            out = module(eye)
    finally:
        module.bias = bias
    return out.t()


def gptq_params(w: torch.Tensor, bits: int, group_size: int, sym: bool, g_idx: torch.Tensor):
    """Per-group (scales, zeros) [N, G] as GPTQ's quantizer finds them (min/max incl. 0)."""
    n, k = w.shape
    g = int(g_idx.max()) + 1
    maxq = 2**bits - 1
    scales, zeros = torch.empty(n, g), torch.empty(n, g)
    for gi in range(g):
        cols = w[:, g_idx == gi].float()
        xmin, xmax = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        s = ((xmax - xmin) / maxq).clamp(min=1e-5)
        scales[:, gi] = s
        zeros[:, gi] = torch.full_like(s, (maxq + 1) // 2) if sym else torch.round(-xmin / s)
    return scales, zeros
