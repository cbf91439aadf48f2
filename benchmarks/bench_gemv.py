"""Block-size sweep of the decode GEMV (kernels.qmatmul.qmatmul_accumulate) on the GPU; writes the
best config per shape in the form of kernels/tuned/<card>.json (merge with merge_tuned.py).

    PYTHONPATH=$(bash benchmarks/stage_package.sh) python3 benchmarks/bench_gemv.py --out DIR [--bits 4]

Achieved bandwidth = bytes the kernel must read (words + scales + zeros + x) / median time of many
launches in one CUDA graph over rotating buffers (> 300 MB, beyond L2), against the streaming
read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from gpu_common import dump, environment, gemv_workload, measure_read_bandwidth, time_graph
from qruntime.kernels.layout import prepare
from qruntime.kernels.qmatmul import qmatmul, qmatmul_accumulate
from qruntime.kernels.reference import linear as ref_linear
from qruntime.quantizers.rtn import quantize_rtn

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256), (4096, 6144), (4096, 28672),
          (2048, 2048), (2048, 3072), (2048, 16384), (8192, 2048), (2048, 128256)]  # (K, N); fused qkv / gate_up too


def configs(m: int, bits: int, quick: bool = False):
    """(BLOCK_N, BLOCK_K, K_ITERS, num_warps, path) candidates. M = 1: the packed-fp16 path (it won
    every shape of the earlier sweeps but the smallest int8 one, so the FMA path stays as one
    candidate there), one K tile of BLOCK_K. M > 1: tensor-core tiles of 16 words along K (each word
    read once, one dot per code slot: the group of 128 caps BLOCK_K), K_ITERS tiles per program."""
    if m == 1 and quick:  # the tiles that won on the H100 and H200 (a few minutes for all shapes)
        return [(bn, bk, 1, nw, "f16x2") for bn in (128, 256, 512) for bk in (64, 128, 256) for nw in (2, 4)]
    if m == 1:
        return ([(bn, bk, 1, nw, "f16x2") for bn in (128, 256, 512) for bk in (64, 128, 256, 512) for nw in (1, 2, 4)]
                + [(64, 64, 1, 2, False)])
    bk = 128 if bits == 4 else 64
    return [(bn, bk, it, nw, True) for bn in (32, 64, 128, 256) for it in (1, 2, 4, 8) for nw in (2, 4, 8)]


def gemm_configs():
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) candidates for the prefill kernel."""
    return [(bm, bn, bk, nw, ns) for bm in (64, 128) for bn in (64, 128) for bk in (64, 128) for nw in (4, 8)
            for ns in (3,)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prefill", type=int, default=0, help="also sweep the prefill GEMM at this M")
    ap.add_argument("--shapes", default="all", help="'all' or 'issue' (the four shapes of the acceptance)")
    ap.add_argument("--quick", action="store_true", help="M = 1: only the tiles that won the full sweeps")
    args = ap.parse_args()
    env = environment()
    bw = measure_read_bandwidth()
    print(f"# {env}\n# read bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    rows, tuned = [], {}
    for bits in args.bits:
        # correctness of every path on awkward sizes first
        w = torch.randn(777, 1000, device="cuda")
        for group, sym, path, m, bk in itertools.product((32, 128, -1), (True, False), [False, True, "f16x2"], (1, 16),
                                                         (64, 128, 512)):
            if m > 1 and path is not True:
                continue
            lin = quantize_rtn(w, bits, group, sym)
            x = torch.randn(m, 1000, device="cuda", dtype=torch.float16)
            out = torch.zeros(m, 777, device="cuda")
            qmatmul_accumulate(x, prepare(lin, torch.device("cuda"), torch.float16), out, config=(64, bk, 2, 4, path))
            ref = ref_linear(x.float(), lin)
            err = ((out - ref).norm() / ref.norm()).item()
            print(f"# check w{bits} g{group} sym={sym} path={path} M={m} BLOCK_K={bk}: rel err {err:.1e}", flush=True)
            assert err < 3e-3, err
        shapes = SHAPES if args.shapes == "all" else SHAPES[:4]
        for (k, n), m in itertools.product(shapes, args.m):
            lins, xs, outs, need = gemv_workload(k, n, m, bits)
            count = len(lins)
            best = None
            for cfg in configs(m, bits, args.quick):
                try:
                    t = time_graph([lambda i=i: qmatmul_accumulate(xs[i], lins[i], outs[i], config=cfg) for i in range(count)])
                except Exception as e:  # a config that does not compile
                    print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg)
            t, cfg = best
            rows.append(dict(bits=bits, k=k, n=n, m=m, us=t * 1e6, bytes=need, tbps=need / t / 1e12,
                             frac_of_read_bw=need / t / bw, config=list(cfg)))
            tuned[f"splitk/w{bits}/m{m}/n{n}/k{k}"] = list(cfg)
            print(f"w{bits} g128 M={m:2d} K={k:6d} N={n:6d}: {t * 1e6:8.2f} us  {need / t / 1e12:.3f} TB/s  "
                  f"{100 * need / t / bw:5.1f}% of read BW  cfg={cfg}", flush=True)
            del lins, xs, outs
            torch.cuda.empty_cache()
            dump(f"{args.out}/gemv_sweep.json", dict(env=env, read_bw=bw, results=rows, tuned=tuned))  # so far
        if args.prefill:
            sweep_prefill(bits, args.prefill, shapes, rows, tuned)
    dump(f"{args.out}/gemv_sweep.json", dict(env=env, read_bw=bw, results=rows, tuned=tuned))


def sweep_prefill(bits: int, m: int, shapes, rows: list, tuned: dict) -> None:
    """Best whole-K GEMM config per shape at M rows (TFLOP/s; prefill is compute-bound)."""
    for k, n in shapes:
        lin = prepare(quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, bits, 128, False), torch.device("cuda"),
                      torch.float16)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        out = torch.empty(m, n, device="cuda", dtype=torch.float16)
        best = None
        for cfg in gemm_configs():
            try:
                t = time_graph([lambda: qmatmul(x, lin, out=out, config=cfg)] * 8)
            except Exception as e:
                print(f"  skip gemm {cfg}: {type(e).__name__}", file=sys.stderr)
                continue
            if best is None or t < best[0]:
                best = (t, cfg)
        t, cfg = best
        rows.append(dict(kind="gemm", bits=bits, k=k, n=n, m=m, us=t * 1e6, tflops=2 * m * n * k / t / 1e12, config=list(cfg)))
        tuned[f"gemm/w{bits}/m{min(m, 128)}/n{n}/k{k}"] = list(cfg)
        print(f"gemm w{bits} g128 M={m} K={k:6d} N={n:6d}: {t * 1e6:8.1f} us {2 * m * n * k / t / 1e12:6.1f} TFLOP/s cfg={cfg}",
              flush=True)


if __name__ == "__main__":
    main()
