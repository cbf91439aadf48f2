"""Greedy end of a decode step in one launch: token = argmax(logits); pos += 1; seq_len += 1.

Why: in the CUDA-graph decode step on an H200, `torch.argmax` over the 128256 fp32 logits ran as a
single-block reduce kernel costing 29 us per token (1.5% of an 8B step, 5% of a 1B step), followed by
two tiny kernels for the position updates. Here cdiv(V, BLOCK) programs each reduce one block of the
logits and merge their result into a two-word workspace with one 64-bit atomic max; the last program
to finish (counted by a second atomic) writes the token, advances pos and seq_len, and resets the
workspace, so a CUDA graph replays the kernel with no memset and no extra launch.

Key layout (int64, compared as signed; larger key = better candidate):
  bits 63..32  order-preserving int32 image of the fp32 value v: bits(v) for v >= 0, and
               bits(v) ^ 0x7FFFFFFF for negative v (the non-sign bits flipped, so more negative
               sorts lower). -0.0 is first turned into +0.0 (they compare equal, as in torch), and
               every NaN maps to 0x7FFFFFFF, above +inf: torch.argmax treats NaN as the maximum.
  bits 31..0   0xFFFFFFFF - index, as an unsigned number: among equal values the smaller index
               has the larger key, so the FIRST index of the maximum wins, like torch.argmax.
The workspace key starts at (and is reset to) INT64_MIN, below every real key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, release_dependents, wait_for_producer

BLOCK = 4096        # logits per program: 32 programs for a 128256 vocabulary (untuned on the GPU)
NUM_WARPS = 4
KEY_MIN = -(2 ** 63)  # the workspace key's idle value: below every real key


@dataclass
class GreedyWorkspace:
    """State greedy_advance keeps between launches; it leaves both fields as it found them."""
    best_key: torch.Tensor   # int64 [1]: running max of the programs' keys; KEY_MIN when idle
    counter: torch.Tensor    # int32 [1]: programs that have merged their key; 0 when idle


def greedy_workspace(device: torch.device | str) -> GreedyWorkspace:
    """A fresh workspace for greedy_advance on `device` (allocate once; reuse for every step)."""
    return GreedyWorkspace(best_key=torch.full((1,), KEY_MIN, device=device, dtype=torch.int64),
                           counter=torch.zeros(1, device=device, dtype=torch.int32))


@triton.jit
def order_key(x):
    """The order-preserving int32 image of fp32 `x` (see the module's docstring): -0.0 as +0.0,
    every NaN as 0x7FFFFFFF, above +inf."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0: equal values must get equal keys
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # arithmetic shift: flips the non-sign bits of negatives
    return tl.where(x != x, 0x7FFFFFFF, key)


@triton.jit
def key_value(key):
    """The fp32 value whose order_key is the int32 `key` (the map is its own inverse on the bits)."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _greedy_advance_kernel(logits_ptr, token_ptr, pos_ptr, seq_len_ptr, key_ptr, counter_ptr, V,
                           PDL: tl.constexpr, BLOCK: tl.constexpr):
    release_dependents(PDL)
    wait_for_producer(PDL)  # the logits are the previous kernel's output
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(logits_ptr + offs, mask=ok, other=0.0)
    # NaN wins, as in torch.argmax; padding sits below every real value (-inf's image is 0x807FFFFF)
    hi = tl.where(ok, order_key(x), -2147483648)
    # block max of the value image; ties resolved to the smallest offset (the first index)
    best_hi, best_i = tl.max(hi, axis=0, return_indices=True, return_indices_tie_break_left=True)
    index = (pid * BLOCK + best_i).to(tl.int64)
    key = (best_hi.to(tl.int64) << 32) | (0xFFFFFFFF - index)
    # acq_rel: this program's merge is ordered before its counter increment below
    tl.atomic_max(key_ptr, key, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        # Every program has merged (each one's atomic_max precedes its counter increment, which our
        # acquire saw). Read the result with an atomic, not a plain load: L1 is not coherent across
        # CTAs, and atomics are performed at L2 where all merges landed. The exchange also resets the
        # key for the next launch (a CUDA graph replays this kernel with no memset).
        final = tl.atomic_xchg(key_ptr, -9223372036854775808, sem="acq_rel", scope="gpu")
        tl.store(token_ptr, 0xFFFFFFFF - (final & 0xFFFFFFFF))
        tl.store(pos_ptr, tl.load(pos_ptr) + 1)
        tl.store(seq_len_ptr, tl.load(seq_len_ptr) + 1)
        tl.store(counter_ptr, 0)  # every program has incremented it: nobody else touches it now


def greedy_advance(logits: torch.Tensor, token: torch.Tensor, pos: torch.Tensor, seq_len: torch.Tensor,
                   workspace: GreedyWorkspace, block: int = BLOCK) -> None:
    """token[0] = argmax(logits) (first index of the max; NaN counts as the max), pos += 1, seq_len += 1.

    logits fp32 [V] or [1, V], contiguous; token int64 [1]; pos, seq_len int32 [1]; workspace from
    greedy_workspace(), shared by successive calls (never by two calls in flight at once)."""
    if logits.dtype != torch.float32 or not logits.is_contiguous() or logits.dim() not in (1, 2) \
            or (logits.dim() == 2 and logits.shape[0] != 1) or logits.numel() == 0:
        raise ValueError(f"greedy_advance: logits must be contiguous fp32 [V] or [1, V] with V >= 1, got "
                         f"{logits.dtype} {tuple(logits.shape)} (contiguous={logits.is_contiguous()})")
    v = logits.numel()
    if v >= 2 ** 31:
        raise ValueError(f"greedy_advance: V={v} does not fit the 32-bit index of the key")
    for name, t, dtype in (("token", token, torch.int64), ("pos", pos, torch.int32), ("seq_len", seq_len, torch.int32),
                           ("workspace.best_key", workspace.best_key, torch.int64),
                           ("workspace.counter", workspace.counter, torch.int32)):
        if t.dtype != dtype or t.shape != (1,):
            raise ValueError(f"greedy_advance: {name} must be {dtype} [1], got {t.dtype} {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"greedy_advance: {name} is on {t.device}, logits on {logits.device}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"greedy_advance: block={block} must be a power of two >= 16")
    grid = (triton.cdiv(v, block),)
    _greedy_advance_kernel[grid](logits, token, pos, seq_len, workspace.best_key, workspace.counter, v,
                                 BLOCK=block, num_warps=NUM_WARPS, **pdl_launch(logits))
