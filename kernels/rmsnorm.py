"""RMSNorm of each row: y = w * x / sqrt(mean(x^2) + eps), in fp32, written in y's dtype.

Reads the fp32 residual stream of the decode step (or any float rows) and writes the fp16/bf16
input of the next matmul: one pass, one launch. `embed_rmsnorm` starts the decode step: it gathers
the token's embedding row, writes it as the fp32 residual stream and its RMSNorm (the embedding
lookup and the copy would be two launches more, outside the chain of PDL launches).
In the decode step the norms inside the layers are deferred instead (`deferred_rms_scale`): no launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, release_dependents, wait_for_producer


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, index_ptr, rows_ptr, D, stride_x, stride_y, eps,
                    GATHER: tl.constexpr, PDL: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row r of y = RMSNorm of row r of x; GATHER: of row index[r] of x (a table), which is also
    written to rows[r] in fp32."""
    release_dependents(PDL)
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    # the weight is no kernel's output: requested before waiting for the previous kernel (PDL), its
    # HBM latency overlaps that kernel's end, and only the row (just written, in L2) waits
    w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
    wait_for_producer(PDL)
    if GATHER:
        x = tl.load(x_ptr + tl.load(index_ptr + row) * stride_x + d, mask=ok, other=0.0).to(tl.float32)
        tl.store(rows_ptr + row * D + d, x, mask=ok)
    else:
        x = tl.load(x_ptr + row * stride_x + d, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(y_ptr + row * stride_y + d, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class DeferredNorm:
    """An RMSNorm left to the consumer of the matmul that read its input (kernels.gemv_packed's
    qmatmul_accumulate_deferred_norm): that GEMV multiplies the row by the weight only and adds the
    row's sum of squares into `sum_squares` (fp32 [1], zero before); whoever reads its output
    multiplies by `deferred_rms_scale` = 1 / sqrt(sum_squares / dim + eps). The decode step
    saves the norm's launch this way."""
    sum_squares: torch.Tensor
    dim: int
    eps: float


@triton.jit
def deferred_rms_scale(sum_squares_ptr, D, eps):
    """1 / sqrt(mean(x^2) + eps) of a row whose sum of squares the GEMV that read it added up
    (kernels.gemv_packed.qmatmul_accumulate_deferred_norm): that GEMV multiplied x * w only, and the
    kernel reading its output applies this scale (the norm is linear in it)."""
    return 1.0 / tl.sqrt(tl.load(sum_squares_ptr) / D + eps)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, D] -> [M, D] (out_dtype, default x's)."""
    m, d = x.shape
    if weight.shape != (d,):
        raise ValueError(f"rmsnorm: weight {tuple(weight.shape)} does not match D={d}")
    if out is None:
        out = torch.empty((m, d), device=x.device, dtype=out_dtype or x.dtype)
    _launch(x, weight, out, None, None, m, eps)
    return out


def embed_rmsnorm(table: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, eps: float,
                  rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """rows [M, D] (fp32) = table[index] and out [M, D] = RMSNorm of those rows, in one launch;
    index int64 [M] in device memory (the decode step's token). Returns out."""
    m, d = index.numel(), table.shape[1]
    if index.dtype != torch.int64 or weight.shape != (d,) or table.stride(1) != 1:
        raise ValueError(f"embed_rmsnorm: index must be int64, the weight [{d}] and the table's rows contiguous, got "
                         f"{index.dtype}, {tuple(weight.shape)}, strides {table.stride()}")
    for name, t in (("rows", rows), ("out", out)):
        if t.shape != (m, d) or not t.is_contiguous():
            raise ValueError(f"embed_rmsnorm: {name} must be contiguous [{m}, {d}], got {tuple(t.shape)}")
    if rows.dtype != torch.float32:
        raise ValueError(f"embed_rmsnorm: rows must be fp32, got {rows.dtype}")
    _launch(table, weight, out, index, rows, m, eps)
    return out


def _launch(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, index: torch.Tensor | None,
            rows: torch.Tensor | None, m: int, eps: float) -> None:
    d = x.shape[1]
    block = triton.next_power_of_2(d)
    # one program per row: a decode row (D = 2048..8192) is latency-bound, and 8 warps load and
    # reduce it faster than 4 (H200, chain of launches: 1.22 against 1.53 us; 16 or 32: 1.3 us)
    _rmsnorm_kernel[(m,)](x, weight, out, index, rows, d, x.stride(0), out.stride(0), eps, GATHER=index is not None,
                          BLOCK_D=block, num_warps=8 if block >= 2048 else 4, **pdl_launch(out))
