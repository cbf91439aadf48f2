"""Timing helpers for GPU benchmarks (see ../shared/reference/KERNELS.md for why they look like this).

- measure_read_bandwidth: a large streaming read (x.sum() over 2 GiB), the card's real ceiling.
- time_graph: many launches captured in ONE CUDA graph, over rotating buffers so the weights come
  from HBM and not from the 50 MB L2; median over repeats, per launch.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess

import torch


def environment() -> dict:
    """Card, driver and versions, recorded beside every result."""
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.strip()
        except OSError:
            info["driver"] = None
    return info


def measure_read_bandwidth(gib: float = 2.0, repeats: int = 20) -> float:
    """Bytes/s of a streaming read over `gib` GiB (median of repeats)."""
    x = torch.empty(int(gib * 2**30) // 2, dtype=torch.float16, device="cuda").uniform_()
    x.sum()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del x
    return x_bytes(gib) / statistics.median(times)


def x_bytes(gib: float) -> int:
    return int(gib * 2**30) // 2 * 2


def time_graph(fns, repeats: int = 10) -> float:
    """Median seconds per call of the callables in `fns`, all captured back to back in one graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns[:3]:  # warm-up compiles outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(fns))
    return statistics.median(times)


def dump(path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
