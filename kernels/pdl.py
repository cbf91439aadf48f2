"""Programmatic dependent launch (PDL, Hopper and newer) for the decode kernels.

A decode step is a chain of ~10 small kernels per layer. Launched plainly, each one starts only
after the previous one has fully drained, and the memory system idles for a few microseconds at
every boundary: at the 1B scale that gap is most of the step. With PDL the next kernel is launched
while the current one still runs, and everything it reads that no kernel of the chain writes
(weights, scales, zeros: the bulk of its bytes) is requested before it waits for its predecessor.

The protocol every kernel here follows when PDL is on:
  1. `release_dependents` first: the next kernel may launch once all of this one's programs are
     resident (it then only occupies spare SM slots; ours never wait on something that cannot run).
  2. loads of data no kernel of the chain writes, if any (weights; in the decode step's
     flash-decoding, the cache's earlier positions);
  3. `wait_for_producer` before reading any activation and before writing anything: it returns
     when the previous kernel has completed and its writes are visible.
Because every kernel waits before it completes, completion is transitive: when kernel i's wait
returns, every kernel before i has completed too, so reads of data written two or more launches
back and writes over data read by earlier kernels are both safe.

Kernels launched without PDL (torch ops, the CPU interpreter) see ordinary stream order; the
GDC instructions are then not compiled in at all (constexpr PDL=False).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ._common import INTERPRET


@lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels on t's device use PDL: CUDA, compute capability 9.0+, not the interpreter,
    and not switched off with QRUNTIME_PDL=0 (to measure what it buys, or to rule it out)."""
    if INTERPRET or t.device.type != "cuda" or os.environ.get("QRUNTIME_PDL", "1") == "0":
        return False
    return _supported(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pdl_launch(t: torch.Tensor) -> dict:
    """Keyword arguments for a kernel launch: the kernel's PDL constexpr, and the launch attribute."""
    if pdl_enabled(t):
        return dict(PDL=True, launch_pdl=True)
    return dict(PDL=False)


@triton.jit
def release_dependents(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_producer(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
