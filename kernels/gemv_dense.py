"""Decode GEMV over a 16-bit weight (fp16 or bf16, [N, K] as stored): out (fp32) += x @ W.T for ONE
activation row, split over K with fp32 atomics like the packed GEMVs (kernels.gemv_packed).

Why a kernel of its own and not cuBLAS: the decode step is a chain of small launches, and a
16-bit linear through torch costs three of them (x to the weight's dtype, the GEMV, the add into
the accumulator), none of which requests its weights before the previous launch drains (PDL).
This kernel accumulates into the step's fp32 buffers directly, requests its weight tile before it
waits for its producer, and forms its own input as the packed GEMVs do (the `SOURCE`s of
kernels.gemv_packed: the deferred RMSNorm's h * w, silu(gate) * up, flash-decoding's splits
merged), so a 16-bit model's decode step has the launches of a quantized one.

The products are fp32 (weight and activation converted, one FMA each): a 16-bit weight costs
about one instruction a byte read (a conversion and an FMA per 2-byte weight), against over 4 for
the int4 GEMV's integer math, so plain fp32 arithmetic keeps up with the memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import load_2d
from .gemv_packed import (FROM_RESIDUAL, FROM_SPLITS, FROM_SWIGLU, FROM_X, check_gate_up, check_residual,
                          check_splits, decode_gemv_input, decode_input_args, norm_weight_slice)
from .pdl import pdl_launch, release_dependents, wait_for_producer
from .rmsnorm import DeferredNorm


@dataclass
class DenseLinear:
    """A 16-bit linear as the decode GEMV reads it: the checkpoint's weight [N, K] (K contiguous)."""
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def dense_tile(n: int, head_dim: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): each program reads one [BLOCK_N, BLOCK_K] tile (16 KB in 16-bit).
    On an H200 (benchmarks/results/h200/dense_gemv.log, bf16, 8 tiles on Llama-3.1-8B / 3.2-1B shapes)
    32 x 256 was within 2% of the best tile on every shape but the vocabulary-sized ones, where few
    long rows per program read best (8 x 1024: 4096 x 128256 in 239 us against 252).
    o_proj merging flash-decoding's splits (head_dim given): one head per K slice, so that a program
    merges one head's splits, and 128 columns (64 above head_dim 128): every column tile merges its
    K slice again, so fewer tiles merge less. With 32 x 256 every program merged two heads, over
    twice the column tiles (8B w16 at 1536 positions: 5.077 -> 4.344 ms/token on an H200,
    benchmarks/results/h200/ab_dense_oproj_tile.log); 128 columns against 64 on an H100, 8B w16:
    5.281 -> 5.235 ms/token at 128 positions, 5.751 -> 5.518 at 1536 (128 x 128 with 8 warps and
    256 x 128 were slower; benchmarks/results/h100/ab_dense_oproj_tile_s38.log); 1B (head_dim 64, two
    heads a tile) 0.948 -> 0.933 and 1.018 -> 0.994, 3B 2.426 -> 2.439 and 2.709 -> 2.640
    (ab_dense_oproj_tile_1b_s39.log)."""
    if head_dim is not None and head_dim & (head_dim - 1) == 0 and head_dim <= 256:
        return (128 if head_dim <= 128 else 64, head_dim, 4)
    return (8, 1024, 4) if n >= 65536 else (32, 256, 4)


@triton.jit
def _dense_gemv_kernel(
    x_ptr, aux_ptr, w_ptr, bias_ptr, out_ptr, clear_ptr, ss_ptr,
    N, K, stride_wn, CLEAR_N, norm_dim, eps,
    HAS_BIAS: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
    SOURCE: tl.constexpr, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, PIECE: tl.constexpr,
    CLEAR_CHUNK: tl.constexpr, NORM_SCALE: tl.constexpr,
):
    """Program (column tile, K slice): out[n] += sum_k W[n, k] x[k] over its tile, x formed from
    SOURCE as in kernels.gemv_packed (FROM_RESIDUAL: the programs of column tile 0 add their
    slice's sum of h^2 to ss). The tile, and a deferred norm's weight, are requested before waiting
    for the previous kernel (PDL): no kernel of the step writes weights."""
    release_dependents(PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    w = load_2d(w_ptr, n, n < N, k, k < K, stride_wn, EVEN, STREAM=True)  # read once a step: L2 evicts it first
    norm_w = norm_weight_slice(aux_ptr, k0, K, SOURCE, BLOCK_K)
    wait_for_producer(PDL)
    xk = decode_gemv_input(x_ptr, aux_ptr, norm_w, clear_ptr, CLEAR_N, ss_ptr, norm_dim, eps, k0, K, SOURCE,
                           NUM_SPLITS, HEAD_DIM, PIECE, BLOCK_K, CLEAR_CHUNK, NORM_SCALE)
    acc = tl.sum(w.to(tl.float32) * xk[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32) * (k0 == 0).to(tl.float32)
    tl.atomic_add(out_ptr + n, acc, mask=n < N, sem="relaxed")


def _launch_dense(x: torch.Tensor, lin: DenseLinear, out: torch.Tensor, source: int = FROM_X,
                  aux: torch.Tensor | None = None, clear: torch.Tensor | None = None,
                  norm: DeferredNorm | None = None, add_bias: bool = True, tile: tuple[int, int, int] | None = None) -> None:
    n, k = lin.out_features, lin.in_features
    if out.dtype != torch.float32 or out.numel() != n or not out.is_contiguous():
        raise ValueError(f"dense GEMV: out must be contiguous fp32 [1, {n}], got {out.dtype} {tuple(out.shape)}")
    if lin.weight.stride(1) != 1:
        raise ValueError("dense GEMV: the weight's rows (K) must be contiguous")
    bn, bk, nw = tile or dense_tile(n, k // aux.shape[1] if source == FROM_SPLITS else None)
    bk = min(bk, triton.next_power_of_2(k))
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _dense_gemv_kernel[grid](
        x, aux, lin.weight, lin.bias, out, N=n, K=k, stride_wn=lin.weight.stride(0),
        HAS_BIAS=add_bias and lin.bias is not None, BLOCK_N=bn, BLOCK_K=bk, EVEN=n % bn == 0 and k % bk == 0,
        num_warps=nw, **decode_input_args(source, aux, clear, norm, k, bk, grid), **pdl_launch(x),
    )


def dense_accumulate(x: torch.Tensor, lin: DenseLinear, out: torch.Tensor,
                     tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """out [1, N] (fp32) += x @ W.T (+ bias) for one row x [1, K] (any float dtype). Returns out.
    tile: (BLOCK_N, BLOCK_K, num_warps), dense_tile(N) by default (here and below)."""
    if x.shape != (1, lin.in_features) or not x.is_contiguous():
        raise ValueError(f"dense_accumulate: x must be one contiguous row [1, {lin.in_features}], got {tuple(x.shape)}")
    _launch_dense(x, lin, out, tile=tile)
    return out


def dense_accumulate_swiglu(gate_up: torch.Tensor, lin: DenseLinear, out: torch.Tensor,
                            norm: DeferredNorm | None = None, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """kernels.gemv_packed.qmatmul_accumulate_swiglu for a 16-bit weight."""
    check_gate_up("dense_accumulate_swiglu", gate_up, lin.in_features, norm)
    _launch_dense(gate_up, lin, out, source=FROM_SWIGLU, norm=norm, tile=tile)
    return out


def dense_accumulate_attention(splits: tuple[torch.Tensor, torch.Tensor], lin: DenseLinear, out: torch.Tensor,
                               clear: torch.Tensor | None = None, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """kernels.gemv_packed.qmatmul_accumulate_attention for a 16-bit weight."""
    check_splits("dense_accumulate_attention", splits, lin.in_features, clear)
    _launch_dense(splits[0], lin, out, source=FROM_SPLITS, aux=splits[1], clear=clear, tile=tile)
    return out


def dense_accumulate_deferred_norm(h: torch.Tensor, norm_weight: torch.Tensor, lin: DenseLinear, out: torch.Tensor,
                                   norm: DeferredNorm, bias_to_reader: bool = False,
                                   tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """kernels.gemv_packed.qmatmul_accumulate_deferred_norm for a 16-bit weight (h * w in fp32)."""
    check_residual("dense_accumulate_deferred_norm", h, norm_weight, lin.in_features, norm, lin.bias, bias_to_reader)
    _launch_dense(h, lin, out, source=FROM_RESIDUAL, aux=norm_weight, norm=norm, add_bias=False, tile=tile)
    return out
