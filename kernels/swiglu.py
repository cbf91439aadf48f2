"""SwiGLU activation: act = silu(gate) * up, reading the fused gate|up matmul output [M, 2F].

When the input is the fp32 split-K accumulator of the decode step, the kernel also zeroes it
after reading (ZERO_INPUT), so the next step's atomics start from zero with no extra launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, release_dependents, wait_for_producer


@triton.jit
def silu_times(g, up):
    """silu(g) * up in fp32: the activation of the swiglu kernel and of the fused down_proj GEMV
    (kernels.gemv_packed), written once so the two paths round alike."""
    return g / (1.0 + tl.exp(-g)) * up


@triton.jit
def _swiglu_kernel(gu_ptr, out_ptr, F, stride_gu, stride_out, ZERO_INPUT: tl.constexpr, PDL: tl.constexpr,
                  BLOCK: tl.constexpr):
    release_dependents(PDL)
    wait_for_producer(PDL)
    row = tl.program_id(0)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = f < F
    g = tl.load(gu_ptr + row * stride_gu + f, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + F + f, mask=ok, other=0.0).to(tl.float32)
    act = silu_times(g, u)
    tl.store(out_ptr + row * stride_out + f, act.to(out_ptr.dtype.element_ty), mask=ok)
    if ZERO_INPUT:
        tl.store(gu_ptr + row * stride_gu + f, tl.zeros([BLOCK], dtype=gu_ptr.dtype.element_ty), mask=ok)
        tl.store(gu_ptr + row * stride_gu + F + f, tl.zeros([BLOCK], dtype=gu_ptr.dtype.element_ty), mask=ok)


def swiglu(gate_up: torch.Tensor, out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
           zero_input: bool = False) -> torch.Tensor:
    """gate_up [M, 2F] -> silu(gate) * up [M, F]."""
    m, two_f = gate_up.shape
    if two_f % 2:
        raise ValueError(f"swiglu: last dim {two_f} is not 2F")
    f = two_f // 2
    if out is None:
        out = torch.empty((m, f), device=gate_up.device, dtype=out_dtype or gate_up.dtype)
    block = 1024
    _swiglu_kernel[(m, triton.cdiv(f, block))](gate_up, out, f, gate_up.stride(0), out.stride(0),
                                                ZERO_INPUT=zero_input, BLOCK=block, **pdl_launch(gate_up))
    return out
