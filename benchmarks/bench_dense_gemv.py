"""The 16-bit decode GEMV (kernels.gemv_dense) on Llama-3.1-8B / 3.2-1B shapes, bf16 weights: achieved
bandwidth for a few tiles, against cuBLAS as the torch path runs it (x to bf16, the GEMV, the add
into the fp32 accumulator), each a graph of launches over rotating buffers (> L2).

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/bench_dense_gemv.py
"""
import math

import torch

from gpu_common import environment, measure_read_bandwidth, time_graph
from qruntime.kernels.gemv_dense import DenseLinear, dense_accumulate

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256),
          (2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048), (2048, 128256)]  # (K, N)
TILES = [(16, 512, 4), (8, 512, 2), (16, 256, 2), (32, 256, 4), (8, 1024, 4), (32, 512, 8), (64, 128, 4), (4, 1024, 2)]


def bench_shape(k: int, n: int, bw: float) -> None:
    """One shape: every tile and cuBLAS + add, each over enough weight copies to exceed L2."""
    count = max(2, math.ceil(300e6 / (n * k * 2)))
    lins = [DenseLinear(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(count)]
    xs = [torch.randn(1, k, device="cuda", dtype=torch.float16) for _ in range(count)]
    outs = [torch.zeros(1, n, device="cuda") for _ in range(count)]
    need = n * k * 2 + k * 2
    ref = xs[0].float() @ lins[0].weight.float().T
    results = []
    for tile in TILES:
        outs[0].zero_()
        dense_accumulate(xs[0], lins[0], outs[0], tile=tile)
        err = ((outs[0] - ref).norm() / ref.norm()).item()
        t = time_graph([lambda i=i: dense_accumulate(xs[i], lins[i], outs[i], tile=tile) for i in range(count)])
        results.append((t, tile, err))
    t_cublas = time_graph([lambda i=i: outs[i].add_(torch.nn.functional.linear(xs[i].to(torch.bfloat16), lins[i].weight))
                           for i in range(count)])
    line = "  ".join(f"{tile}: {t * 1e6:7.2f} us {100 * need / t / bw:5.1f}% (err {err:.0e})" for t, tile, err in results)
    best = min(results)
    print(f"K={k:6d} N={n:6d}  best {best[1]} {best[0] * 1e6:7.2f} us {100 * need / best[0] / bw:5.1f}%  "
          f"cuBLAS+add {t_cublas * 1e6:7.2f} us {100 * need / t_cublas / bw:5.1f}%\n    {line}", flush=True)


def main() -> None:
    bw = measure_read_bandwidth()
    print(f"# {environment()}\n# read bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    for k, n in SHAPES:
        bench_shape(k, n, bw)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
