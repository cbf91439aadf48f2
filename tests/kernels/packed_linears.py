"""Random packed linears in every zero mode, for the matmul kernels' tests (and the GPU check
benchmarks/check_configs_gpu.py); the shipped tuned tables' decode configs."""

import json

import torch

from qruntime.checkpoint import PackedLinear
from qruntime.kernels.layout import prepare
from qruntime.kernels.reference import linear as ref_linear
from qruntime.quantizers.rtn import quantize_rtn
from tolerances import assert_close


def shipped_decode_configs() -> dict[tuple, int]:
    """Every distinct decode config of the shipped tables -> the rows it was tuned for (1, or 16 for
    a few-row entry)."""
    from qruntime.kernels import tuning

    configs = {}
    for path in sorted(tuning.TABLES.glob("*.json")):
        for key, cfg in json.loads(path.read_text()).items():
            if not key.startswith("gemm/"):
                configs[tuple(cfg)] = 1 if "/m1/" in key else 16
    return configs


def make_linear(n, k, bits, group, zero_mode, act_order=False, bias=True, seed=0) -> PackedLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    lin = quantize_rtn(w, bits, group, symmetric=zero_mode == "symmetric",
                       bias=torch.randn(n, generator=g) if bias else None)
    if zero_mode == "float":  # GGUF-style: w = s q + m with m = -s z (any float offset works)
        lin.offsets = (-lin.scales.float() * lin.zeros.float() + 0.01).to(torch.float16)
        lin.zeros = None
    if act_order:
        lin.perm = torch.randperm(k, generator=g).to(torch.int32)
    lin.validate("test")
    return lin


def assert_accumulates_product(try_kernel, config, bits, zero_mode, case) -> None:
    """try_kernel(x, prepared linear, out, config) (a few-row decode kernel's entry) runs on a random
    case (M, N, K, group) and adds x @ W.T to what `out` held, to the tensor-core tolerance."""
    m, n, k, group = case
    lin = make_linear(n, k, bits, group, zero_mode, seed=n + m)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5)).half()
    start = torch.randn(m, n)  # accumulates onto what `out` holds
    out = start.clone()
    assert try_kernel(x, t, out, config)
    assert_close(out - start, ref_linear(x.float(), lin), "fp16_dot")
