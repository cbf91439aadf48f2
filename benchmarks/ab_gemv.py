"""Isolated decode GEMV (M = 1, or --m 16: the few-row slot kernel) with an environment switch the
kernels read at launch flipped back and forth in one process, over a few tile configs per shape:
what a kernel variant does alone, beside what ab_env.py shows it does inside the decode step.

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/ab_gemv.py VAR VALUE1 VALUE2 \
        [--bits 4 8] [--rounds 2] [--m 1]

Timing as bench_gemv.py (one graph of PDL launches over rotating buffers beyond L2); the outputs
of the values are compared with each other and with the reference.
"""
import argparse
import multiprocessing
import os

import torch

from bench_gemv import SHAPES, _compile_configs
from gpu_common import environment, gemv_workload, measure_read_bandwidth, time_graph
from qruntime.kernels.qmatmul import qmatmul_accumulate
from qruntime.kernels.slot_gemm import SLOT_PATHS
from qruntime.kernels.tuning import splitk_config


def candidates(bits: int, k: int, n: int, m: int = 1) -> list:
    """The card's table entry and the one-warp packed-GEMV tiles around it (M = 1), or slot-kernel
    tiles (M > 1)."""
    if m > 1:
        near = [(bn, 128, t, nw, path) for bn, t, nw in ((64, 4, 4), (128, 4, 8), (256, 1, 4), (256, 2, 4))
                for path in SLOT_PATHS]
    else:
        near = [(32, 128, t, 1, "packed") for t in (1, 2, 4)] + [(64, 128, t, 1, "packed") for t in (1, 2)]
        near += [(128, 128, 1, 1, "packed"), (64, 256, 1, 1, "packed"), (128, 128, 1, 2, "packed")]
        near += [(32, 128, 8, 1, "packed"), (64, 128, 4, 1, "packed"), (64, 128, 8, 1, "packed"), (128, 128, 2, 1, "packed"),
                 (128, 128, 4, 1, "packed")]
    return list(dict.fromkeys([tuple(splitk_config(bits, n, k, m, torch.device("cuda")))] + near))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("var")
    ap.add_argument("values", nargs="+")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--m", type=int, default=1, help="activation rows (M > 1: the slot kernel's tiles)")
    args = ap.parse_args()
    bw = measure_read_bandwidth()
    print(f"# {environment()}\n# read bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    shapes = SHAPES[:4]
    for value in args.values:  # compile every variant first, in parallel (the children inherit the switch)
        os.environ[args.var] = value
        work = []
        for bits in args.bits:
            every = list(dict.fromkeys(c for k, n in shapes for c in candidates(bits, k, n, args.m)))
            work += [(bits, args.m, shapes, every[j::args.jobs]) for j in range(args.jobs)]
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            pool.map(_compile_configs, work)
    for bits in args.bits:
        for k, n in shapes:
            lins, xs, outs, need = gemv_workload(k, n, args.m, bits)
            count = len(lins)
            print(f"w{bits} M={args.m} K={k} N={n}", flush=True)
            for cfg in candidates(bits, k, n, args.m):
                times, results = {v: [] for v in args.values}, {}
                for _ in range(args.rounds):
                    for value in args.values:
                        os.environ[args.var] = value
                        times[value].append(time_graph([lambda i=i: qmatmul_accumulate(xs[i], lins[i], outs[i], config=cfg)
                                                        for i in range(count)]))
                        out = torch.zeros(args.m, n, device="cuda")
                        qmatmul_accumulate(xs[0], lins[0], out, config=cfg)
                        results[value] = out
                first = results[args.values[0]]
                line = "  ".join(f"{v}: {min(t) * 1e6:6.2f} us {100 * need / min(t) / bw:5.1f}%" for v, t in times.items())
                diff = max(((r - first).norm() / first.norm()).item() for r in results.values())
                print(f"  {str(cfg):32s} {line}  (outputs differ by {diff:.1e})", flush=True)
            del lins, xs, outs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
