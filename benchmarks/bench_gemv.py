"""Block-size sweep of the decode GEMV (kernels.qmatmul.qmatmul_accumulate) on the GPU; writes the
best config per shape in the form of kernels/tuned_configs.json.

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
from qruntime.kernels.qmatmul import qmatmul_accumulate
from qruntime.kernels.reference import linear as ref_linear
from qruntime.quantizers.rtn import quantize_rtn

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256), (4096, 6144), (4096, 28672),
          (2048, 2048), (2048, 3072), (2048, 16384), (8192, 2048), (2048, 128256)]  # (K, N); fused qkv / gate_up too


def configs(m: int, bits: int):
    paths = [True] if m > 1 else [False, "f16x2"]
    return [(bn, bk, it, nw, p) for bn in (64, 128, 256) for bk in (64, 128) for it in (1, 2, 4) for nw in (2, 4)
            for p in paths]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    env = environment()
    bw = measure_read_bandwidth()
    print(f"# {env}\n# read bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    rows, tuned = [], {}
    for bits in args.bits:
        # correctness of every path on awkward sizes first
        w = torch.randn(777, 1000, device="cuda")
        for group, sym, path in itertools.product((32, 128, -1), (True, False), [False, True, "f16x2"]):
            lin = quantize_rtn(w, bits, group, sym)
            x = torch.randn(1, 1000, device="cuda", dtype=torch.float16)
            out = torch.zeros(1, 777, device="cuda")
            qmatmul_accumulate(x, prepare(lin, torch.device("cuda"), torch.float16), out, config=(64, 64, 2, 4, path))
            ref = ref_linear(x.float(), lin)
            err = ((out - ref).norm() / ref.norm()).item()
            print(f"# check w{bits} g{group} sym={sym} path={path}: rel err {err:.1e}", flush=True)
            assert err < 3e-3, err
        for (k, n), m in itertools.product(SHAPES, args.m):
            lins, xs, outs, need = gemv_workload(k, n, m, bits)
            count = len(lins)
            best = None
            for cfg in configs(m, bits):
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
    dump(f"{args.out}/gemv_sweep.json", dict(env=env, read_bw=bw, results=rows, tuned=tuned))


if __name__ == "__main__":
    main()
